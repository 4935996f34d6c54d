"""LPIPS (Zhang et al., CVPR 2018), AlexNet variant v0.1, from two local weight files.

Nothing is downloaded: the user supplies

* ``backbone``: a torchvision AlexNet state dict (``alexnet-owt-7be5be79.pth``, or any file with the
  same ``features.{0,3,6,8,10}.{weight,bias}`` tensors; ``classifier.*`` is ignored), and
* ``linear``: the LPIPS v0.1 linear-layer weights ``lpips/weights/v0.1/alex.pth`` from the ``lpips``
  PyPI package (``lin{0..4}.model.1.weight``, shapes ``(1, C, 1, 1)``).

The computation follows ``lpips.LPIPS(net="alex", version="0.1")``: inputs in [-1, 1] go through
the scaling layer, AlexNet's five ReLU outputs are normalised along channels, squared differences
are weighted by the 1x1 linear heads, averaged over space and summed over layers. Gray images are
replicated to three channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

# (index in torchvision's ``alexnet().features``, in, out, kernel): the five convolutions
ALEX_CONVS = ((0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3), (10, 256, 256, 3))
CHANNELS = tuple(c[2] for c in ALEX_CONVS)  # 64, 192, 384, 256, 256
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LpipsError(ValueError):
    """A weights file that cannot serve LPIPS; the message names the file and what is wrong."""


class AlexFeatures(nn.Module):
    """torchvision's ``alexnet().features`` (same module indices, so the same state-dict keys),
    returning the five ReLU outputs LPIPS compares."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (B, 3, H, W) -> 5 × (B, C_k, h_k, w_k)
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (1, 4, 7, 9, 11):  # relu1 … relu5
                outs.append(x)
        return outs


def _normalize(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return feat / (torch.sqrt(torch.sum(feat**2, dim=1, keepdim=True)) + eps)


def _read_state(path: Path, role: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LpipsError(f"LPIPS {role} file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch / safetensors raise many types for a bad file
        raise LpipsError(f"LPIPS {role} file {path} is not a readable state dict ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LpipsError(f"LPIPS {role} file {path} does not hold a state dict of tensors")
    return state


def _backbone_state(path: Path) -> dict[str, torch.Tensor]:
    state = _read_state(path, "backbone")
    if state and not any(k.startswith("features.") for k in state):  # saved from alexnet().features
        state = {f"features.{k}": v for k, v in state.items()}
    expected = AlexFeatures().state_dict()
    out = {}
    for key, ref in expected.items():
        if key not in state:
            raise LpipsError(
                f"LPIPS backbone file {path} lacks tensor {key!r}; it must be a torchvision AlexNet "
                "state dict (features.0 … features.10)"
            )
        if state[key].shape != ref.shape:
            raise LpipsError(
                f"LPIPS backbone file {path}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                f"AlexNet expects {tuple(ref.shape)}; is this an AlexNet state dict?"
            )
        out[key] = state[key].float()
    extra = sorted(k for k in state if k not in expected and not k.startswith("classifier."))
    if extra:
        raise LpipsError(f"LPIPS backbone file {path} has unexpected tensor {extra[0]!r} ({len(extra)} unexpected)")
    return out


def _linear_state(path: Path) -> list[torch.Tensor]:
    state = _read_state(path, "linear")
    weights = []
    for k, channels in enumerate(CHANNELS):
        keys = [key for key in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight") if key in state]
        if not keys:
            raise LpipsError(
                f"LPIPS linear file {path} lacks tensor 'lin{k}.model.1.weight'; it must be the v0.1 "
                "alex.pth from the lpips package"
            )
        w = state[keys[0]]
        if tuple(w.shape) != (1, channels, 1, 1):
            raise LpipsError(
                f"LPIPS linear file {path}: {keys[0]!r} has shape {tuple(w.shape)}, expected "
                f"(1, {channels}, 1, 1) (AlexNet heads); is this the alex.pth file?"
            )
        weights.append(w.float())
    return weights


class LPIPS(nn.Module):
    """LPIPS-Alex v0.1. ``forward(a, b)`` takes (B, 3, H, W) in [-1, 1] and returns (B,) distances."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])
        self.net = AlexFeatures()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)

    @classmethod
    def from_files(cls, *, backbone: Path, linear: Path, device: str | torch.device = "cpu") -> LPIPS:
        module = cls()
        module.net.load_state_dict(_backbone_state(backbone), strict=True)
        for lin, w in zip(module.lins, _linear_state(linear), strict=True):
            lin.weight.data.copy_(w)
        for p in module.parameters():
            p.requires_grad_(False)
        return module.to(device).eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Channel-normalised AlexNet features of (B, 3, H, W) inputs in [-1, 1]."""
        return [_normalize(f) for f in self.net((x - self.shift) / self.scale)]

    def distance(self, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:  # -> (B,)
        total = 0
        for lin, a, b in zip(self.lins, fa, fb, strict=True):
            total = total + lin((a - b) ** 2).mean(dim=(2, 3))  # (B, 1)
        return total[:, 0]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.distance(self.features(a), self.features(b))


class GrayLpips:
    """LPIPS on float (H, W) numpy images in [0, 1]: replicated to 3 channels, scaled to [-1, 1].

    ``reference(hr)`` computes the HR features once, so each method costs one AlexNet pass."""

    def __init__(self, *, backbone: Path, linear: Path, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.module = LPIPS.from_files(backbone=backbone, linear=linear, device=self.device)
        self.files = (Path(backbone), Path(linear))

    def _input(self, img: np.ndarray) -> torch.Tensor:
        if img.ndim != 2:
            raise ValueError(f"expected a 2-D (H, W) image, got shape {img.shape}")
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).to(self.device)
        return (x * 2 - 1)[None, None].expand(1, 3, *img.shape)  # (1, 3, H, W)

    @torch.inference_mode()
    def reference(self, hr: np.ndarray) -> list[torch.Tensor]:
        return self.module.features(self._input(hr))

    @torch.inference_mode()
    def score(self, sr: np.ndarray, reference: list[torch.Tensor]) -> float:
        return float(self.module.distance(self.module.features(self._input(sr)), reference)[0])

    def __call__(self, sr: np.ndarray, hr: np.ndarray) -> float:
        return self.score(sr, self.reference(hr))
