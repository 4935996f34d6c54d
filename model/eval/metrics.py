"""Image-quality metrics on the gray channel, with a border crop, as SR papers report them.

SSIM is scikit-image's implementation with the settings of Wang et al. (2004) (Gaussian window
σ = 1.5, population covariance, K1 = 0.01, K2 = 0.03), which is what BasicSR and MATLAB's
``ssim`` compute; a test pins it against pytorch-msssim, an independent implementation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.metrics import structural_similarity

BORDER = 4


def _crop(img: np.ndarray, border: int) -> np.ndarray:
    return img[border:-border, border:-border] if border else img


def _check(sr: np.ndarray, hr: np.ndarray) -> None:
    if sr.shape != hr.shape or sr.ndim != 2:
        raise ValueError(f"need two 2-D images of the same shape, got {sr.shape} and {hr.shape}")


def psnr(sr: np.ndarray, hr: np.ndarray, *, border: int = BORDER, data_range: float = 1.0) -> float:
    _check(sr, hr)
    diff = _crop(sr, border).astype(np.float64) - _crop(hr, border).astype(np.float64)
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


SSIM_SIGMA = 1.5
# the rim scikit-image leaves out of the SSIM mean: half its Gaussian window (truncate 3.5 σ)
SSIM_RIM = int(3.5 * SSIM_SIGMA + 0.5)


def _wang_ssim(sr: np.ndarray, hr: np.ndarray, border: int, data_range: float, *, full: bool) -> Any:
    _check(sr, hr)
    return structural_similarity(
        _crop(hr, border).astype(np.float64),
        _crop(sr, border).astype(np.float64),
        data_range=data_range,
        gaussian_weights=True,
        sigma=SSIM_SIGMA,
        use_sample_covariance=False,
        full=full,
    )


def ssim(sr: np.ndarray, hr: np.ndarray, *, border: int = BORDER, data_range: float = 1.0) -> float:
    return float(_wang_ssim(sr, hr, border, data_range, full=False))


def ssim_map(sr: np.ndarray, hr: np.ndarray, *, border: int = BORDER, data_range: float = 1.0) -> np.ndarray:
    """The local SSIM values whose mean :func:`ssim` reports (border crop, then the window's rim)."""
    return _crop(_wang_ssim(sr, hr, border, data_range, full=True)[1], SSIM_RIM)


def local_std(hr: np.ndarray, *, border: int = BORDER) -> np.ndarray:
    """HR's standard deviation in SSIM's Gaussian window, on the pixels of :func:`ssim_map`."""
    from scipy.ndimage import gaussian_filter

    img = _crop(hr, border).astype(np.float64)
    mean = gaussian_filter(img, SSIM_SIGMA, truncate=3.5)
    var = gaussian_filter(img * img, SSIM_SIGMA, truncate=3.5) - mean * mean
    return _crop(np.sqrt(np.maximum(var, 0.0)), SSIM_RIM)


def high_frequency_ratio(sr: np.ndarray, hr: np.ndarray, *, border: int = BORDER) -> float:
    """Laplacian energy of SR over that of HR: 1.0 = as much fine detail as HR, < 1 = blurrier.

    A no-download stand-in for a perceptual sharpness figure (not a quality score: noise raises it)."""
    from scipy.ndimage import laplace

    _check(sr, hr)
    e_sr = float(np.mean(laplace(_crop(sr, border).astype(np.float64)) ** 2))
    e_hr = float(np.mean(laplace(_crop(hr, border).astype(np.float64)) ** 2))
    return e_sr / e_hr if e_hr else float("nan")
