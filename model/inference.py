"""The node's one entry point into the model: load a checkpoint, upscale numpy images x4.

``Upscaler`` works on float32 (H, W) arrays in [0, 1] and returns (4H, 4W). Large images are cut
into tiles of ``tile`` LR pixels, each run with ``overlap`` pixels of context on every side and
only its centre kept, so the result equals the untiled one (within 1e-3 once the overlap covers the
network's effective receptive field) and working memory is bounded by the tile, not the image.
Convolutions run channels_last (much faster on CPU too); on CUDA under bf16/fp16 autocast; an out-of-memory error restarts the
image with half the tile, down to ``min_tile``, and never keeps a tile from the failed attempt.
The ``csa_pooled`` ablation pools over the whole input, so its tiled output depends on the tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from model.arch import Generator
from model.checkpoint import ModelCard, load_checkpoint

SCALE = 4
# The node's default: the best shipped checkpoint that runs a 1024x1024 input in under 60 s on 2 CPU
# cores, where "best" is judged over the doses a node is sent, since nothing in a DICOM header says
# reliably how noisy an image is. Of the three CPU-size variants trained on the same budget (csa,
# csa_pooled, none; model/RESULTS.md) the plain RRDB scored best; at 6 blocks x 48 features
# (model/configs/node.toml, 34.5 s for 1024x1024 on 2 cores) it adds 0.12 dB on val. That network
# trained on clean images only sharpens noise (5 dB below bicubic on the low-dose degradation), and
# its low-dose fine-tune is below bicubic on clean images, so the default is the dose-blind fine-tune
# (model/configs/node-mixed.toml): 0.2-0.3 dB behind each specialist on its own ground, +1.8 to
# +4.8 dB over bicubic from clean to very low dose. The clean-only model is
# model/weights/cxr-sr-node-size.safetensors; the 3x faster 4-block one cxr-sr-cpu-none.safetensors.
DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "cxr-sr-node-size-mixed.safetensors"
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class UpscaleError(RuntimeError):
    """Upscaling could not finish (e.g. out of GPU memory even at the smallest tile)."""


@dataclass(frozen=True)
class LoadedGenerator:
    net: Generator
    card: ModelCard
    device: torch.device
    path: Path

    @property
    def sha256(self) -> str:
        return self.card.sha256


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UpscaleError(f"device {device!r} was asked for, but CUDA is not available here")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return torch.device(device)


def worker_device(device: str, index: int, *, gpus: int | None = None) -> str:
    """The device for worker ``index`` of a node started with ``device``.

    ``auto`` or ``cuda`` with several GPUs gives ``cuda:{index % gpus}``: one worker per GPU, as
    the node's ``workers = N`` means, instead of N model copies on GPU 0. An explicit
    ``cuda:K`` or ``cpu`` is kept. ``gpus`` defaults to ``torch.cuda.device_count()``.
    """
    count = torch.cuda.device_count() if gpus is None else gpus
    if device not in ("auto", "cuda") or count == 0:
        return "cpu" if device == "auto" and count == 0 else device
    return f"cuda:{index % count}" if count > 1 else "cuda"


def load_generator(path: str | Path | None = None, device: str | torch.device = "auto") -> LoadedGenerator:
    """Load a checkpoint (default: the shipped CPU model) onto ``device``, in eval mode."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    dev = resolve_device(device)
    net, card = load_checkpoint(path)
    # channels_last: 2-4x faster convolutions on CPU (oneDNN) and the tensor-core layout on CUDA
    net = net.to(dev, memory_format=torch.channels_last).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return LoadedGenerator(net=net, card=card, device=dev, path=path)


def write_untrained_checkpoint(path: str | Path, *, name: str = "untrained-tiny", residual_std: float = 0.0,
                               seed: int = 0) -> Path:
    """A tiny random-weight checkpoint (1 block, 8 features) for plumbing tests and benchmarks.

    With ``residual_std`` 0 its output is exactly bicubic (zero last convolution); a positive value
    adds a fixed random residual, so the output is visibly not a bicubic copy. Never for images
    anyone looks at."""
    from model.arch import ArchConfig
    from model.checkpoint import ModelCard, save_checkpoint

    torch.manual_seed(seed)
    arch = ArchConfig(num_blocks=1, num_feat=8, num_grow=4, global_skip=True)
    net = Generator(arch)
    if residual_std:
        with torch.no_grad():
            net.conv_last.weight.normal_(0.0, residual_std)
    card = ModelCard(name=name, version="0.0.0", arch=arch, notes="random weights: for plumbing tests only")
    save_checkpoint(Path(path), net, card)
    return Path(path)


def _tile_starts(length: int, tile: int) -> list[int]:
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile)) + [length - tile]


# Allocation failures that do not arrive as torch.OutOfMemoryError: cuDNN / cuBLAS workspaces
_ALLOC_FAILED = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError and the RuntimeErrors cuDNN/cuBLAS raise when an
    allocation fails (``CUDNN_STATUS_ALLOC_FAILED``...), which a smaller tile also cures."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(text in str(exc) for text in _ALLOC_FAILED)
    )


# how far outside [0, 1] an input may stray (noise, an interpolation's overshoot) before it is
# taken for data on another scale
RANGE_SLACK = 0.05


class Upscaler:
    """x4 super-resolution of float32 (H, W) arrays in [0, 1], tiled, with bounded memory."""

    def __init__(
        self,
        model: LoadedGenerator | Generator,
        *,
        tile: int = 256,
        overlap: int = 16,
        precision: Precision = "auto",
        min_tile: int = 32,
        device: str | torch.device | None = None,
    ) -> None:
        if tile < 8 or overlap < 0 or min_tile < 8 or min_tile > tile:
            raise ValueError(
                f"need tile >= min_tile >= 8 and overlap >= 0, got tile={tile}, "
                f"min_tile={min_tile}, overlap={overlap}"
            )
        if isinstance(model, LoadedGenerator):
            self.net, self.device = model.net, model.device
        else:
            self.net = model.eval()
            self.device = next(model.parameters()).device if device is None else resolve_device(device)
        self.tile, self.overlap, self.min_tile = tile, overlap, min_tile
        self.dtype = self._autocast_dtype(precision)

    def _autocast_dtype(self, precision: Precision) -> torch.dtype | None:
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
        if precision == "fp32" or (precision == "auto" and self.device.type != "cuda"):
            return None
        if self.device.type != "cuda":
            raise ValueError(f"precision {precision!r} needs a CUDA device, got {self.device}")
        if precision == "fp16":
            return torch.float16
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 2:
            raise ValueError(f"expected a 2-D (H, W) image, got shape {image.shape}")
        if image.dtype != np.float32:
            raise ValueError(f"expected float32 in [0, 1], got dtype {image.dtype}")
        if image.size == 0:
            raise ValueError(f"the image is empty (shape {image.shape})")
        lo, hi = float(image.min()), float(image.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("the image has NaN or infinite pixels; the network would spread them over every tile")
        if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
            raise ValueError(
                f"expected values in [0, 1], got {lo:g} to {hi:g}: scale the image first (8-bit data / 255, "
                "16-bit / 65535, or map its window to [0, 1] as cxr_sr_node.pixels does)"
            )
        tile = self.tile
        while True:
            try:
                return self._run(image, tile)
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
            # out of the except block, so the failed pass's tensors (its traceback) are released
            # before the cache is emptied
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if tile // 2 < self.min_tile:
                raise UpscaleError(
                    f"out of memory on {self.device} even with tile {tile} px; free memory "
                    "or run on another device"
                )
            tile //= 2  # restart the whole image: nothing from the failed pass is kept

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # (1, 1, h, w) -> (1, 1, 4h, 4w)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        ):
            return self.net(x).float()

    def _run(self, image: np.ndarray, tile: int) -> np.ndarray:
        h, w = image.shape
        out = np.empty((h * SCALE, w * SCALE), dtype=np.float32)
        src = torch.from_numpy(np.ascontiguousarray(image))
        o = self.overlap
        for y in _tile_starts(h, tile):
            for x in _tile_starts(w, tile):
                y0, x0 = max(y - o, 0), max(x - o, 0)
                y1, x1 = min(y + tile + o, h), min(x + tile + o, w)
                patch = src[y0:y1, x0:x1][None, None].to(self.device)
                sr = self._forward(patch)[0, 0]  # (4·ph, 4·pw)
                ty, tx = (y - y0) * SCALE, (x - x0) * SCALE
                th, tw = min(tile, h - y) * SCALE, min(tile, w - x) * SCALE
                out[y * SCALE : y * SCALE + th, x * SCALE : x * SCALE + tw] = (
                    sr[ty : ty + th, tx : tx + tw].clamp(0, 1).cpu().numpy()
                )
        return out
