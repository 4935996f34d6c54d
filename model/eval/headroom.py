"""How much quality is there to win over bicubic? Oracles that know the HR image.

A 4x super-resolver can only be judged against what is reachable. These references are computed
from HR itself, so no network can be expected to pass the tighter ones:

- ``lowpass_lr_band``: HR with every frequency above the LR image's Nyquist limit removed (ideal,
  alias-free): what a reconstruction knows without priors;
- ``lowpass_half_band``: HR band-limited to half its own Nyquist limit;
- ``blur_sigma_<s>``: HR blurred by a Gaussian of ``s`` HR pixels.

Scores use the same PSNR/SSIM (4 px border), LR seeds and output quantisation as ``model eval``,
so the ``bicubic`` row equals its bicubic row. Checkpoints given are scored beside the oracles.

**Where SSIM is won or lost**: every local SSIM value is binned by how textured HR is there (HR's
standard deviation in SSIM's own window, in 8-bit grey levels), and each bin's share of the mean
is reported, so the shares of a method add up to its SSIM and the bins show which part of the
image a method gains its SSIM in, and which part an oracle still wins and it does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from model.data import check_scorable, read_gray
from model.degrade import Degradation, crop_to_scale, quantize
from model.eval.metrics import local_std, psnr, ssim_map
from model.eval.report import fmt
from model.eval.run import BICUBIC, SCALE, bicubic_x4, finite_or_none, method_names, select_images

BLUR_SIGMAS = (1.0, 0.7, 0.5)
# bin edges of HR's local standard deviation, in 8-bit grey levels (1/255 of the full range)
TEXTURE_EDGES = (1.0, 2.0, 4.0, 8.0)


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


def texture_bin_labels(edges: tuple[float, ...] = TEXTURE_EDGES) -> list[str]:
    bounds = [0.0, *edges]
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(bounds, edges, strict=False)] + [f">={edges[-1]:g}"]


def _checkpoint_methods(checkpoints: tuple[Path, ...]) -> dict[str, Any]:
    from model import inference

    loaded = [inference.load_generator(Path(p), "cpu") for p in checkpoints]
    names = method_names([(g.path, g.card.name) for g in loaded])
    return {name: inference.Upscaler(g, precision="fp32") for name, g in zip(names, loaded, strict=True)}


def headroom(
    data: Path,
    *,
    split: str | None = None,
    degradation: str = "paper",
    limit: int | None = None,
    seed: int = 0,
    checkpoints: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """Mean PSNR/SSIM of each oracle (and checkpoint) over the images, with the difference to
    bicubic, and every method's SSIM split by HR's local texture (``texture``)."""
    files, split_name, _ = select_images(Path(data), split)
    files = files[:limit] if limit else files
    if not files:
        raise FileNotFoundError(f"no images to score in {data} (split {split_name})")
    deg = Degradation.named(degradation)
    models = _checkpoint_methods(tuple(checkpoints))
    bins = len(TEXTURE_EDGES) + 1
    scores: dict[str, list[tuple[float, float]]] = {}
    ssim_sums: dict[str, list[np.ndarray]] = {}  # per image: sum of local SSIM per texture bin
    pixels: list[np.ndarray] = []  # per image: pixels per texture bin
    for index, path in enumerate(files):
        img, levels = read_gray(path)
        hr = crop_to_scale(check_scorable(path, img), SCALE)
        lr = deg(hr, np.random.default_rng(seed + index))
        texture = np.digitize(local_std(hr) * 255.0, TEXTURE_EDGES).ravel()
        pixels.append(np.bincount(texture, minlength=bins).astype(np.float64))
        outputs = oracles(hr, lr)
        outputs.update({name: up(lr) for name, up in models.items()})
        for name, img in outputs.items():
            img = quantize(img, levels)
            local = ssim_map(img, hr).ravel()
            ssim_sums.setdefault(name, []).append(np.bincount(texture, weights=local, minlength=bins))
            scores.setdefault(name, []).append((psnr(img, hr), float(local.mean())))
    means = {name: np.mean(v, axis=0) for name, v in scores.items()}
    base = means[BICUBIC]
    per_image = np.array(pixels)  # (images, bins)
    counts = per_image.sum(axis=0)
    sums = {name: np.array(s) for name, s in ssim_sums.items()}
    # an image's SSIM is its mean local SSIM, and the reported SSIM the mean over images, so bin
    # b's share of it is sum over images of (bin b's local SSIM sum / that image's pixel count) / N
    sizes = per_image.sum(axis=1, keepdims=True)
    shares = {name: (s / sizes).sum(axis=0) / len(files) for name, s in sums.items()}
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty bin; inf - inf of exact images
        bin_ssim = {name: s.sum(axis=0) / counts for name, s in sums.items()}
        return finite_or_none({
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
            "texture": {
                "what": "HR's local standard deviation in SSIM's window, 8-bit grey levels",
                "bins": texture_bin_labels(),
                "pixel_share": [round(float(c / counts.sum()), 4) for c in counts],
                "methods": {
                    name: {
                        "ssim": [round(float(v), 4) for v in bin_ssim[name]],  # NaN (empty bin): null
                        "delta_ssim_share": [round(float(v), 5) for v in shares[name] - shares[BICUBIC]],
                    }
                    for name in sums
                },
            },
        })


def format_headroom(result: dict[str, Any]) -> str:
    lines = [
        f"{result['images']} images, split {result['split']}, degradation {result['degradation']}",
        "",
        "| reference | PSNR (dB) | ΔPSNR | SSIM | ΔSSIM |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in result["methods"].items():
        cells = [fmt(m["psnr_db"], 2), fmt(m["delta_psnr_db"], 2, signed=True), fmt(m["ssim"], 4),
                 fmt(m["delta_ssim"], 4, signed=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    texture = result["texture"]
    lines += [
        "",
        "Where SSIM is won: each method's ΔSSIM over bicubic, split by how textured HR is",
        f"({texture['what']}); a row adds up to its ΔSSIM",
        "",
        "| reference | " + " | ".join(texture["bins"]) + " |",
        "|---|" + "---:|" * len(texture["bins"]),
        "| pixel share | " + " | ".join(f"{v:.1%}" for v in texture["pixel_share"]) + " |",
    ]
    for name, m in texture["methods"].items():
        if name != BICUBIC:
            lines.append(f"| {name} | " + " | ".join(fmt(v, 4, signed=True) for v in m["delta_ssim_share"]) + " |")
    return "\n".join(lines)
