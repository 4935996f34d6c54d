"""How much quality is there to win over bicubic? Oracles that know the HR image.

A 4x super-resolver can only be judged against what is reachable. These references are computed
from HR itself, so no network can be expected to pass the tighter ones:

- ``lowpass_lr_band``: HR with every frequency above the LR image's Nyquist limit removed (ideal,
  alias-free): what a reconstruction knows without priors;
- ``lowpass_half_band``: HR band-limited to half its own Nyquist limit;
- ``blur_sigma_<s>``: HR blurred by a Gaussian of ``s`` HR pixels.

Scores use the same PSNR/SSIM (4 px border), LR seeds and output quantisation as ``model eval``,
so the ``bicubic`` row equals its bicubic row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from model.data import levels_of, load_gray
from model.degrade import Degradation, crop_to_scale, quantize
from model.eval.metrics import psnr, ssim
from model.eval.run import SCALE, bicubic_x4, select_images

BLUR_SIGMAS = (1.0, 0.7, 0.5)


def band_limit(img: np.ndarray, fraction: float) -> np.ndarray:
    """Keep the frequencies below ``fraction`` of the Nyquist limit on both axes (ideal low-pass)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    spectrum = np.fft.rfft2(img.astype(np.float64))
    fy = np.abs(np.fft.fftfreq(img.shape[0]))[:, None]
    fx = np.fft.rfftfreq(img.shape[1])[None, :]
    spectrum[(fy > 0.5 * fraction) | (fx > 0.5 * fraction)] = 0
    return np.fft.irfft2(spectrum, s=img.shape).astype(np.float32)


def oracles(hr: np.ndarray, lr: np.ndarray) -> dict[str, np.ndarray]:
    out = {
        "bicubic": bicubic_x4(lr),
        "lowpass_lr_band": band_limit(hr, 1 / SCALE),
        "lowpass_half_band": band_limit(hr, 0.5),
    }
    for sigma in BLUR_SIGMAS:
        out[f"blur_sigma_{sigma:g}"] = gaussian_filter(hr, sigma)
    return out


def headroom(
    data: Path, *, split: str | None = None, degradation: str = "paper", limit: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Mean PSNR/SSIM of each oracle over the images, with the difference to bicubic."""
    files, split_name, _ = select_images(Path(data), split)
    files = files[:limit] if limit else files
    if not files:
        raise FileNotFoundError(f"no images to score in {data} (split {split_name})")
    deg = Degradation.named(degradation)
    scores: dict[str, list[tuple[float, float]]] = {}
    for index, path in enumerate(files):
        hr = crop_to_scale(load_gray(path), SCALE)
        lr = deg(hr, np.random.default_rng(seed + index))
        levels = levels_of(path)
        for name, img in oracles(hr, lr).items():
            img = quantize(img, levels)
            scores.setdefault(name, []).append((psnr(img, hr), ssim(img, hr)))
    means = {name: np.mean(v, axis=0) for name, v in scores.items()}
    base = means["bicubic"]
    return {
        "degradation": degradation,
        "split": split_name,
        "images": len(files),
        "methods": {
            name: {
                "psnr_db": round(float(m[0]), 3),
                "ssim": round(float(m[1]), 4),
                "delta_psnr_db": round(float(m[0] - base[0]), 3),
                "delta_ssim": round(float(m[1] - base[1]), 4),
            }
            for name, m in means.items()
        },
    }


def format_headroom(result: dict[str, Any]) -> str:
    lines = [
        f"{result['images']} images, split {result['split']}, degradation {result['degradation']}",
        "",
        "| reference | PSNR (dB) | ΔPSNR | SSIM | ΔSSIM |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {m['psnr_db']:.2f} | {m['delta_psnr_db']:+.2f} | {m['ssim']:.4f} | {m['delta_ssim']:+.4f} |")
    return "\n".join(lines)
