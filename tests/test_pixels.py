"""Pixel mapping: exact round trips, polarity, bit depth, resampling and the output VOI."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxr_sr_node.pixels import PixelMapping, decode, from_unit, resample_to_fit, to_unit, voi_for_output
from tests.dicom_helpers import chest, other, require_data

require_data()

# (reader, file, BitsStored): 8-, 10-, 12- and 15-bit, MONOCHROME1 and 2, rescale and LUT sequence.
ROUND_TRIP_FILES = [
    pytest.param(chest, "test1.dcm", 8, id="8-bit DX MONOCHROME2"),
    pytest.param(chest, "CR-MONO1-10-chest.dcm", 10, id="10-bit CR MONOCHROME1 no File Meta"),
    pytest.param(other, "CR-ModalitySequenceLUT.dcm", 10, id="10-bit MONOCHROME1 Modality LUT Sequence"),
    pytest.param(other, "6154", 12, id="12-bit MONOCHROME1 rescale 0.684/200"),
    pytest.param(chest, "RG1_J2KI.dcm", 15, id="15-bit CR MONOCHROME1 JPEG 2000"),
]


def _modality_values(ds: pydicom.Dataset) -> np.ndarray:
    return np.asarray(apply_modality_lut(decode(ds), ds), dtype=np.float64)


def _output_dataset(source: pydicom.Dataset, mapping: PixelMapping) -> pydicom.Dataset:
    """The VOI-relevant part of what derive writes: MONOCHROME2, its BitsStored and rescale."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = mapping.stored_bits
    ds.PixelRepresentation = 0
    if mapping.storage is not None:
        ds.RescaleSlope, ds.RescaleIntercept = mapping.storage.slope, mapping.storage.intercept
    for keyword, value in voi_for_output(source, mapping).items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(("reader", "name", "bits_stored"), ROUND_TRIP_FILES)
def test_round_trip_reproduces_the_source_values(reader, name, bits_stored):
    ds = reader(name)
    unit, mapping = to_unit(ds)
    assert unit.dtype == np.float32 and unit.shape == (ds.Rows, ds.Columns)
    inside = (unit >= 0.0) & (unit <= 1.0)  # the robust range is [0, 1]; the map does not clip
    assert 0.97 < inside.mean() < 1.0
    assert mapping.bits_stored == bits_stored and mapping.out_max == 2**bits_stored - 1

    out = from_unit(unit, mapping)
    values = _modality_values(ds)
    expected = mapping.out_max - values if mapping.invert else values  # MONOCHROME1 flips
    assert out.dtype == np.uint16
    step = 1.0
    if mapping.storage is not None:  # fractional modality steps (6154: slope 0.684) are stored as such
        step = mapping.storage.slope
        out = out * mapping.storage.slope + mapping.storage.intercept
        assert mapping.stored_bits == bits_stored
    # every pixel, the ~1 % beyond the robust range included (metal, markers, collimated air)
    assert np.abs(out.astype(np.float64) - expected).max() <= step / 2 + 1e-6
    assert out.max() <= mapping.out_max


@pytest.mark.parametrize("name", ["CR-MONO1-10-chest.dcm", "RG1_J2KI.dcm"])
def test_monochrome1_is_inverted_for_the_model_so_bone_is_bright(name):
    ds = chest(name)
    unit, mapping = to_unit(ds)
    assert mapping.invert
    stored = _modality_values(ds)
    assert np.corrcoef(unit.ravel(), stored.ravel())[0, 1] < -0.95


def test_a_16_bit_image_with_small_values_is_not_treated_as_8_bit():
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 201, size=(64, 48), dtype=np.uint16)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality = "DX"
    ds.set_pixel_data(stored, "MONOCHROME2", 16)
    unit, mapping = to_unit(ds)
    assert mapping.bits_stored == 16 and mapping.out_max == 65535
    out = from_unit(unit, mapping)
    assert np.abs(out.astype(int) - stored).max() <= 1
    assert out.max() <= 201  # still on the source scale: not stretched to 255 or 65535
    assert "BitsStored 16 (0-65535)" in mapping.describe()


def test_from_unit_maps_beyond_the_robust_range_and_clips_only_to_bits_stored():
    mapping = PixelMapping(low=100.0, high=900.0, invert=False, bits_stored=10)
    out = from_unit(np.array([[-0.5, -0.1, 0.0, 0.5, 1.0, 1.1, 1.7]], dtype=np.float32), mapping)
    assert out.tolist() == [[0, 20, 100, 500, 900, 980, 1023]]
    inverted = PixelMapping(low=100.0, high=900.0, invert=True, bits_stored=10)
    # unit 1.0 = brightest = lowest MONOCHROME1 value 100 -> MONOCHROME2 1023 - 100
    assert from_unit(np.array([[1.0, 0.0]], dtype=np.float32), inverted).tolist() == [[923, 123]]
    with pytest.raises(ValueError, match="non-finite"):
        from_unit(np.array([[np.nan]], dtype=np.float32), mapping)


def test_pixel_mapping_is_valid_once_constructed():
    with pytest.raises(ValueError, match="high > low"):
        PixelMapping(low=5.0, high=5.0, invert=False, bits_stored=8)
    with pytest.raises(ValueError, match="bits_stored"):
        PixelMapping(low=0.0, high=5.0, invert=False, bits_stored=17)


def test_resample_to_fit_reports_the_true_ratios():
    img = np.linspace(0, 1, 782 * 736, dtype=np.float32).reshape(782, 736)
    out, row_ratio, col_ratio = resample_to_fit(img, 410)
    assert out.shape == (410, 386)  # 736 * 410 / 782 = 385.9
    assert (row_ratio, col_ratio) == (410 / 782, 386 / 736)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.dtype == np.float32


def test_resample_to_fit_leaves_an_image_that_fits_alone():
    img = np.full((300, 200), 0.25, dtype=np.float32)
    out, row_ratio, col_ratio = resample_to_fit(img, 300)
    assert out is img and (row_ratio, col_ratio) == (1.0, 1.0)
    smaller, _, _ = resample_to_fit(img, 150)
    assert smaller.shape == (150, 100)
    assert np.allclose(smaller, 0.25)


def _source_display(ds: pydicom.Dataset, modality_values: np.ndarray, index: int = 0) -> np.ndarray:
    """What a viewer shows for the source: VOI, then MONOCHROME1 inversion, scaled to [0, 1]."""
    shown = apply_voi_lut(modality_values, ds, index=index).astype(np.float64)
    ymax = 2 ** int(ds.BitsStored) - 1
    return (ymax - shown) / ymax if ds.PhotometricInterpretation == "MONOCHROME1" else shown / ymax


@pytest.mark.parametrize("function", [None, "LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_monochrome1_windows_are_mirrored_exactly(function):
    source = chest("CR-MONO1-10-chest.dcm")
    source.WindowCenter, source.WindowWidth = [550, 300.5], [1024, 401]
    source.WindowCenterWidthExplanation = ["NORMAL", "NARROW"]
    if function:
        source.VOILUTFunction = function
    mapping = PixelMapping(low=0.0, high=1023.0, invert=True, bits_stored=10)
    out_ds = _output_dataset(source, mapping)
    assert list(out_ds.WindowWidth) == [1024, 401]
    assert list(out_ds.WindowCenterWidthExplanation) == ["NORMAL", "NARROW"]

    values = np.arange(1024, dtype=np.uint16).reshape(32, 32)
    for index in (0, 1):
        expected = _source_display(source, values, index)
        shown = apply_voi_lut(mapping.out_max - values, out_ds, index=index) / mapping.out_max
        assert np.allclose(shown, expected, atol=1e-9), f"window {index}"


def test_monochrome2_windows_are_carried_unchanged():
    source = chest("test1.dcm")
    source.WindowCenter, source.WindowWidth = 128, 200
    mapping = PixelMapping(low=0.0, high=255.0, invert=False, bits_stored=8)
    voi = voi_for_output(source, mapping)
    assert voi["WindowCenter"] == [128] and voi["WindowWidth"] == [200]


def _with_voi_lut(ds: pydicom.Dataset) -> pydicom.Dataset:
    if not ds.file_meta.get("TransferSyntaxUID"):  # the headerless file: pydicom needs the byte order
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    first, entries, bits = 100, 801, 12
    curve = np.round((2**bits - 1) * np.linspace(0, 1, entries) ** 0.6).astype("<u2")
    item = pydicom.Dataset()
    item.LUTDescriptor = [entries, first, bits]
    item.add_new("LUTData", "OW", curve.tobytes())
    item.LUTExplanation = "GAMMA"
    ds.VOILUTSequence = [item]
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


@pytest.mark.parametrize("name", ["CR-MONO1-10-chest.dcm", "test1.dcm"])
def test_voi_lut_sequence_is_carried_and_reversed_for_monochrome1(name):
    source = _with_voi_lut(chest(name))
    bits_stored = int(source.BitsStored)
    mapping = PixelMapping(low=0.0, high=2.0**bits_stored - 1, invert=source.PhotometricInterpretation == "MONOCHROME1", bits_stored=bits_stored)
    out_ds = _output_dataset(source, mapping)
    assert out_ds.VOILUTSequence[0].LUTExplanation == "GAMMA"

    values = np.arange(mapping.out_max + 1, dtype=np.uint16)
    output_values = mapping.out_max - values if mapping.invert else values
    lut_max = 2**12 - 1
    src_shown = apply_voi_lut(values, source).astype(np.float64)
    expected = (lut_max - src_shown) if mapping.invert else src_shown
    assert np.array_equal(apply_voi_lut(output_values, out_ds).astype(np.float64), expected)


def test_without_windows_the_robust_range_fills_the_display():
    source = chest("CR-MONO1-10-chest.dcm")
    del source.WindowCenter, source.WindowWidth
    mapping = PixelMapping(low=120.0, high=900.0, invert=True, bits_stored=10)
    out_ds = _output_dataset(source, mapping)
    # MONOCHROME1 value 900 (darkest in range) -> output 123 -> black; 120 -> 903 -> white
    shown = apply_voi_lut(np.array([122, 123, 513, 903, 904], dtype=np.uint16), out_ds)
    assert shown.tolist()[0:2] == [0, 0] and shown.tolist()[3:] == [1023, 1023]
    assert 0 < shown[2] < 1023


@pytest.mark.parametrize("name", ["test1.dcm", "CR-MONO1-10-chest.dcm"])
def test_without_windows_the_output_shows_the_source_from_its_minimum_to_its_maximum(name):
    """A viewer shows a source without VOI from its minimum to its maximum; the output's window
    reproduces exactly that picture (and not a contrast-stretched one)."""
    source = chest(name)
    for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTSequence"):
        if keyword in source:
            delattr(source, keyword)
    values = _modality_values(source)
    unit, mapping = to_unit(source)
    out = from_unit(unit, mapping)
    out_ds = _output_dataset(source, mapping)
    assert out_ds.WindowCenterWidthExplanation == "SOURCE MIN-MAX"
    expected = (values - values.min()) / np.ptp(values)  # min-max display, bone bright
    if mapping.invert:
        expected = 1.0 - expected
    shown = apply_voi_lut(out, out_ds).astype(np.float64) / mapping.out_max
    assert np.abs(shown - expected).max() <= 1.5 / np.ptp(values)
    assert (shown == 0).mean() < 0.01 and (shown == 1).mean() < 0.01  # nothing stretched into clipping


def test_a_modality_lut_wider_than_bits_stored_widens_the_output():
    source = other("CR-ModalitySequenceLUT.dcm")  # 10-bit stored
    item = source.ModalityLUTSequence[0]  # 1024 entries of 16 bits, 0-1023 out
    lut = np.frombuffer(item.LUTData, "<u2")
    item.LUTData = (lut.astype(np.int64) * 4 + 44).astype("<u2").tobytes()  # now 44-4136 out
    values = _modality_values(source)
    assert values.max() > 1023
    unit, mapping = to_unit(source)
    assert mapping.bits_stored == 13 and mapping.source_bits_stored == 10  # 4136 needs 13 bits
    back = from_unit(unit, mapping).astype(np.int64)
    modality = (mapping.out_max - back) if mapping.invert else back
    assert np.abs(modality - values).max() <= 1  # exact round trip, nothing clipped


@pytest.mark.parametrize("name", ["CR-MONO1-10-chest.dcm", "RG1_J2KI.dcm"])
def test_monochrome1_output_displays_like_the_source(name):
    source = chest(name)
    unit, mapping = to_unit(source)
    out = from_unit(unit, mapping)
    out_ds = _output_dataset(source, mapping)
    source_shown = _source_display(source, _modality_values(source))
    out_shown = apply_voi_lut(out, out_ds) / mapping.out_max
    # pixel for pixel the same picture (lungs dark, bone bright), not its negative
    assert np.corrcoef(source_shown.ravel(), out_shown.ravel())[0, 1] > 0.99
    assert np.median(np.abs(out_shown - source_shown)) < 0.01
