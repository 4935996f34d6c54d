"""Train the ``cxr_features`` perceptual network: a VGG-style encoder learnt on chest X-rays.

The GAN stage needs a perceptual loss. The paper's ImageNet VGG19 cannot be downloaded here, so the
default feature network is trained on the shared chest images themselves, as the encoder of a
**denoising autoencoder**:

- data: random ``crop``² HR crops (random horizontal flip) of the *train* split only;
- input, per crop: with probability ``lr_input_prob`` the paper's degradation (blur σ=1 + bicubic
  x¼, quantised) bicubic-upscaled back to the crop size, otherwise the crop plus Gaussian noise of
  std ``noise_sigma``; target: the clean crop; L1 loss;
- encoder: ``vgg_layers(CXR_FEATURES_CFG, 1)`` (four blocks, 1/8 resolution, 128 channels) read
  before its final ReLU, i.e. at ``conv4_2`` = the ``"last"`` layer of ``build_perceptual``;
  decoder: three (nearest x2 upsample + 3x3 conv + ReLU) steps and a 3x3 output conv, thrown away
  after training;
- Adam, linear warm-up then cosine decay over the budget (``iterations`` or ``minutes``, whichever
  ends first), seeded.

After training, every conv layer is rescaled so that its pre-ReLU output has unit standard
deviation on clean train crops. ReLU and max pooling commute with a positive scale, so each rescale
is undone in the next conv's weights: every layer computes the same function as trained, up to
its own scalar. A perceptual L1 loss at any layer therefore sees features of scale ~1.

Only the encoder's ``features`` state dict is written (fp32 safetensors, keys ``"0.weight"`` …,
exactly ``vgg_layers(CXR_FEATURES_CFG, 1).state_dict()``), with a JSON card beside it that carries
what it is, the data, the objective, the budget, the validation reconstruction PSNR and the sha256
of the weights file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.checkpoint import card_path, sha256_file, write_safetensors
from model.data import load_gray, split_files
from model.degrade import Degradation, bicubic_resize
from model.train.nets import CXR_FEATURES_CFG, CXR_FEATURES_PATH, vgg_layers

FORMAT = "cxr-sr-node/cxr-features"
FORMAT_VERSION = 1
DOWNSCALE = 8  # three max-pools
LICENCE = (
    "Weights: Apache-2.0, like the project. Trained on images of the NIH ChestX-ray14 data set "
    "(NIH Clinical Center): use is subject to the NIH terms - no restriction on use, but cite "
    "Wang et al., CVPR 2017 and acknowledge the NIH Clinical Center; do not try to identify "
    "patients."
)


@dataclass(frozen=True, kw_only=True)
class FeatureTrainConfig:
    """How the feature encoder is trained; valid once constructed."""

    data_root: Path = Path("../shared/data/cxr_png/nih")
    out: Path = CXR_FEATURES_PATH  # the JSON card goes beside it (same name, .json)
    log: Path = Path("runs/cxr-features/log.jsonl")
    iterations: int | None = None  # None = the time budget alone; with minutes: whichever ends first
    minutes: float | None = 7.0  # training-loop budget; loading, validation and saving add ~40 s
    crop: int = 128
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 50
    noise_sigma: float = 0.02
    lr_input_prob: float = 0.5
    seed: int = 0
    log_every: int = 10
    val_crops_per_image: int = 4
    calibration_crops: int = 64
    max_train_images: int = 0  # 0 = every image of the train split
    progress: bool = True

    def __post_init__(self) -> None:
        if self.iterations is None and self.minutes is None:
            raise ValueError("give iterations, minutes or both; got neither")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if self.crop < DOWNSCALE * 2 or self.crop % DOWNSCALE:  # also a multiple of the x4 scale
            raise ValueError(
                f"crop must be a multiple of {DOWNSCALE} and >= {DOWNSCALE * 2}, got {self.crop}"
            )
        for name in ("batch_size", "log_every", "val_crops_per_image", "calibration_crops"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0 or self.noise_sigma < 0 or self.max_train_images < 0:
            raise ValueError(
                "lr must be > 0 and warmup, noise_sigma, max_train_images >= 0; got "
                f"{self.lr}, {self.warmup}, {self.noise_sigma}, {self.max_train_images}"
            )
        if not 0.0 <= self.lr_input_prob <= 1.0:
            raise ValueError(f"lr_input_prob must be in [0, 1], got {self.lr_input_prob}")


class Decoder(nn.Module):
    """Light decoder: (B, 128, H/8, W/8) conv4_2 features -> (B, 1, H, W) image. Training only."""

    def __init__(self, *, in_channels: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in (64, 32, 16):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c, w, 3, padding=1),
                nn.ReLU(True),
            ]
            c = w
        out = nn.Conv2d(c, 1, 3, padding=1)
        nn.init.constant_(out.bias, 0.5)  # start at mid-gray, not black: no iterations spent on the mean
        self.body = nn.Sequential(*layers, out)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.body(feats)


def last_conv_index(features: nn.Sequential) -> int:
    """Index of the final conv (``"last"`` in ``build_perceptual``)."""
    return max(i for i, m in enumerate(features) if isinstance(m, nn.Conv2d))


class CropSource:
    """Full images of one split held in memory (uint16, exact for 8- and 16-bit files) and seeded
    random (input, target) crop batches for the denoising objective."""

    def __init__(self, files: list[Path], *, crop: int, seed: int) -> None:
        self.crop = crop
        self.images: list[np.ndarray] = []
        self.too_small = 0  # images skipped for a side shorter than the crop; recorded in the card
        for path in files:
            img = load_gray(path)
            if min(img.shape) < crop:
                self.too_small += 1
                continue
            self.images.append(np.round(img * 65535.0).astype(np.uint16))
        if not self.images:
            raise ValueError(f"no image among {len(files)} file(s) is at least {crop} px on each side")
        self.rng = np.random.default_rng(seed)
        self.degradation = Degradation()

    def clean_crop(self, rng: np.random.Generator, index: int | None = None) -> np.ndarray:
        img = self.images[int(rng.integers(len(self.images))) if index is None else index]
        y = int(rng.integers(img.shape[0] - self.crop + 1))
        x = int(rng.integers(img.shape[1] - self.crop + 1))
        return img[y : y + self.crop, x : x + self.crop].astype(np.float32) / 65535.0

    def bicubic_up(self, hr: np.ndarray) -> np.ndarray:
        """The paper's LR of ``hr`` (blur, bicubic x¼, quantised), bicubic-upscaled to ``hr``'s size."""
        return bicubic_resize(self.degradation(hr), *hr.shape)

    def noisy(self, hr: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
        return (hr + rng.normal(0.0, sigma, size=hr.shape)).astype(np.float32)

    def batch(
        self, size: int, *, noise_sigma: float, lr_input_prob: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target), each (B, 1, crop, crop) float32."""
        inputs, targets = [], []
        for _ in range(size):
            hr = self.clean_crop(self.rng)
            if self.rng.random() < 0.5:
                hr = np.ascontiguousarray(hr[:, ::-1])
            if self.rng.random() < lr_input_prob:
                inputs.append(self.bicubic_up(hr))
            else:
                inputs.append(self.noisy(hr, noise_sigma, self.rng))
            targets.append(hr)
        return torch.from_numpy(np.stack(inputs)[:, None]), torch.from_numpy(np.stack(targets)[:, None])


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.clamp(0, 1), b).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def val_crops(
    source: CropSource, *, crops_per_image: int, noise_sigma: float, seed: int
) -> dict[str, torch.Tensor]:
    """Fixed seeded crops of every image: ``hr`` and the two kinds of input, each (N, 1, c, c)."""
    rng = np.random.default_rng(seed)
    hr = [source.clean_crop(rng, i) for i in range(len(source.images)) for _ in range(crops_per_image)]
    noisy = [source.noisy(h, noise_sigma, rng) for h in hr]
    up = [source.bicubic_up(h) for h in hr]
    return {
        k: torch.tensor(np.stack(v))[:, None] for k, v in (("hr", hr), ("noisy", noisy), ("bicubic_lr", up))
    }


@torch.no_grad()
def evaluate(encoder: nn.Sequential, decoder: Decoder, crops: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Mean reconstruction PSNR per input kind, next to the PSNR of the input itself."""
    encoder.eval()
    decoder.eval()
    hr = crops["hr"]
    out: dict[str, Any] = {"crops": len(hr)}
    for kind in ("noisy", "bicubic_lr"):
        recon, given = [], []
        for x, target in zip(crops[kind].split(8), hr.split(8), strict=True):
            y = decoder(encoder(x))
            recon += [psnr_db(y[i], target[i]) for i in range(len(x))]
            given += [psnr_db(x[i], target[i]) for i in range(len(x))]
        out[kind] = {
            "recon_psnr_db": round(float(np.mean(recon)), 3),
            "input_psnr_db": round(float(np.mean(given)), 3),
        }
    encoder.train()
    decoder.train()
    return out


@torch.no_grad()
def feature_stats(trunk: nn.Sequential, crops: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scale of the features a perceptual loss reads, and their L1 distance between HR crops and
    their bicubic-upscaled paper LR (roughly the perceptual loss of a bicubic generator)."""
    f_hr = torch.cat([trunk(x) for x in crops["hr"].split(8)])
    f_up = torch.cat([trunk(x) for x in crops["bicubic_lr"].split(8)])
    return {
        "std": round(f_hr.std().item(), 5),
        "mean_abs": round(f_hr.abs().mean().item(), 5),
        "spatial_std": round(f_hr.std(dim=(2, 3)).mean().item(), 5),
        "l1_hr_vs_bicubic": round((f_hr - f_up).abs().mean().item(), 5),
    }


@torch.no_grad()
def normalise_layers(features: nn.Sequential, x: torch.Tensor) -> list[float]:
    """Rescale each conv so its pre-ReLU output has unit std on ``x``, undoing the scale in the next
    conv's weights (ReLU and max pooling commute with positive scales); returns the scales found."""
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    scales: list[float] = []
    for k, conv in enumerate(convs):
        h = x
        for m in features:
            h = m(h)
            if m is conv:
                break
        s = h.std().item()
        if not math.isfinite(s) or s <= 0:
            raise ValueError(
                f"conv {k} of the feature network has degenerate output (std {s}); not saving it"
            )
        conv.weight.div_(s)
        conv.bias.div_(s)
        if k + 1 < len(convs):
            convs[k + 1].weight.mul_(s)
        scales.append(s)
    return scales


def _lr_at(config: FeatureTrainConfig, it: int, progress: float) -> float:
    warm = min(1.0, (it + 1) / config.warmup) if config.warmup else 1.0
    return config.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _progress(config: FeatureTrainConfig, it: int, elapsed_s: float) -> float:
    p = 0.0
    if config.iterations is not None:
        p = it / config.iterations
    if config.minutes is not None:
        p = max(p, elapsed_s / (config.minutes * 60.0))
    return p


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.chmod(0o644)  # package data: readable by everyone, whatever the umask
    os.replace(tmp, path)


def save_features(features: nn.Sequential, out: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write the fp32 safetensors file and its JSON card (with the file's sha256); returns the card."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in features.state_dict().items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "layer": card["layer"]["name"]}
    _atomic_write(out, lambda p: write_safetensors(p, state, meta))
    card = {**card, "sha256": sha256_file(out), "size_bytes": out.stat().st_size}
    _atomic_write(card_path(out), lambda p: p.write_text(json.dumps(card, indent=2) + "\n"))
    return card


def _loss_summary(losses: list[float]) -> dict[str, float]:
    n = max(1, len(losses) // 10)
    return {
        "first_10pct_mean": round(float(np.mean(losses[:n])), 5),
        "last_10pct_mean": round(float(np.mean(losses[-n:])), 5),
        "min": round(float(np.min(losses)), 5),
    }


def train_features(config: FeatureTrainConfig) -> dict[str, Any]:
    """Train, normalise and save the encoder; returns the card that was written beside it."""
    t_start = time.monotonic()
    torch.manual_seed(config.seed)
    root = Path(config.data_root)
    train_files = split_files(root, "train")
    if config.max_train_images:
        train_files = train_files[: config.max_train_images]
    val_files = split_files(root, "val")
    train = CropSource(train_files, crop=config.crop, seed=config.seed)
    val = CropSource(val_files, crop=config.crop, seed=config.seed + 1)

    encoder = vgg_layers(CXR_FEATURES_CFG, 1)
    last = last_conv_index(encoder)
    trunk = encoder[: last + 1]  # up to conv4_2, before its ReLU: what the loss reads
    decoder = Decoder(in_channels=CXR_FEATURES_CFG[-1])
    # channels_last: ~25% faster training steps on CPU (oneDNN); the saved tensors are made contiguous
    encoder.to(memory_format=torch.channels_last)
    decoder.to(memory_format=torch.channels_last)
    params = list(trunk.parameters()) + list(decoder.parameters())
    opt = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.99))

    config.log.parent.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    window: list[float] = []
    it, train_s = 0, 0.0
    total = config.iterations if config.minutes is None else None  # a time budget: no known end
    with (
        open(config.log, "w") as log,
        tqdm(total=total, disable=not config.progress, desc="cxr-features", unit="it") as bar,
    ):
        while _progress(config, it, train_s) < 1.0:
            t0 = time.perf_counter()
            lr_now = _lr_at(config, it, _progress(config, it, train_s))
            for group in opt.param_groups:
                group["lr"] = lr_now
            x, target = train.batch(
                config.batch_size, noise_sigma=config.noise_sigma, lr_input_prob=config.lr_input_prob
            )
            x = x.contiguous(memory_format=torch.channels_last)
            loss = F.l1_loss(decoder(trunk(x)), target)  # (B, 1, crop, crop)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_s += time.perf_counter() - t0
            it += 1
            window.append(loss.item())
            bar.update(1)
            if it % config.log_every == 0:
                mean = float(np.mean(window))
                losses.append(mean)
                window.clear()
                record = {"iteration": it, "elapsed_s": round(train_s, 2), "lr": lr_now, "l1": round(mean, 6)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(l1=f"{mean:.4f}")
        if window:
            losses.append(float(np.mean(window)))
        crops = val_crops(
            val, crops_per_image=config.val_crops_per_image, noise_sigma=config.noise_sigma, seed=config.seed
        )
        val_metrics = evaluate(trunk, decoder, crops)
        log.write(json.dumps({"iteration": it, "event": "val", **val_metrics}) + "\n")

    calib_rng = np.random.default_rng(config.seed + 2)
    calib = torch.from_numpy(
        np.stack([train.clean_crop(calib_rng) for _ in range(config.calibration_crops)])[:, None]
    )
    encoder.eval()
    scales = normalise_layers(encoder, calib)
    val_metrics["features_last"] = feature_stats(trunk, crops)  # after normalisation
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": "cxr-features",
        "what": (
            'Perceptual feature network for the GAN stage (perceptual = "cxr_features"): the encoder '
            "of a denoising autoencoder trained on chest X-rays, used instead of ImageNet VGG19, "
            "which needs a download. Not a diagnostic model."
        ),
        "architecture": {
            "builder": "model.train.nets.vgg_layers(CXR_FEATURES_CFG, 1)",
            "cfg": CXR_FEATURES_CFG,
            "in_channels": 1,
            "parameters": sum(p.numel() for p in encoder.parameters()),
            "input": "(B, 1, H, W) gray in [0, 1], no normalisation; H, W multiples of 8",
        },
        "layer": {
            "name": "last",
            "conv": "conv4_2",
            "index": last,
            "note": "features[: index + 1]: the final conv before its ReLU, 1/8 resolution, 128 channels",
        },
        "normalisation": {
            "method": (
                "per-layer scalar: each conv's pre-ReLU output has unit std on clean train crops; "
                "each scale is undone in the next conv, so every layer keeps its trained function"
            ),
            "calibration_crops": config.calibration_crops,
            "layer_std_before": [round(s, 6) for s in scales],
        },
        "training": {
            "data": (
                f"NIH ChestX-ray14, train split of {config.data_root} ({len(train.images)} images); "
                f"validation: val split ({len(val.images)} images)"
            ),
            "data_root": str(config.data_root),
            "train_images": len(train.images),
            "val_images": len(val.images),
            "images_skipped_too_small": train.too_small + val.too_small,
            "objective": (
                f"denoising autoencoder, L1 to the clean crop; input: with p={config.lr_input_prob} the "
                "paper's degradation (blur 1.0, bicubic x1/4, quantised) bicubic-upscaled back, "
                f"otherwise the crop + Gaussian noise sigma={config.noise_sigma}; decoder (3 x nearest "
                "upsample + conv, discarded) reads conv4_2 before its ReLU"
            ),
            "crop": config.crop,
            "batch_size": config.batch_size,
            "optimizer": f"Adam lr {config.lr} betas (0.9, 0.99), {config.warmup}-it warm-up, cosine decay",
            "iterations": it,
            "budget": {"iterations": config.iterations, "minutes": config.minutes},
            "train_loop_s": round(train_s, 1),
            "total_s": round(time.monotonic() - t_start, 1),
            "seed": config.seed,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "loss_l1": _loss_summary(losses),
            "log": str(config.log),
        },
        "metrics": {"val": val_metrics},
        "licence": LICENCE,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items() if k != "out"},
    }
    return save_features(encoder, Path(config.out), card)
