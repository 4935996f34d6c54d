"""Training configuration, read from TOML into frozen dataclasses (unknown keys are errors)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from model.arch import ArchConfig
from model.degrade import Degradation

PIXEL_LOSSES = ("l1", "l1_ssim")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    root: str = "../shared/data/cxr_png/nih"
    hr_crop: int = 128
    batch_size: int = 6


@dataclass(frozen=True, kw_only=True)
class PsnrStage:
    iterations: int = 0
    lr: float = 2e-4
    pixel_loss: str = "l1"
    ssim_weight: float = 0.0  # l1_ssim: loss = l1 + ssim_weight * (1 - SSIM)
    schedule: str = "cosine"  # cosine | constant
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"psnr.pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"psnr.schedule must be cosine or constant, got {self.schedule!r}")


@dataclass(frozen=True, kw_only=True)
class GanStage:
    iterations: int = 0
    lr: float = 1e-4
    pixel_weight: float = 1e-2
    perceptual_weight: float = 1.0
    adversarial_weight: float = 5e-3
    # "random_vgg19" (fixed, seeded random VGG19), "cxr_features" (small net trained on the shared
    # chest images, see model.train.features), or a path to standard torchvision VGG19 weights.
    perceptual: str = "cxr_features"
    perceptual_layer: str = "default"  # default: conv5_4 for VGG19 (ESRGAN), "last" for cxr_features
    disc_feat: int = 64


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    name: str
    version: str = "0.1.0"
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    ema: float = 0.999
    val_every: int = 500
    val_images: int = 0  # 0 = all val images
    save_every: int = 250
    log_every: int = 10
    init_from: str = ""  # a .safetensors checkpoint to fine-tune from
    # torch.compile the generator's training forward. The paper config on an H200: 7.5 it/s eager,
    # 44-46 it/s with compile_mode "reduce-overhead" after ~100 s of compiling (~30 s on CPU for a
    # tiny net); the saved weights are the same either way.
    compile: bool = False
    # torch.compile's mode: "default", "reduce-overhead" (CUDA graphs: fewer kernel launches, the
    # likely fix for a launch-bound net) or "max-autotune-no-cudagraphs"
    compile_mode: str = "default"
    licence: str = "Apache-2.0 (weights trained on NIH ChestX-ray14 images: NIH terms, attribution)"
    arch: ArchConfig = field(default_factory=ArchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: Degradation = field(default_factory=Degradation)
    psnr: PsnrStage = field(default_factory=PsnrStage)
    gan: GanStage = field(default_factory=GanStage)

    def __post_init__(self) -> None:
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if self.compile_mode not in modes:
            raise ValueError(f"compile_mode {self.compile_mode!r}: use one of {', '.join(modes)}")
        if self.psnr.iterations < 0 or self.gan.iterations < 0:
            raise ValueError("iterations must be >= 0")
        if self.psnr.iterations + self.gan.iterations == 0:
            raise ValueError("psnr.iterations + gan.iterations must be > 0")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")

    @property
    def total_iterations(self) -> int:
        return self.psnr.iterations + self.gan.iterations


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        f = known[key]
        default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        if isinstance(value, dict) and is_dataclass(default):
            kwargs[key] = _build(type(default), value, f"{where}.{key}" if where else key)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where or 'config'}: {exc}") from None


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML training config; ``overrides`` uses dotted keys (``{"psnr.iterations": 2}``)."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return _build(TrainConfig, data, str(path))


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """Rebuild a config from ``dataclasses.asdict`` output (e.g. the one saved in ``state.pt``)."""
    return _build(TrainConfig, data, where)
