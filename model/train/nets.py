"""Training-only networks: the VGG-style discriminator and the perceptual feature extractors.

Perceptual features never need a download:
- a path to standard torchvision VGG19 weights (``vgg19-dcbb9e9d.pth`` or any state dict with
  torchvision's ``features.N.weight`` keys) gives the paper's ImageNet VGG19 loss;
- ``random_vgg19``: the same VGG19 with fixed, seeded random weights (random deep features are a
  known working perceptual loss);
- ``cxr_features``: a small VGG-style encoder trained on the shared chest images as a denoising
  autoencoder (``model.train.features``), shipped as ``model/weights/cxr-features.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
CXR_FEATURES_CFG = [32, 32, "M", 64, 64, "M", 128, 128, "M", 128, 128]
CXR_FEATURES_PATH = Path(__file__).resolve().parent.parent / "weights" / "cxr-features.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg_layers(cfg: list, in_channels: int) -> nn.Sequential:
    """torchvision's VGG ``features`` layout (indices match its state-dict keys)."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
            c = int(v)
    return nn.Sequential(*layers)


def layer_index(cfg: list, name: str) -> int:
    """Index in ``features`` of convK_J *before* its ReLU (e.g. VGG19 conv5_4 -> 34)."""
    try:
        block, conv = (int(s) for s in name.removeprefix("conv").split("_"))
    except ValueError:
        raise ValueError(f"perceptual layer must look like 'conv5_4', got {name!r}") from None
    idx, b, j = 0, 1, 0
    for v in cfg:
        if v == "M":
            b, j = b + 1, 0
            idx += 1
            continue
        j += 1
        if (b, j) == (block, conv):
            return idx
        idx += 2
    raise ValueError(f"layer {name!r} does not exist in this network")


class FeatureExtractor(nn.Module):
    """Frozen features up to one layer (before ReLU); input (B, 1, H, W) gray in [0, 1]."""

    def __init__(self, features: nn.Sequential, *, last: int, imagenet_norm: bool) -> None:
        super().__init__()
        self.features = features[: last + 1]
        self.imagenet_norm = imagenet_norm
        in_ch = self.features[0].in_channels
        self.in_ch = in_ch
        if imagenet_norm:
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_ch == 3:
            x = x.expand(-1, 3, -1, -1)
        if self.imagenet_norm:
            x = (x - self.mean) / self.std
        return self.features(x)


def build_perceptual(spec: str, layer: str = "default", *, seed: int = 0) -> FeatureExtractor:
    if layer == "default":
        layer = "last" if spec == "cxr_features" else "conv5_4"
    if spec == "random_vgg19":
        gen = torch.Generator().manual_seed(seed)
        feats = vgg_layers(VGG19_CFG, 3)
        for m in feats:
            if isinstance(m, nn.Conv2d):  # torchvision's VGG init, seeded
                std = (2.0 / (m.out_channels * 9)) ** 0.5
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                    m.bias.zero_()
        return FeatureExtractor(feats, last=layer_index(VGG19_CFG, layer), imagenet_norm=True)
    if spec == "cxr_features":
        from safetensors.torch import load_file

        if not CXR_FEATURES_PATH.is_file():
            raise FileNotFoundError(
                f"{CXR_FEATURES_PATH} is missing; train it with `cxr-sr-node model train-features`"
            )
        feats = vgg_layers(CXR_FEATURES_CFG, 1)
        feats.load_state_dict(load_file(str(CXR_FEATURES_PATH)), strict=True)
        last = len(feats) - 2 if layer == "last" else layer_index(CXR_FEATURES_CFG, layer)
        return FeatureExtractor(feats, last=last, imagenet_norm=False)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"perceptual = {spec!r}: not 'random_vgg19', 'cxr_features' or an existing VGG19 weights file"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    feats = vgg_layers(VGG19_CFG, 3)
    try:
        feats.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not torchvision VGG19 weights ({exc})") from None
    return FeatureExtractor(feats, last=layer_index(VGG19_CFG, layer), imagenet_norm=True)


class Discriminator(nn.Module):
    """VGG-style discriminator (ESRGAN's, with adaptive pooling so any crop size works)."""

    def __init__(self, *, num_feat: int = 64, in_channels: int = 1) -> None:
        super().__init__()
        widths = [num_feat, num_feat * 2, num_feat * 4, num_feat * 8, num_feat * 8]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1), nn.LeakyReLU(0.2, True)]
        c = widths[0]
        for i, w in enumerate(widths):
            if i:
                layers += [nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.LeakyReLU(0.2, True)]
            layers += [nn.Conv2d(w, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.LeakyReLU(0.2, True)]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * 16, 100), nn.LeakyReLU(0.2, True), nn.Linear(100, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) -> (B, 1)
        return self.head(self.features(x))


def relativistic_loss(real: torch.Tensor, fake: torch.Tensor, *, for_generator: bool) -> torch.Tensor:
    """Relativistic average GAN loss (ESRGAN)."""
    real_rel = real - fake.mean()
    fake_rel = fake - real.mean()
    if for_generator:
        return (
            F.binary_cross_entropy_with_logits(real_rel, torch.zeros_like(real_rel))
            + F.binary_cross_entropy_with_logits(fake_rel, torch.ones_like(fake_rel))
        ) / 2
    return (
        F.binary_cross_entropy_with_logits(real_rel, torch.ones_like(real_rel))
        + F.binary_cross_entropy_with_logits(fake_rel, torch.zeros_like(fake_rel))
    ) / 2
