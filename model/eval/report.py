"""What an evaluation run writes besides ``metrics.json``: the per-image CSV, the Markdown report
and side-by-side PNG crops (LR nearest-upscaled | bicubic | each checkpoint | HR)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SEPARATOR_PX = 2
CSV_COLUMNS = ("image", "method", "psnr_db", "ssim", "lpips", "hf_ratio", "s")


def fmt(value: float | None, digits: int, *, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—" if value is None else str(value)
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.4g}"


def report_table(metrics: dict[str, Any]) -> str:
    """The Markdown results table: one row per method, deltas against bicubic."""
    methods = metrics["methods"]
    base = methods["bicubic"]
    lines = [
        "| method | PSNR (dB) | ΔPSNR (dB) | SSIM | ΔSSIM | LPIPS | HF ratio | s/image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def delta(name: str, key: str) -> float | None:
        # None where either mean is undefined (an image HR equals exactly: infinite PSNR)
        if name == "bicubic" or methods[name][key] is None or base[key] is None:
            return None
        return methods[name][key] - base[key]

    for name, m in methods.items():
        d_psnr, d_ssim = delta(name, "psnr_db"), delta(name, "ssim")
        lines.append(
            f"| {name} | {fmt(m['psnr_db'], 2)} | {fmt(d_psnr, 2, signed=True)} | {fmt(m['ssim'], 4)} | "
            f"{fmt(d_ssim, 4, signed=True)} | {fmt(m['lpips'], 4)} | {fmt(m['hf_ratio'], 3)} | "
            f"{_fmt_time(m['s_per_image'])} |"
        )
    return "\n".join(lines)


def markdown_report(
    metrics: dict[str, Any],
    *,
    settings: dict[str, Any],
    checkpoints: Sequence[dict[str, Any]],
    crops: Sequence[dict[str, Any]],
) -> str:
    """The whole ``report.md``: data and settings, the table, the checkpoints, the crops."""
    lines = [
        "# 4x super-resolution of chest X-rays: evaluation",
        "",
        f"- data: `{metrics['data']}`, split `{metrics['split']}` ({settings['selection']}), "
        f"{metrics['images']} images",
        f"- degradation: `{metrics['degradation']}` ({settings['degradation']})",
        "- metrics: PSNR and SSIM on the gray channel with a 4-px border crop (SSIM: Gaussian window "
        "11×11, σ = 1.5); every output is quantised to the HR's levels first, like a saved image. "
        "HF ratio = Laplacian energy of the output over that of HR (1 = as much fine detail as HR; "
        "noise raises it too). " + settings["lpips"],
        f"- run: device `{settings['device']}` (torch threads: {settings['threads']}), tile "
        f"{settings['tile']} px, overlap {settings['overlap']} px, precision `{settings['precision']}`, "
        f"LR noise seed {settings['seed']} + image index; s/image is the mean forward time "
        "(no file I/O, no metrics); bicubic is torch `F.interpolate(mode=\"bicubic\", "
        "align_corners=False)` ×4, the generator's global skip path",
        "",
        report_table(metrics),
        "",
    ]
    if checkpoints:
        lines += ["## Checkpoints", ""]
        for c in checkpoints:
            lines.append(
                f"- **{c['method']}**: `{c['checkpoint']}`, sha256 `{c['sha256'][:16]}…`, "
                f"{c['parameters']:,} parameters, version {c['version']}, {c['iterations']} iterations, "
                f"trained with degradation `{c['trained_degradation'] or 'unknown'}`"
            )
        lines.append("")
    if crops:
        order = " | ".join(["LR (nearest ×4)", *metrics["methods"], "HR"])
        lines += [
            "## Crops",
            "",
            f"`crops/<image>.png`, left to right: {order}; {SEPARATOR_PX}-px white separators, "
            "8-bit, 1 HR pixel = 1 PNG pixel. The region is the one with the most HR gradient energy "
            "in the central half of the image.",
            "",
        ]
        for c in crops:
            lines.append(f"- `{c['file']}`: {c['size']}×{c['size']} HR px at y={c['y']}, x={c['x']}")
        lines.append("")
    return "\n".join(lines)


def write_per_image_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in CSV_COLUMNS})


def choose_crop(hr: np.ndarray, *, size: int = 128, scale: int = 4, step: int = 16) -> tuple[int, int, int]:
    """(y, x, size) of the ``size``² region with the highest gradient energy in the central half.

    Positions are multiples of ``scale`` so the region maps exactly onto LR pixels; ties go to the
    first position, so the choice is deterministic. Images smaller than ``size`` get a smaller crop.
    """
    h, w = hr.shape
    size = min(size, h, w) // scale * scale
    if size < scale:
        raise ValueError(f"image {hr.shape} is too small for a crop")
    img = hr.astype(np.float64)
    energy = np.zeros((h, w))
    energy[1:, :] += np.diff(img, axis=0) ** 2
    energy[:, 1:] += np.diff(img, axis=1) ** 2
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def starts(length: int) -> list[int]:
        lo, hi = length // 4, length - length // 4  # the central half
        if hi - lo < size:
            lo, hi = 0, length
        lo = -(-lo // scale) * scale
        return list(range(lo, hi - size + 1, step)) or [lo]

    best, best_yx = -1.0, (0, 0)
    for y in starts(h):
        for x in starts(w):
            e = integral[y + size, x + size] - integral[y, x + size] - integral[y + size, x] + integral[y, x]
            if e > best:
                best, best_yx = e, (y, x)
    return best_yx[0], best_yx[1], size


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def crop_panel(
    lr: np.ndarray, outputs: Sequence[np.ndarray], hr: np.ndarray, *, y: int, x: int, size: int, scale: int = 4
) -> np.ndarray:
    """LR (nearest-upscaled) | each output | HR, cut at (y, x, size) in HR pixels, as 8-bit."""
    ly, lx, ls = y // scale, x // scale, size // scale
    lr_up = np.repeat(np.repeat(lr[ly : ly + ls, lx : lx + ls], scale, axis=0), scale, axis=1)
    tiles = [lr_up, *(o[y : y + size, x : x + size] for o in outputs), hr[y : y + size, x : x + size]]
    sep = np.full((size, SEPARATOR_PX), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, tile in enumerate(tiles):
        if i:
            parts.append(sep)
        parts.append(_to_uint8(tile))
    return np.concatenate(parts, axis=1)  # (size, n·size + (n-1)·SEPARATOR_PX)


def save_crop(path: Path, panel: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel).save(path)  # 2-D uint8 -> mode L
