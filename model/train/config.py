"""Training configuration, read from TOML into frozen dataclasses (unknown keys are errors)."""

from __future__ import annotations

import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from model.arch import ArchConfig
from model.degrade import Degradation

PIXEL_LOSSES = ("l1", "l1_ssim")


def _check_stage(lr: float, warmup: int) -> None:
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be > 0, got {lr}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    root: str = "../shared/data/cxr_png/nih"
    hr_crop: int = 128
    batch_size: int = 6

    def __post_init__(self) -> None:
        if self.hr_crop < 32 or self.hr_crop % 4:
            raise ValueError(f"hr_crop must be a multiple of 4 and >= 32, got {self.hr_crop}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True, kw_only=True)
class PsnrStage:
    iterations: int = 0
    lr: float = 2e-4
    pixel_loss: str = "l1"
    ssim_weight: float = 0.0  # l1_ssim: loss = l1 + ssim_weight * (1 - SSIM)
    schedule: str = "cosine"  # cosine | constant
    warmup: int = 0

    def __post_init__(self) -> None:
        _check_stage(self.lr, self.warmup)
        if self.ssim_weight < 0:
            raise ValueError(f"ssim_weight must be >= 0, got {self.ssim_weight}")
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")


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

    def __post_init__(self) -> None:
        _check_stage(self.lr, 0)
        if self.disc_feat < 1:
            raise ValueError(f"disc_feat must be >= 1, got {self.disc_feat}")


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
        for key in ("val_every", "save_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (iterations), got {getattr(self, key)}")
        if self.val_images < 0:
            raise ValueError(f"val_images must be >= 0 (0 = every val image), got {self.val_images}")

    @property
    def total_iterations(self) -> int:
        return self.psnr.iterations + self.gan.iterations


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _typed(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the field's type (an int is a valid float), or a ValueError naming the key."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    if not all(t in _TYPE_NAMES or t is type(None) for t in allowed):
        return value  # a type this check does not know: the dataclass validates it
    wanted = " or ".join(_TYPE_NAMES[t] for t in allowed if t in _TYPE_NAMES)
    raise ValueError(f"{key} must be {wanted}, got {value!r}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        f = known[key]
        default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        if isinstance(value, dict) and is_dataclass(default):
            kwargs[key] = _build(type(default), value, f"{where}.{key}" if where else key)
        else:
            try:
                kwargs[key] = _typed(value, hints[key], key)
            except ValueError as exc:
                raise ValueError(f"{where or 'config'}: {exc}") from None
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
