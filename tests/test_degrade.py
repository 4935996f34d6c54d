"""``model.degrade``: the paper's blur + bicubic, quantisation, and Poisson low-dose noise."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from model.degrade import Degradation, add_low_dose_noise, crop_to_scale


def _hr(h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth-ish float32 image in [0, 1] with structure at several scales."""
    rng = np.random.default_rng(seed)
    img = gaussian_filter(rng.random((h, w)), 2.0) + 0.1 * rng.random((h, w))
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def _reference_lr(hr: np.ndarray) -> np.ndarray:
    """The paper's degradation computed here from scipy and PIL directly: σ=1 Gaussian blur,
    PIL's bicubic to a quarter of each side, rounded to 255 levels."""
    blurred = gaussian_filter(hr.astype(np.float32), sigma=1.0, mode="reflect", truncate=4.0)
    h, w = hr.shape
    small = Image.fromarray(blurred, mode="F").resize((w // 4, h // 4), Image.Resampling.BICUBIC)
    return (np.round(np.clip(np.asarray(small), 0, 1) * 255) / 255).astype(np.float32)


def test_paper_degradation_shape_dtype_and_range():
    lr = Degradation()(_hr(64, 96))
    assert lr.shape == (16, 24) and lr.dtype == np.float32
    assert lr.min() >= 0.0 and lr.max() <= 1.0
    assert lr.std() > 0.05  # not flattened to a constant


def test_paper_degradation_equals_blur_then_pil_bicubic():
    hr = _hr(128, 96)
    lr = Degradation()(hr)
    np.testing.assert_array_equal(lr, _reference_lr(hr))
    # the blur is really applied: without it the result is measurably different
    no_blur = Degradation(blur_sigma=0.0)(hr)
    assert np.abs(no_blur - lr).max() > 2 / 255


def test_lr_is_quantised_to_255_levels():
    lr = Degradation()(_hr())
    codes = lr.astype(np.float64) * 255
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert len(np.unique(np.round(codes))) > 50
    clean = Degradation().clean_lr(_hr())
    assert not np.allclose(clean * 255, np.round(clean * 255), atol=1e-3)  # clean_lr is not quantised


def test_hr_sides_must_be_multiples_of_four():
    with pytest.raises(ValueError, match="multiples of the scale 4"):
        Degradation()(np.zeros((30, 32), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        Degradation()(np.zeros((2, 32, 32), np.float32))
    assert crop_to_scale(np.zeros((30, 33))).shape == (28, 32)


def test_lowdose_is_seeded():
    deg = Degradation(name="lowdose")
    hr = _hr()
    a = deg(hr, np.random.default_rng(7))
    b = deg(hr, np.random.default_rng(7))
    c = deg(hr, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0
    assert np.abs(a - Degradation()(hr)).mean() > 1 / 255  # noise on top of the paper's LR


def test_lowdose_without_rng_is_refused():
    with pytest.raises(ValueError, match="rng"):
        Degradation(name="lowdose")(_hr())


@pytest.mark.parametrize("dose_scale", [500.0, 2000.0])
def test_lowdose_noise_variance_grows_linearly_with_signal(dose_scale):
    """Poisson photon noise + Gaussian read noise: var(noisy - clean) = s / dose_scale + read_noise²."""
    read_noise = 0.004
    deg = Degradation(name="lowdose", dose_scale=dose_scale, read_noise=read_noise, quantize_levels=65535)
    rng = np.random.default_rng(0)
    levels = np.array([0.05, 0.2, 0.4, 0.7])
    measured_direct, measured_pipeline = [], []
    for s in levels:
        flat = np.full((256, 256), s, np.float32)
        noisy = add_low_dose_noise(flat, dose_scale=dose_scale, read_noise=read_noise, rng=rng)
        assert noisy.dtype == np.float32
        assert abs(float(noisy.mean()) - s) < 5 * np.sqrt(s / dose_scale / flat.size) + 1e-4  # unbiased
        measured_direct.append(np.var(noisy.astype(np.float64) - s))
        lr = deg(np.full((1024, 1024), s, np.float32), rng)  # blur + bicubic + noise + quantise
        assert lr.shape == (256, 256)
        measured_pipeline.append(np.var(lr.astype(np.float64) - s))
    expected = levels / dose_scale + read_noise**2
    np.testing.assert_allclose(measured_direct, expected, rtol=0.05)
    np.testing.assert_allclose(measured_pipeline, expected, rtol=0.05)
    slope = np.polyfit(levels, measured_pipeline, 1)[0]
    assert slope == pytest.approx(1 / dose_scale, rel=0.05)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"name": "highdose"}, "highdose"),
        ({"blur_sigma": -1.0}, "blur_sigma"),
        ({"blur_sigma": float("nan")}, "blur_sigma"),
        ({"dose_scale": 0.0}, "dose_scale"),
        ({"read_noise": -0.1}, "read_noise"),
        ({"quantize_levels": 0}, "quantize_levels"),
        ({"quantize_levels": 2.5}, "quantize_levels"),
        ({"scale": 2}, "scale"),
        ({"name": "mixed", "dose_scale": 5000.0, "dose_max": 4000.0}, "dose_max"),
        ({"name": "mixed", "clean_fraction": 1.5}, "clean_fraction"),
        ({"name": "mixed", "clean_fraction": float("nan")}, "clean_fraction"),
    ],
)
def test_invalid_parameters_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Degradation(**kwargs)


def test_mixed_covers_clean_and_the_lowdose_setting_and_is_seeded():
    """The dose-blind degradation: a share of clean images, the rest noisy with a dose drawn from
    [dose_scale, dose_max], so the noise variance of each draw lies between the two extremes."""
    deg = Degradation.named("mixed")
    lowdose = Degradation.named("lowdose")
    assert deg.dose_scale <= lowdose.dose_scale <= deg.dose_max and deg.read_noise >= lowdose.read_noise
    s = 0.5
    flat = np.full((512, 512), s, np.float32)
    clean = Degradation()(flat)
    variances = []
    for seed in range(200):
        lr = deg(flat, np.random.default_rng(seed))
        np.testing.assert_array_equal(lr, deg(flat, np.random.default_rng(seed)))
        variances.append(float(np.var(lr.astype(np.float64) - clean)))
    variances = np.array(variances)
    clean_share = float(np.mean(variances == 0))
    assert abs(clean_share - deg.clean_fraction) < 0.1  # 200 Bernoulli draws: sd 0.03
    noisy = variances[variances > 0]
    assert noisy.max() < 1.1 * (s / deg.dose_scale + deg.read_noise**2)  # never noisier than the lowest dose
    assert noisy.min() > 0.9 * (s / deg.dose_max)  # never cleaner than the highest dose, unless clean
    assert np.percentile(noisy, 90) > 4 * np.percentile(noisy, 10)  # a range of doses, not one


def test_mixed_without_rng_is_refused():
    with pytest.raises(ValueError, match="rng"):
        Degradation.named("mixed")(_hr())
