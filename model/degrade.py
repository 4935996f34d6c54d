"""The paper's degradation (Gaussian blur σ=1.0, then bicubic x¼) and its low-dose variant.

All functions take and return float32 arrays in [0, 1] (H, W). Bicubic here is PIL's
antialiased bicubic on float ("F") images: it is the classic MATLAB-style ``imresize`` kernel,
runs in C and needs no torch.

Low dose: the LR image is treated as proportional to the detected signal, so photon noise is
``Poisson(dose_scale · x) / dose_scale`` (variance ``x / dose_scale``, growing with the signal as
Poisson statistics predict), plus Gaussian read noise of standard deviation ``read_noise``. A
smaller ``dose_scale`` means fewer photons and more noise. Noise is applied to the LR image (what
a low-dose acquisition records), then the result is quantised like a stored image.

Domain (a deliberate deviation from DESIGN §6, which says "in the linear domain"): the noise is
added to the image's own grey values, not to detector-linear signal. The training images are
NIH ChestX-ray14 PNGs, already processed for display by unknown, per-image curves (log transform,
windowing, unsharp masking) with no calibration to undo, so any "linearisation" would be a guess
dressed up as physics. What is exact is what the tests check: the noise variance is
``x / dose_scale + read_noise²`` in the domain the network sees, and the node feeds the network the
same kind of domain (DICOM modality values mapped linearly by their robust range,
``cxr_sr_node.pixels``). With raw detector data (linear in dose, before the display curve) the
same functions apply unchanged, and the result would then be physical.

Mixed ("blind"): for a node that is not told the dose. Each image (each training crop) is clean
with probability ``clean_fraction``; otherwise it gets low-dose noise with a dose scale drawn
log-uniformly from [``dose_scale``, ``dose_max``] and a read noise drawn uniformly from
[0, ``read_noise``]. Its defaults (``NOISE_DEFAULTS``) give a range that contains the "lowdose" setting
(dose 2000, read noise 0.004) and reaches nearly noise-free 8-bit images (dose 1e5: noise σ ≈ 0.6
grey level at mid-grey).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

SCALE = 4
BLUR_SIGMA = 1.0
# Each setting's noise parameters where they are not given; "mixed" spans a range that contains the
# "lowdose" setting (paper has no noise; its values only fill the card).
NOISE_DEFAULTS = {
    "paper": {"dose_scale": 2000.0, "read_noise": 0.004},
    "lowdose": {"dose_scale": 2000.0, "read_noise": 0.004},
    "mixed": {"dose_scale": 1000.0, "read_noise": 0.006},
}
NAMES = tuple(NOISE_DEFAULTS)


@dataclass(frozen=True, kw_only=True)
class Degradation:
    """How LR images are made from HR ones; stored in the model card."""

    name: str = "paper"  # "paper" | "lowdose" | "mixed"
    blur_sigma: float = BLUR_SIGMA
    scale: int = SCALE
    # None = the named setting's value (NOISE_DEFAULTS)
    dose_scale: float | None = None  # expected photons at signal 1.0 (lowdose; mixed: the lowest dose)
    read_noise: float | None = None  # std of Gaussian read noise, [0, 1] units (lowdose; mixed: the most)
    quantize_levels: int = 255  # LR is rounded to this many levels, like a stored 8-bit image
    dose_max: float = 1e5  # mixed only: the highest dose scale
    clean_fraction: float = 0.25  # mixed only: share of images with no noise at all

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"degradation name must be one of {', '.join(NAMES)}, got {self.name!r}")
        for key, value in NOISE_DEFAULTS[self.name].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        for key, ok, expected in (
            ("blur_sigma", self.blur_sigma >= 0, ">= 0"),
            ("dose_scale", self.dose_scale > 0, "> 0"),
            ("read_noise", self.read_noise >= 0, ">= 0"),
            ("dose_max", self.name != "mixed" or self.dose_max >= self.dose_scale,
             f">= dose_scale ({self.dose_scale})"),
            ("clean_fraction", 0 <= self.clean_fraction <= 1, "in [0, 1]"),
        ):
            if not ok:  # also catches NaN
                raise ValueError(f"{key} must be {expected}, got {getattr(self, key)!r}")
        levels = self.quantize_levels
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"quantize_levels must be a positive integer, got {levels!r}")
        if self.scale != SCALE:
            raise ValueError(f"scale must be {SCALE}, got {self.scale}")

    @classmethod
    def named(cls, name: str, **overrides: float) -> Degradation:
        """The named setting with any field overridden, e.g. ``named("lowdose", dose_scale=8000)``."""
        return cls(name=name, **overrides)

    def clean_lr(self, hr: np.ndarray) -> np.ndarray:
        """Blur + bicubic, unquantised (float32, [0, 1]). HR sides must be multiples of scale."""
        return blur_downscale(hr, sigma=self.blur_sigma, scale=self.scale)

    def finish(self, lr: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """Add low-dose noise (if any) to a clean LR image and quantise it."""
        if self.name != "paper":
            if rng is None:
                raise ValueError(f"{self.name} degradation needs a seeded numpy Generator (rng)")
            dose, read = self.dose_scale, self.read_noise
            if self.name == "mixed":
                if rng.random() < self.clean_fraction:
                    return quantize(lr, self.quantize_levels)
                dose = float(np.exp(rng.uniform(np.log(self.dose_scale), np.log(self.dose_max))))
                read = float(rng.uniform(0.0, self.read_noise))
            lr = add_low_dose_noise(lr, dose_scale=dose, read_noise=read, rng=rng)
        return quantize(lr, self.quantize_levels)

    def __call__(self, hr: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return self.finish(self.clean_lr(hr), rng)


def _check_image(img: np.ndarray, scale: int = 1) -> None:
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image (H, W), got shape {img.shape}")
    if img.shape[0] % scale or img.shape[1] % scale:
        raise ValueError(f"image sides {img.shape} must be multiples of the scale {scale}")


def gaussian_blur(img: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    _check_image(img)
    if sigma == 0:
        return img.astype(np.float32, copy=True)
    return gaussian_filter(img.astype(np.float32), sigma, mode="reflect", truncate=4.0)


def bicubic_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic (antialiased when shrinking) on a float32 image."""
    _check_image(img)
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def blur_downscale(hr: np.ndarray, *, sigma: float = BLUR_SIGMA, scale: int = SCALE) -> np.ndarray:
    _check_image(hr, scale)
    h, w = hr.shape
    return bicubic_resize(gaussian_blur(hr, sigma), h // scale, w // scale)


def add_low_dose_noise(
    lr: np.ndarray, *, dose_scale: float, read_noise: float, rng: np.random.Generator
) -> np.ndarray:
    signal = np.clip(lr, 0.0, None).astype(np.float64)
    noisy = rng.poisson(signal * dose_scale) / dose_scale
    noisy = noisy + rng.normal(0.0, read_noise, size=lr.shape)
    return noisy.astype(np.float32)


def quantize(img: np.ndarray, levels: int) -> np.ndarray:
    return (np.round(np.clip(img, 0.0, 1.0) * levels) / levels).astype(np.float32)


def crop_to_scale(img: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """Crop the bottom/right edge so both sides are multiples of ``scale``."""
    h, w = img.shape
    return img[: h - h % scale, : w - w % scale]
