"""An evaluation run: bicubic and one or more checkpoints on the same degraded images.

For each image: HR = the file (cropped to a multiple of 4), LR = the named degradation of HR with
``np.random.default_rng(seed + index)`` (the same LR for every method; with ``--seed`` equal to a
training config's ``seed``, the same LR as that run's validation), then every method upscales LR x4. Outputs are quantised to the HR's
levels (255 for 8-bit files, 65535 for 16-bit) before scoring, like a saved image. Bicubic is
torch's ``F.interpolate(mode="bicubic", align_corners=False)``, which is exactly the generator's
global skip path, so a zero-residual model scores the same as bicubic.

Results: ``metrics.json`` (means per method), ``per_image.csv``, ``report.md`` and
``crops/<image>.png`` in the output folder. :func:`evaluate` returns the ``metrics.json`` dict.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model import inference
from model.arch import count_parameters
from model.data import SPLITS, check_scorable, list_images, read_gray, shipped_splits, split_files
from model.degrade import Degradation, crop_to_scale, quantize
from model.eval import report
from model.eval.metrics import high_frequency_ratio, psnr, ssim

SCALE = 4
BICUBIC = "bicubic"


def bicubic_x4(lr: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Torch bicubic x4 of a float32 (H, W) image, clipped to [0, 1] (the generator's skip path)."""
    x = torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32))[None, None].to(device)
    with torch.inference_mode():
        up = F.interpolate(x, scale_factor=SCALE, mode="bicubic", align_corners=False)
        return up[0, 0].clamp(0, 1).cpu().numpy()


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One evaluation run. ``checkpoints=()`` evaluates bicubic only.

    ``split=None`` means ``test`` for a data folder with train/val/test subfolders, and every image
    for a flat folder; a named split of a flat folder is the hash split of :func:`model.data.split_of`.
    """

    data: Path
    checkpoints: tuple[Path, ...] = ()
    split: str | None = None
    degradation: str = "paper"
    dose_scale: float | None = None  # overrides the named degradation's (lowdose, mixed)
    read_noise: float | None = None
    limit: int | None = None
    out: Path | None = None
    tile: int = 256
    overlap: int = 16
    precision: inference.Precision = "auto"
    device: str = "auto"
    lpips_files: tuple[Path, Path] | None = None  # (AlexNet backbone, LPIPS v0.1 linear heads)
    crops: int = 4  # side-by-side crops for the first N images
    crop_px: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "checkpoints", tuple(Path(c) for c in self.checkpoints))
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (or None), got {self.split!r}")
        self.make_degradation()  # raises, naming the valid choices or the bad parameter
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for every image), got {self.limit}")
        if self.tile < 8 or self.overlap < 0:
            raise ValueError(f"need tile >= 8 and overlap >= 0, got tile={self.tile}, overlap={self.overlap}")
        if self.crops < 0 or self.crop_px < SCALE or self.crop_px % SCALE:
            raise ValueError(
                f"need crops >= 0 and crop_px a positive multiple of {SCALE}, got crops={self.crops}, "
                f"crop_px={self.crop_px}"
            )
        resolved = [c.resolve() for c in self.checkpoints]
        for i, c in enumerate(resolved):
            if c in resolved[:i]:
                raise ValueError(f"checkpoint {self.checkpoints[i]} is given twice")
        if self.lpips_files is not None:
            if len(self.lpips_files) != 2:
                raise ValueError("lpips_files must be (backbone, linear): two paths")
            object.__setattr__(self, "lpips_files", tuple(Path(p) for p in self.lpips_files))

    def make_degradation(self) -> Degradation:
        given = {"dose_scale": self.dose_scale, "read_noise": self.read_noise}
        overrides = {k: v for k, v in given.items() if v is not None}
        if overrides and self.degradation == "paper":
            raise ValueError(
                "dose_scale / read_noise apply to the lowdose and mixed degradations, not to paper"
            )
        return Degradation.named(self.degradation, **overrides)


@dataclass
class _Method:
    name: str
    upscale: Callable[[np.ndarray], np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)  # checkpoint, sha256, parameters
    card: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


def select_images(data: Path, split: str | None) -> tuple[list[Path], str, str]:
    """(files, split label, how they were chosen)."""
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist or is not a folder")
    if shipped_splits(data):
        split = split or "test"
        return split_files(data, split), split, f"the `{split}/` subfolder"
    if split is None:
        return list_images(data), "all", "every image in the folder"
    return split_files(data, split), split, "hash split by patient key (model.data.group_keys)"


def default_checkpoint() -> Path:
    path = inference.DEFAULT_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint was given and the default checkpoint {path} does not exist yet; train "
            "one (cxr-sr-node model train model/configs/cpu.toml) or pass --checkpoint FILE"
        )
    return path


def method_names(cards: Sequence[tuple[Path, str]]) -> list[str]:
    """Card names made unique: a shared name (or one equal to 'bicubic') gets the file stem
    appended, or ``folder/stem`` where stems collide too (``runs/a/best``, ``runs/b/best``)."""

    def label(path: Path, name: str, depth: int) -> str:
        if depth == 0:
            return name
        parts = path.resolve().with_suffix("").parts
        return f"{name} ({'/'.join(parts[-depth:])})"

    names = [name for _, name in cards]
    out = []
    for path, name in cards:
        if names.count(name) == 1 and name != BICUBIC:
            out.append(name)
            continue
        rivals = [p for p, n in cards if n == name and p != path]
        depth, most = 1, len(path.resolve().parts)
        while depth < most and any(label(path, name, depth) == label(p, name, depth) for p in rivals):
            depth += 1
        out.append(label(path, name, depth))
    return out


def _build_methods(config: EvalConfig, device: torch.device) -> list[_Method]:
    methods = [_Method(BICUBIC, lambda lr: bicubic_x4(lr, device))]
    loaded = [inference.load_generator(p, device) for p in config.checkpoints]
    names = method_names([(g.path, g.card.name) for g in loaded])
    for name, gen in zip(names, loaded, strict=True):
        up = inference.Upscaler(gen, tile=config.tile, overlap=config.overlap, precision=config.precision)
        methods.append(
            _Method(
                name,
                up,
                info={
                    "checkpoint": str(gen.path.resolve()),
                    "sha256": gen.card.sha256,
                    "parameters": count_parameters(gen.net),
                },
                card={
                    "version": gen.card.version,
                    "iterations": gen.card.iterations,
                    "trained_degradation": gen.card.degradation.get("name"),
                },
            )
        )
    return methods


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(values))


def finite_or_none(obj: Any) -> Any:
    """JSON has no inf/nan: a PSNR of identical images (inf) becomes null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


def run(config: EvalConfig, *, progress: bool = False) -> dict[str, Any]:
    """Evaluate; write the report files when ``config.out`` is set; return the metrics dict."""
    files, split_label, selection = select_images(config.data, config.split)
    if config.limit:
        files = files[: config.limit]
    if not files:
        raise ValueError(f"no images to evaluate in {config.data} (split {split_label})")
    device = inference.resolve_device(config.device)
    degradation = config.make_degradation()
    methods = _build_methods(config, device)
    lpips = None
    if config.lpips_files is not None:
        from model.eval.lpips import GrayLpips

        lpips = GrayLpips(backbone=config.lpips_files[0], linear=config.lpips_files[1], device=device)

    crops: list[dict[str, Any]] = []
    per_image: list[dict[str, Any]] = []
    iterator = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="eval", unit="image")
    base = config.data / split_label if shipped_splits(config.data) else config.data
    if config.out is not None:  # crops of an earlier run in the same folder would pass for this run's
        for old in (config.out / "crops").glob("*.png"):
            old.unlink()
    for index, path in enumerate(iterator):
        # named by their path below the data folder: two sites' "img.png" stay two rows and two crops
        label = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.name
        img, levels = read_gray(path)
        hr = crop_to_scale(check_scorable(path, img), SCALE)
        lr = degradation(hr, np.random.default_rng(config.seed + index))
        if index == 0:  # warm-up, so the first image's time is not the allocator's
            for m in methods:
                m.upscale(lr[:32, :32])
        reference = lpips.reference(hr) if lpips else None
        outputs = []
        for m in methods:
            t0 = time.perf_counter()
            sr = m.upscale(lr)
            elapsed = time.perf_counter() - t0
            sr = quantize(sr, levels)
            row = {
                "image": label,
                "method": m.name,
                "psnr_db": psnr(sr, hr),
                "ssim": ssim(sr, hr),
                "lpips": lpips.score(sr, reference) if lpips else None,
                "hf_ratio": high_frequency_ratio(sr, hr),
                "s": elapsed,
            }
            m.rows.append(row)
            per_image.append(row)
            outputs.append(sr)
        if config.out is not None and index < config.crops:
            y, x, size = report.choose_crop(hr, size=config.crop_px, scale=SCALE)
            name = "crops/" + label.rsplit(".", 1)[0].replace("/", "__") + ".png"
            report.save_crop(config.out / name, report.crop_panel(lr, outputs, hr, y=y, x=x, size=size))
            crops.append({"file": name, "y": y, "x": x, "size": size})

    metrics: dict[str, Any] = {
        "degradation": degradation.name,
        "degradation_settings": asdict(degradation),
        "images": len(files),
        "split": split_label,
        "data": str(config.data.resolve()),
        "methods": {},
    }
    for m in methods:
        metrics["methods"][m.name] = {
            "psnr_db": _mean([r["psnr_db"] for r in m.rows]),
            "ssim": _mean([r["ssim"] for r in m.rows]),
            "lpips": _mean([r["lpips"] for r in m.rows]),
            "hf_ratio": _mean([r["hf_ratio"] for r in m.rows]),
            "s_per_image": _mean([r["s"] for r in m.rows]),
            **m.info,
        }
    metrics = finite_or_none(metrics)

    if config.out is not None:
        out = config.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        report.write_per_image_csv(out / "per_image.csv", per_image)
        settings = {
            "selection": selection,
            "degradation": _describe(degradation),
            "lpips": (
                f"LPIPS: AlexNet v0.1 (backbone `{config.lpips_files[0]}`, linear heads "
                f"`{config.lpips_files[1]}`), gray replicated to 3 channels, whole image."
                if config.lpips_files
                else "LPIPS: not computed (give --lpips-backbone and --lpips-linear)."
            ),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "tile": config.tile,
            "overlap": config.overlap,
            "precision": config.precision,
            "seed": config.seed,
        }
        checkpoints = [{"method": m.name, **m.info, **m.card} for m in methods[1:]]
        text = report.markdown_report(metrics, settings=settings, checkpoints=checkpoints, crops=crops)
        (out / "report.md").write_text(text)
    return metrics


def _describe(d: Degradation) -> str:
    text = f"Gaussian blur σ={d.blur_sigma}, bicubic ×1/{d.scale}"
    if d.name == "lowdose":
        text += f", Poisson noise at dose scale {d.dose_scale:g} + Gaussian read noise σ={d.read_noise:g}"
    elif d.name == "mixed":
        text += (
            f", per image: clean with probability {d.clean_fraction:g}, else Poisson noise at a dose scale "
            f"log-uniform in [{d.dose_scale:g}, {d.dose_max:g}] + Gaussian read noise σ uniform in "
            f"[0, {d.read_noise:g}]"
        )
    return text + f", LR quantised to {d.quantize_levels} levels"


def evaluate(
    checkpoints: Sequence[Path] | None,
    data: Path,
    *,
    split: str | None = None,
    degradation: str = "paper",
    dose_scale: float | None = None,
    read_noise: float | None = None,
    limit: int | None = None,
    out: Path | None = None,
    tile: int = 256,
    overlap: int = 16,
    lpips_files: tuple[Path, Path] | None = None,
    precision: inference.Precision = "auto",
    device: str = "auto",
    crops: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate bicubic and ``checkpoints`` (``None``: the node's default checkpoint; ``[]``: bicubic
    only) on ``data``; write the report to ``out`` if given; return the ``metrics.json`` dict."""
    paths = [default_checkpoint()] if checkpoints is None else list(checkpoints)
    config = EvalConfig(
        data=data,
        checkpoints=tuple(paths),
        split=split,
        degradation=degradation,
        dose_scale=dose_scale,
        read_noise=read_noise,
        limit=limit,
        out=out,
        tile=tile,
        overlap=overlap,
        precision=precision,
        device=device,
        lpips_files=lpips_files,
        crops=crops,
        seed=seed,
    )
    return run(config, progress=progress)
