"""``model.data``: bit depth from the file, a patient-level split, aligned training crops."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data import (
    CropSampler,
    check_scorable,
    group_key,
    group_keys,
    levels_of,
    list_images,
    load_gray,
    read_gray,
    split_files,
    split_of,
)
from model.degrade import Degradation

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr_png" / "nih"

needs_nih = pytest.mark.skipif(not (NIH / "train").is_dir(), reason=f"shared chest X-ray data not at {NIH}")


def test_8bit_png_is_scaled_by_255(tmp_path):
    arr = np.array([[0, 51, 255]], np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = load_gray(tmp_path / "a.png")
    assert img.dtype == np.float32
    np.testing.assert_allclose(img, [[0.0, 0.2, 1.0]], atol=1e-7)


def test_dark_16bit_png_keeps_its_bit_depth(tmp_path):
    arr = np.array([[0, 100, 200]], np.uint16)  # a dark 16-bit file: max 200, read as 12-bit
    Image.fromarray(arr).save(tmp_path / "dark16.png")
    img, levels = read_gray(tmp_path / "dark16.png")
    assert img.dtype == np.float32 and levels == 4095 == levels_of(tmp_path / "dark16.png")
    np.testing.assert_allclose(img, [[0.0, 100 / 4095, 200 / 4095]], rtol=1e-6)
    assert img.max() < 0.1  # not 200/255: a 16-bit file is never read as 8-bit


def test_12bit_data_in_a_16bit_png_fills_the_range(tmp_path):
    # detector data: 12 bits stored in a 16-bit container (DICOM BitsStored 12)
    arr = np.array([[0, 2048, 4095]], np.uint16)
    Image.fromarray(arr).save(tmp_path / "x12.png")
    img, levels = read_gray(tmp_path / "x12.png")
    assert levels == 4095
    np.testing.assert_allclose(img, [[0.0, 2048 / 4095, 1.0]], rtol=1e-6)
    Image.fromarray(np.array([[0, 4096]], np.uint16)).save(tmp_path / "x16.png")
    assert read_gray(tmp_path / "x16.png")[1] == 65535  # one level above 12 bits: 16-bit


def test_unreadable_and_tiny_images_are_named(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.png: cannot be read as an image .*replace or remove it"):
        load_gray(tmp_path / "empty.png")
    Image.fromarray(np.zeros((3, 40), np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match=r"tiny\.png is 40x3 px: too small"):
        check_scorable(tmp_path / "tiny.png", load_gray(tmp_path / "tiny.png"))


def test_full_range_16bit_png(tmp_path):
    arr = np.array([[0, 32768, 65535]], np.uint16)
    Image.fromarray(arr).save(tmp_path / "full16.png")
    np.testing.assert_allclose(load_gray(tmp_path / "full16.png"), [[0.0, 32768 / 65535, 1.0]], rtol=1e-6)


def test_rgb_is_converted_to_luma(tmp_path):
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (90, 90, 90)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")
    img = load_gray(tmp_path / "rgb.png")
    assert img.shape == (1, 3) and img.dtype == np.float32
    # ITU-R 601 luma (what PIL's "L" conversion computes), not the red channel
    np.testing.assert_allclose(img, [[76 / 255, 150 / 255, 90 / 255]], atol=1.5 / 255)


def test_float_images_are_refused(tmp_path):
    Image.fromarray(np.ones((4, 4), np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="floating-point"):
        load_gray(tmp_path / "f.tif")


@needs_nih
def test_nih_folder_uses_its_own_split_without_overlap():
    splits = {s: split_files(NIH, s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 220, "val": 25, "test": 25}
    for s, files in splits.items():
        assert all(p.parent == NIH / s for p in files)
    names = {s: {p.name for p in v} for s, v in splits.items()}
    patients = {s: {group_key(p) for p in v} for s, v in splits.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not names[a] & names[b]
        assert not patients[a] & patients[b]


def test_split_rejects_an_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="'holdout'"):
        split_files(tmp_path, "holdout")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nowhere")


def test_a_partial_split_folder_is_refused_not_read_as_flat(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / split / f"{split}_000.png")
    for split in ("train", "val", "test"):
        with pytest.raises(ValueError, match=r"has train/, val/ but no test/: .*needs all three folders"):
            split_files(tmp_path, split)
    (tmp_path / "test").mkdir()  # an empty test/ is fine
    assert [p.name for p in split_files(tmp_path, "val")] == ["val_000.png"]
    assert split_files(tmp_path, "test") == []


def test_folder_per_patient_layout_keeps_each_patient_in_one_split(tmp_path):
    # CheXpert-like: patientN/studyM/viewK_<frontal|lateral>.png; names repeat across patients
    files = []
    for n in range(60):
        for study in (1, 2):
            for view in ("view1_frontal", "view2_lateral"):
                path = tmp_path / f"patient{n:05d}" / f"study{study}" / f"{view}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
                files.append(path)
    keys = group_keys(tmp_path, files)
    assert keys[files[0]] == "patient00000/"
    splits = {s: split_files(tmp_path, s) for s in ("train", "val", "test")}
    assert sum(len(v) for v in splits.values()) == 240 and all(splits.values())  # none empty
    owners = {}
    for s, v in splits.items():
        for path in v:
            assert owners.setdefault(path.relative_to(tmp_path).parts[0], s) == s  # one split per patient
    # a data set in one shared folder (covid_figure1/images/...) is still keyed by file name
    flat = [tmp_path / "images" / "COVID-00003a.jpg", tmp_path / "images" / "COVID-00003b.jpg"]
    assert group_keys(tmp_path, flat) == {flat[0]: "COVID-00003", flat[1]: "COVID-00003"}


def test_flat_folder_hash_split_keeps_each_patient_in_one_split(tmp_path):
    tiny = Image.fromarray(np.zeros((2, 2), np.uint8))
    for patient in range(300):
        for followup in range(2):
            tiny.save(tmp_path / f"{patient:05d}_{followup:03d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    splits = {s: split_files(tmp_path, s) for s in ("train", "val", "test")}
    assert sum(len(v) for v in splits.values()) == 600
    seen: dict[str, str] = {}
    for s, files in splits.items():
        for p in files:
            assert seen.setdefault(group_key(p), s) == s, f"patient {group_key(p)} in two splits"
    counts = {s: len(v) for s, v in splits.items()}
    assert 400 < counts["train"] < 560 and counts["val"] > 20 and counts["test"] > 20
    # deterministic: the same files land in the same split every time, and by name alone
    assert {s: split_files(tmp_path, s) for s in splits} == splits
    assert split_of(Path("elsewhere/00042_007.png")) == split_of(tmp_path / "00042_000.png")
    assert group_key(Path("00001_001.png")) == "00001" and group_key(Path("scan.png")) == "scan"


def test_figure1_covid_variants_of_one_patient_share_a_split():
    """COVID-00003a and COVID-00003b are one patient (metadata.csv lists COVID-00003 once)."""
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr_png" / "covid_figure1" / "images"
    if not folder.is_dir():
        pytest.skip(f"shared data not at {folder}")
    by_patient: dict[str, set[str]] = {}
    for path in folder.iterdir():
        patient = re.match(r"COVID-\d+", path.stem).group(0)
        by_patient.setdefault(patient, set()).add(split_of(path))
    assert sum(len(v) > 1 for v in by_patient.values()) == 0
    assert any(len(list(folder.glob(f"{p}?.*"))) > 1 for p in by_patient)  # the case is really there
    assert group_key(Path("COVID-00003b.jpg")) == "COVID-00003" and group_key(Path("T1a_2.png")) == "T1"


@pytest.fixture(scope="module")
def nih_pair() -> list[Path]:
    if not (NIH / "train").is_dir():
        pytest.skip(f"shared chest X-ray data not at {NIH}")
    return sorted((NIH / "train").glob("*.png"))[:2]


def test_crop_sampler_yields_aligned_pairs(nih_pair):
    deg = Degradation()
    sampler = CropSampler(nih_pair, deg, hr_crop=64, seed=3)
    hr, lr = sampler.batch(6)
    assert hr.shape == (6, 1, 64, 64) and lr.shape == (6, 1, 16, 16)
    assert hr.dtype == np.float32 and lr.dtype == np.float32
    assert hr.flags.c_contiguous and lr.flags.c_contiguous
    for h, low in zip(hr[:, 0], lr[:, 0], strict=True):
        direct = deg(np.ascontiguousarray(h))  # degrade the HR crop on its own
        interior = (slice(3, -3), slice(3, -3))  # blur + bicubic reach ~3 LR px past the crop edge
        assert np.abs(direct[interior] - low[interior]).max() <= 1.01 / 255
        # a one-pixel misalignment would be visible (these seeded crops all have structure)
        shifted = np.roll(direct, 1, axis=1)
        assert np.abs(shifted[interior] - low[interior]).max() > 3 / 255


def test_crop_sampler_state_reproduces_the_batch(nih_pair):
    sampler = CropSampler(nih_pair, Degradation(name="lowdose"), hr_crop=64, seed=0)
    sampler.batch(2)
    state = sampler.state()
    hr1, lr1 = sampler.batch(3)
    hr_next, _ = sampler.batch(3)
    sampler.set_state(state)
    hr2, lr2 = sampler.batch(3)
    np.testing.assert_array_equal(hr1, hr2)
    np.testing.assert_array_equal(lr1, lr2)  # including the low-dose noise
    assert not np.array_equal(hr1, hr_next)


def test_crop_sampler_refuses_what_it_cannot_use(tmp_path, nih_pair):
    with pytest.raises(ValueError, match="multiple of the scale"):
        CropSampler(nih_pair, Degradation(), hr_crop=66)
    with pytest.raises(ValueError, match="no training images"):
        CropSampler([], Degradation())
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="at least 64 px"):
        CropSampler([tmp_path / "small.png"], Degradation(), hr_crop=64)
