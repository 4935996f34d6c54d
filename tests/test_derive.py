"""The derived Secondary Capture: pixels, provenance tags, UIDs, character sets and the file on disk.

Super-resolution is stood in for by Pillow bicubic (tests/dicom_helpers.py); every chest file is
derived once per module.
"""

from __future__ import annotations

import copy
import datetime
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import JPEG2000, ImplicitVRLittleEndian, SecondaryCaptureImageStorage

from cxr_sr_node import __version__
from cxr_sr_node.derive import (
    PATIENT_STUDY_KEYWORDS,
    DeriveError,
    ModelInfo,
    NodeInfo,
    derive,
    derived_uid,
    series_description,
    write_dataset,
)
from cxr_sr_node.eligibility import SERIES_MARKER, check, is_own_output
from cxr_sr_node.pixels import decode, to_unit, voi_for_output
from tests.dicom_helpers import CHEST_DIR, CHEST_FILES, bicubic_upscale, chest, read, require_data

require_data()

MODEL = ModelInfo(name="csaegan-test", version="1.2.0", sha256="0123456789abcdef" * 4)
NODE = NodeInfo(device_uid="1.2.826.0.1.3680043.8.498.4242")
MAX_OUTPUT_PX = 4096
RG1_PIXEL_SPACING = [0.143, 0.143]
RG1_IMAGER_PIXEL_SPACING = [0.15, 0.139]
SMALL = "CR-MONO1-10-chest.dcm"  # 440 x 440: the cheap file for behaviour tests


def _source(name: str) -> pydicom.Dataset:
    ds = chest(name)
    if name == "RG1_J2KI.dcm":  # its own spacing is 0\0: give it a real, anisotropic one
        ds.PixelSpacing = RG1_PIXEL_SPACING
        ds.ImagerPixelSpacing = RG1_IMAGER_PIXEL_SPACING
    return ds


@pytest.fixture(scope="module")
def derived() -> dict[str, tuple[pydicom.Dataset, pydicom.Dataset]]:
    results = {}
    for name in CHEST_FILES:
        source = _source(name)
        results[name] = (source, derive(source, bicubic_upscale, model=MODEL, node=NODE, max_output_px=MAX_OUTPUT_PX))
    return results


@pytest.fixture(scope="module")
def written(derived, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("derived")
    return {name: write_dataset(out, folder / f"{name}.out.dcm") for name, (_, out) in derived.items()}


def _values(value) -> list:
    """A DICOM value as a list, whether it has one value or several."""
    return list(value) if isinstance(value, list | pydicom.multival.MultiValue) else [value]


def _code(item: pydicom.Dataset) -> tuple[str, str, str]:
    return item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning


# -- pixels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHEST_FILES)
def test_output_is_4x_or_fitted_to_max_output_px(derived, name):
    source, out = derived[name]
    rows, cols = out.pixel_array.shape
    assert (out.Rows, out.Columns) == (rows, cols)
    if 4 * max(source.Rows, source.Columns) <= MAX_OUTPUT_PX:
        assert (rows, cols) == (4 * source.Rows, 4 * source.Columns)
    else:
        assert max(rows, cols) == MAX_OUTPUT_PX
        assert abs(cols - rows * source.Columns / source.Rows) <= 1  # aspect kept


def test_rg1_is_resampled_and_its_spacing_recomputed_per_axis(derived):
    source, out = derived["RG1_J2KI.dcm"]
    assert (source.Rows, source.Columns) == (1955, 1841)
    assert (out.Rows, out.Columns) == (4096, 3857)
    row_ratio, col_ratio = 4096 / 1955, 3857 / 1841
    assert [float(v) for v in out.PixelSpacing] == pytest.approx(
        [RG1_PIXEL_SPACING[0] / row_ratio, RG1_PIXEL_SPACING[1] / col_ratio], rel=1e-12
    )
    assert [float(v) for v in out.ImagerPixelSpacing] == pytest.approx(
        [RG1_IMAGER_PIXEL_SPACING[0] / row_ratio, RG1_IMAGER_PIXEL_SPACING[1] / col_ratio], rel=1e-12
    )
    assert f"rows x{row_ratio:.6f}, columns x{col_ratio:.6f}" in out.DerivationDescription


def test_a_lead_marker_and_collimated_air_beyond_the_robust_range_keep_their_values():
    """The brightest and darkest ~1 % (metal, markers, collimation) are not flattened to the
    percentiles: the model sees [0, 1] only, and what lies beyond comes back after SR."""
    source = _source(SMALL)  # MONOCHROME1, 10 bit
    stored = decode(source).astype(np.int64)
    marker, air = (slice(40, 60), slice(40, 70)), (slice(380, 400), slice(300, 340))
    stored[marker] = 3  # MONOCHROME1: lowest = brightest on display, a lead marker
    stored[air] = 1020  # darkest, beyond anything else in the image
    source.PixelData = stored.astype(np.uint16).tobytes()
    seen = []

    def upscale(unit: np.ndarray) -> np.ndarray:
        seen.append((float(unit.min()), float(unit.max())))
        return bicubic_upscale(unit)

    out = derive(source, upscale, model=MODEL, node=NODE, max_output_px=MAX_OUTPUT_PX)
    assert seen and 0.0 <= seen[0][0] and seen[0][1] <= 1.0  # the model only sees its range
    _, mapping = to_unit(source)
    assert mapping.low > 3 and mapping.high < 1020  # both regions lie beyond the robust range
    values = out.pixel_array.astype(np.int64)  # MONOCHROME2: out_max - stored
    inner = lambda region: tuple(slice(4 * r.start + 8, 4 * r.stop - 8) for r in region)  # noqa: E731
    assert np.abs(values[inner(marker)] - (1023 - 3)).max() <= 1
    assert np.abs(values[inner(air)] - (1023 - 1020)).max() <= 1
    # no halo: around the marker the output stays within the source's neighbourhood range
    ring = values[4 * 30 : 4 * 40, 4 * 40 : 4 * 70]
    neighbourhood = 1023 - stored[28:40, 38:72]
    assert ring.min() >= neighbourhood.min() - 2 and ring.max() <= 1023 - 3


def test_spacing_is_divided_by_exactly_4_without_resampling():
    source = chest(SMALL)
    source.PixelSpacing = [0.2, 0.175]
    out = derive(source, bicubic_upscale, model=MODEL, node=NODE)
    assert [float(v) for v in out.PixelSpacing] == [0.05, 0.04375]
    assert "ImagerPixelSpacing" not in out
    assert "resampled" not in out.DerivationDescription


def test_every_spacing_is_scaled_and_a_zero_spacing_is_not_carried():
    source = chest(SMALL)
    source.NominalScannedPixelSpacing = [0.17, 0.17]  # digitised film / SC sources carry only this one
    source.ImagerPixelSpacing = [0.0, 0.0]  # seen in a real CR file: no calibration at all
    out = derive(source, bicubic_upscale, model=MODEL, node=NODE)
    assert [float(v) for v in out.NominalScannedPixelSpacing] == [0.0425, 0.0425]
    assert "ImagerPixelSpacing" not in out and "PixelSpacing" not in out


def test_view_position_laterality_and_acquisition_time_are_carried():
    """What hanging protocols and comparison with priors match on."""
    source = chest(SMALL)
    source.ViewPosition, source.ImageLaterality, source.PatientPosition = "PA", "U", "FFS"
    source.AcquisitionDate, source.AcquisitionTime = "20240102", "101112"
    out = derive(source, bicubic_upscale, model=MODEL, node=NODE)
    assert (out.ViewPosition, out.ImageLaterality, out.PatientPosition) == ("PA", "U", "FFS")
    assert (out.AcquisitionDate, out.AcquisitionTime) == ("20240102", "101112")


def test_values_beyond_bits_stored_widen_the_output_instead_of_being_clipped():
    """12-bit stored values + Rescale Intercept 500 reach 4595: the output's BitsStored grows to 13."""
    source = chest(SMALL)  # 10-bit MONOCHROME1
    stored = decode(source).astype(np.int64) * 4  # now a 12-bit range, 0..4092
    source.PixelData, source.BitsStored, source.HighBit = stored.astype(np.uint16).tobytes(), 12, 11
    source.RescaleSlope, source.RescaleIntercept = 1, 500
    del source.WindowCenter, source.WindowWidth  # its window was for the 10-bit values
    out = derive(source, bicubic_upscale, model=MODEL, node=NODE)
    assert (out.BitsStored, out.HighBit) == (13, 12)
    assert "widened from the source's 12" in out.DerivationDescription
    values = out.pixel_array.astype(np.int64)  # MONOCHROME2: 8191 - modality value
    assert values.max() <= 8191 and 8191 - values.min() >= stored.max() + 500 - 2  # the brightest survive
    # the source's display is unchanged: correlation of what a viewer shows
    shrunk = Image.fromarray(_display(out, out.pixel_array).astype(np.float32)).resize(
        (source.Columns, source.Rows), Image.Resampling.BOX)
    source_shown = _display(source, apply_modality_lut(decode(source), source))
    assert np.corrcoef(source_shown.ravel(), np.asarray(shrunk).ravel())[0, 1] > 0.97


def _display(ds: pydicom.Dataset, values: np.ndarray) -> np.ndarray:
    """What a viewer shows: VOI (window or LUT) then MONOCHROME1 inversion, in [0, 1]."""
    shown = apply_voi_lut(values, ds).astype(np.float64)
    shown = (shown - shown.min()) / max(1e-9, np.ptp(shown))
    return 1.0 - shown if ds.PhotometricInterpretation == "MONOCHROME1" else shown


@pytest.mark.parametrize("name", CHEST_FILES)
def test_output_looks_like_the_source(derived, name):
    source, out = derived[name]
    source_shown = _display(source, decode(source))
    out_shown = _display(out, out.pixel_array)
    shrunk = Image.fromarray(out_shown.astype(np.float32)).resize((source.Columns, source.Rows), Image.Resampling.BOX)
    correlation = np.corrcoef(source_shown.ravel(), np.asarray(shrunk).ravel())[0, 1]
    assert correlation > 0.97  # the same picture, not its negative


# -- tags --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHEST_FILES)
def test_identity_and_image_pixel_tags(derived, name):
    source, out = derived[name]
    assert out.SOPClassUID == SecondaryCaptureImageStorage
    assert out.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert out.StudyInstanceUID == source.StudyInstanceUID
    assert out.SeriesInstanceUID == derived_uid("series", source.SeriesInstanceUID, MODEL.sha256, NODE.node_version)
    assert out.SOPInstanceUID == derived_uid("sop", source.SOPInstanceUID, MODEL.sha256, NODE.node_version)
    assert out.InstanceNumber == source.get("InstanceNumber", 1)
    assert out.Modality == source.Modality
    assert list(out.ImageType) == ["DERIVED", "SECONDARY", "SUPER_RESOLUTION"]
    assert out.ConversionType == "WSD"
    assert out.BurnedInAnnotation == "NO"
    assert out.PhotometricInterpretation == "MONOCHROME2"
    assert (out.BitsAllocated, out.BitsStored, out.HighBit) == (16, source.BitsStored, source.BitsStored - 1)
    assert out.PixelRepresentation == 0 and out.SamplesPerPixel == 1
    assert int(out.pixel_array.max()) <= 2**source.BitsStored - 1
    assert list(out.get("PatientOrientation") or []) == list(source.get("PatientOrientation") or [])


@pytest.mark.parametrize("name", CHEST_FILES)
def test_patient_and_study_attributes_are_copied_unchanged(derived, name):
    source, out = derived[name]
    copied = [kw for kw in PATIENT_STUDY_KEYWORDS if kw in source]
    assert "StudyInstanceUID" in copied and len(copied) >= 3
    for keyword in copied:
        assert out[keyword].value == source[keyword].value, keyword
    assert out.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")


@pytest.mark.parametrize("name", CHEST_FILES)
def test_series_description_and_derivation_description(derived, name):
    source, out = derived[name]
    assert SERIES_MARKER in out.SeriesDescription and len(out.SeriesDescription) <= 64
    assert out.SeriesDescription.endswith("not for primary diagnosis")
    description = out.DerivationDescription
    assert len(description) <= 1024
    for needle in ("csaegan-test 1.2.0", "sha256 0123456789ab,", "4x super-resolution", "tile 256 px", "overlap 16 px"):
        assert needle in description
    _, mapping = to_unit(source)
    assert mapping.describe() in description
    for keyword, value in voi_for_output(source, mapping).items():
        assert _values(out[keyword].value) == _values(value), keyword


@pytest.mark.parametrize("name", CHEST_FILES)
def test_references_to_the_source(derived, name):
    source, out = derived[name]
    assert [_code(item) for item in out.DerivationCodeSequence] == [("113085", "DCM", "Spatial resampling")]
    (image_ref,) = out.SourceImageSequence
    assert (image_ref.ReferencedSOPClassUID, image_ref.ReferencedSOPInstanceUID) == (source.SOPClassUID, source.SOPInstanceUID)
    assert [_code(c) for c in image_ref.PurposeOfReferenceCodeSequence] == [
        ("121322", "DCM", "Source image for image processing operation")
    ]
    (series_ref,) = out.ReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == source.SeriesInstanceUID
    (instance_ref,) = series_ref.ReferencedInstanceSequence
    assert instance_ref.ReferencedSOPInstanceUID == source.SOPInstanceUID


@pytest.mark.parametrize("name", CHEST_FILES)
def test_contributing_equipment(derived, name):
    source, out = derived[name]
    acquisition, processing = out.ContributingEquipmentSequence
    assert _code(acquisition.PurposeOfReferenceCodeSequence[0]) == ("109101", "DCM", "Acquisition Equipment")
    assert acquisition.Manufacturer == (source.get("Manufacturer") or "UNKNOWN")
    assert _code(processing.PurposeOfReferenceCodeSequence[0]) == ("109102", "DCM", "Processing Equipment")
    assert processing.Manufacturer == "cxr-sr-node"
    assert processing.ManufacturerModelName == NODE.model_name
    assert list(processing.SoftwareVersions) == [f"cxr-sr-node {__version__}", "csaegan-test 1.2.0"]
    assert processing.DeviceUID == NODE.device_uid
    assert processing.ContributionDateTime and "super-resolution" in processing.ContributionDescription


def test_rg1_lossy_compression_is_carried(derived):
    source, out = derived["RG1_J2KI.dcm"]
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionRatio == source.LossyImageCompressionRatio == 10
    assert list(out.PatientOrientation) == ["L", "F"]
    assert out.SpecificCharacterSet == "ISO_IR 100"


def test_lossy_compression_on_the_wire_is_declared():
    source = chest(SMALL)
    assert "LossyImageCompression" not in source
    source.file_meta = FileMetaDataset()
    source.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    source.compress(JPEG2000, j2k_cr=[20])  # what a sending SCU may do without updating the header
    out = derive(source, bicubic_upscale, model=MODEL, node=NODE)
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == "ISO_15444_1"
    assert float(out.LossyImageCompressionRatio) == pytest.approx(440 * 440 * 2 / len(source.PixelData), abs=0.01)


def test_now_sets_every_date_and_time_of_the_object():
    now = datetime.datetime(2031, 2, 3, 4, 5, 6, 700000)
    out = derive(chest(SMALL), bicubic_upscale, model=MODEL, node=NODE, now=now)
    written = {
        (out[f"{prefix}Date"].value, out[f"{prefix}Time"].value)
        for prefix in ("InstanceCreation", "Content", "Series")
    } | {(out.DateOfSecondaryCapture, out.TimeOfSecondaryCapture)}
    assert written == {(now.date(), now.time())}
    assert out.ContributingEquipmentSequence[1].ContributionDateTime == now


def test_burned_in_annotation_yes_is_kept():
    source = chest(SMALL)
    source.BurnedInAnnotation = "YES"
    assert derive(source, bicubic_upscale, model=MODEL, node=NODE).BurnedInAnnotation == "YES"


# -- UIDs and the loop guard ---------------------------------------------------------------------------


def test_uids_are_deterministic_and_depend_on_model_and_node_version():
    source = chest(SMALL)
    first = derive(source, bicubic_upscale, model=MODEL, node=NODE)
    again = derive(chest(SMALL), bicubic_upscale, model=MODEL, node=NODE)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    other_model = ModelInfo(name=MODEL.name, version=MODEL.version, sha256="f" * 64)
    other_node = NodeInfo(device_uid=NODE.device_uid, node_version="9.9.9")
    for model, node in ((other_model, NODE), (MODEL, other_node)):
        changed = derive(chest(SMALL), bicubic_upscale, model=model, node=node)
        assert changed.SeriesInstanceUID != first.SeriesInstanceUID
        assert changed.SOPInstanceUID != first.SOPInstanceUID
    assert first.SeriesInstanceUID != first.SOPInstanceUID


def test_derived_uid_form():
    uid = derived_uid("sop", "1.2.3.4", MODEL.sha256, "0.1.0")
    assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    assert uid == derived_uid("sop", "1.2.3.4", MODEL.sha256, "0.1.0")
    assert uid != derived_uid("series", "1.2.3.4", MODEL.sha256, "0.1.0")
    with pytest.raises(ValueError, match="kind"):
        derived_uid("study", "1.2.3.4", MODEL.sha256, "0.1.0")


def test_loop_guard_recognises_our_output(derived):
    _, out = derived[SMALL]
    assert check(out, own_device_uid=NODE.device_uid).rule == "own_output"
    assert is_own_output(out, None)  # by the series marker alone
    unmarked = copy.deepcopy(out)
    unmarked.SeriesDescription = "renamed by a PACS user"
    assert is_own_output(unmarked, NODE.device_uid)  # by our DeviceUID alone
    assert check(unmarked).eligible  # a renamed output without our DeviceUID cannot be recognised


# -- character sets ----------------------------------------------------------------------------------


def _file_with_name(tmp_path: Path, charset: str | list[str], name: str) -> Path:
    path = tmp_path / "source.dcm"
    shutil.copy(CHEST_DIR / SMALL, path)
    ds = read(path)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.save_as(path, enforce_file_format=True)
    return path


def _raw_patient_name(path: Path) -> bytes:
    return pydicom.dcmread(path, stop_before_pixels=True).get_item("PatientName").value


@pytest.mark.parametrize(
    ("charset", "name", "dash"),
    [
        pytest.param(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", " - ", id="Japanese ISO 2022"),
        pytest.param("ISO_IR 100", "Müller^Jürgen=Ærøskøbing", " - ", id="Latin-1"),
        pytest.param("ISO_IR 192", "Wang^XiaoDong=王^小東", " \u2014 ", id="UTF-8"),
    ],
)
def test_patient_name_in_any_character_set_survives(tmp_path, charset, name, dash):
    source_path = _file_with_name(tmp_path, charset, name)
    out = derive(read(source_path), bicubic_upscale, model=MODEL, node=NODE)
    out_path = write_dataset(out, tmp_path / "derived.dcm")
    back = pydicom.dcmread(out_path, stop_before_pixels=True)
    assert str(back.PatientName) == name
    assert back.SpecificCharacterSet == read(source_path).SpecificCharacterSet
    assert _raw_patient_name(out_path) == _raw_patient_name(source_path)
    assert f"{SERIES_MARKER}{dash}not for primary diagnosis" in back.SeriesDescription


def test_long_series_description_is_cut_keeping_the_marker():
    source = chest(SMALL)
    source.SeriesDescription = "THORAX PA STANDING 180 CM HIGH KV LOW DOSE FOLLOW UP WEEK 12"
    description = series_description(source)
    assert len(description) == 64
    assert description.startswith("THORAX PA STANDING")
    assert description.endswith(f"{SERIES_MARKER} - not for primary diagnosis")


def test_a_multi_valued_series_description_is_joined_not_written_as_a_list():
    source = chest(SMALL)
    source.SeriesDescription = ["CHEST", "PA"]  # LO is single-valued; some sources send two anyway
    assert series_description(source) == f"CHEST PA {SERIES_MARKER} - not for primary diagnosis"


# -- files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHEST_FILES)
def test_written_file_round_trips_with_validation_raising(derived, written, name):
    _, out = derived[name]
    path = written[name]
    with pydicom.config.strict_reading():
        back = pydicom.dcmread(path)
    assert back.SOPInstanceUID == out.SOPInstanceUID
    assert np.array_equal(back.pixel_array, out.pixel_array)
    # the file says which program wrote it: this node, not the library it builds the object with
    assert back.file_meta.ImplementationVersionName == f"CXRSR_{NODE.node_version}"[:16]
    assert back.file_meta.ImplementationClassUID.startswith("2.25.")
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_dcmdump_reports_no_errors_or_warnings(written):
    if shutil.which("dcmdump") is None:
        pytest.skip("dcmtk's dcmdump is not on PATH (apt-get install dcmtk)")
    for name, path in written.items():
        result = subprocess.run(["dcmdump", "+E", str(path)], capture_output=True, text=True, timeout=60)
        problems = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("E:", "W:", "F:"))]
        assert result.returncode == 0 and not problems and not result.stderr, (name, problems, result.stderr)


def test_write_dataset_replaces_atomically_and_leaves_nothing_on_failure(derived, tmp_path):
    _, out = derived[SMALL]
    target = tmp_path / "out.dcm"
    target.write_bytes(b"previous version")
    write_dataset(out, target)
    assert pydicom.dcmread(target).SOPInstanceUID == out.SOPInstanceUID

    broken = pydicom.Dataset()  # no File Meta, no SOP Class: cannot be written as a DICOM file
    before = target.read_bytes()
    with pytest.raises(ValueError):
        write_dataset(broken, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dcm"]


# -- inputs that cannot be derived ---------------------------------------------------------------------


def test_derive_errors_name_the_problem():
    no_pixels = chest(SMALL)
    del no_pixels.PixelData
    with pytest.raises(DeriveError, match="Pixel Data"):
        derive(no_pixels, bicubic_upscale, model=MODEL, node=NODE)

    no_series = chest(SMALL)
    del no_series.SeriesInstanceUID
    with pytest.raises(DeriveError, match="SeriesInstanceUID"):
        derive(no_series, bicubic_upscale, model=MODEL, node=NODE)

    negative = chest("test1.dcm")
    negative.RescaleSlope, negative.RescaleIntercept = 1, -1024
    with pytest.raises(DeriveError, match=r"span \[-1024, -772\], outside 0-255 of BitsStored 8"):
        derive(negative, bicubic_upscale, model=MODEL, node=NODE)

    undecodable = chest("RG1_J2KI.dcm")
    undecodable.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
    with pytest.raises(DeriveError, match="cannot decode and map the Pixel Data"):
        derive(undecodable, bicubic_upscale, model=MODEL, node=NODE)

    with pytest.raises(DeriveError, match=r"shape \(880, 880\); expected \(1760, 1760\)"):
        derive(chest(SMALL), lambda u: bicubic_upscale(u, scale=2), model=MODEL, node=NODE)

    with pytest.raises(DeriveError, match="non-finite"):
        derive(chest(SMALL), lambda u: np.full((1760, 1760), np.nan, dtype=np.float32), model=MODEL, node=NODE)


def test_model_and_node_info_are_valid_once_constructed():
    with pytest.raises(ValueError, match="sha256"):
        ModelInfo(name="m", version="1", sha256="abc")
    with pytest.raises(ValueError, match="scale must be 4"):
        ModelInfo(name="m", version="1", sha256="0" * 64, scale=2)
    with pytest.raises(ValueError, match="device_uid"):
        NodeInfo(device_uid="not a uid")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    """A batch's output must be readable by the import agent or PACS user when the umask says so."""
    ds = derive(chest(SMALL), bicubic_upscale, model=MODEL, node=NODE)
    old = os.umask(umask)
    try:
        path = write_dataset(ds, tmp_path / "out.dcm")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["out.dcm"]  # no temporary file left


# -- sources a viewer shows one way and a careless derivation another ---------------------------------


def test_a_rescale_slope_of_zero_is_refused_not_derived_as_a_blank_image():
    source = chest(SMALL)
    source.RescaleSlope, source.RescaleIntercept = 0, 0
    with pytest.raises(DeriveError, match="RescaleSlope is 0"):
        derive(source, bicubic_upscale, model=MODEL, node=NODE)


def test_a_few_negative_pixels_are_refused_not_clipped_to_zero():
    """Signed data with 12 of 193,600 pixels at -400: below the 0.5th percentile, yet they would be clipped."""
    source = chest(SMALL)  # 10-bit values, stored as 12-bit signed ones
    stored = decode(source).astype(np.int16)
    stored.flat[:12] = -400
    source.PixelRepresentation, source.BitsStored, source.HighBit, source.PixelData = 1, 12, 11, stored.tobytes()
    with pytest.raises(DeriveError, match=r"span \[-400, .*signed or negative values"):
        derive(source, bicubic_upscale, model=MODEL, node=NODE)


def test_a_12_bit_modality_lut_is_applied_and_a_lut_without_data_is_named():
    """Real CR files declare 10- or 12-bit Modality LUT entries (PS3.3 says 8 or 16); pydicom cannot."""
    source = chest(SMALL)  # 10-bit stored values
    item = pydicom.Dataset()
    item.LUTDescriptor = [1024, 0, 12]
    lut = (np.arange(1024) * 4).astype(np.uint16)  # 10 -> 12 bits
    item.add_new("LUTData", "OW", lut.tobytes())
    item.ModalityLUTType = "US"
    source.ModalityLUTSequence = [item]
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "RescaleType"):
        source.pop(keyword, None)
    out = derive(source, bicubic_upscale, model=MODEL, node=NODE)
    modality = decode(source).astype(np.int64) * 4
    values = 4095 - out.pixel_array.astype(np.int64)  # MONOCHROME1 source: flipped into 12 bits
    assert out.BitsStored == 12
    assert abs(values.max() - modality.max()) <= 8 and abs(values.min() - modality.min()) <= 8

    del item.LUTData
    with pytest.raises(DeriveError, match=r"ModalityLUTSequence item 1: LUTData \(0028,3006\) is absent"):
        derive(source, bicubic_upscale, model=MODEL, node=NODE)


def test_a_voi_lut_without_data_fails_that_instance_with_a_reason_not_an_exception(tmp_path):
    from cxr_sr_node.worker import derive_file

    source = chest(SMALL)
    item = pydicom.Dataset()
    item.LUTDescriptor = [1024, 0, 12]
    source.VOILUTSequence = [item]
    with pytest.raises(DeriveError, match=r"VOILUTSequence item 1: LUTData \(0028,3006\) is absent"):
        derive(source, bicubic_upscale, model=MODEL, node=NODE)
    path = tmp_path / "voi.dcm"
    source.save_as(path)

    class Engine:  # what derive_file reads of the worker's engine
        upscale, model, node, max_output_px, require_body_part = staticmethod(bicubic_upscale), MODEL, NODE, 4096, False

    outcome = derive_file(path, Engine())
    assert (outcome.kind, outcome.rule) == ("skipped", "derive") and "VOILUTSequence item 1" in outcome.reason


@pytest.mark.parametrize("width", [b"0", b"-5", b"abc "])
def test_an_unusable_window_is_not_carried_and_the_source_range_is_shown(width):
    source = chest(SMALL)
    source.WindowCenter = 512
    tag = pydicom.tag.Tag("WindowWidth")  # as read from a file: pydicom converts it when asked
    source[tag] = pydicom.dataelem.RawDataElement(tag, "DS", len(width), width, 0, False, True)
    out = derive(source, bicubic_upscale, model=MODEL, node=NODE)
    assert float(out.WindowWidth) >= 1 and out.WindowCenterWidthExplanation == "SOURCE MIN-MAX"


def test_of_two_windows_the_usable_one_is_carried():
    source = chest(SMALL)
    source.WindowCenter, source.WindowWidth = [512, 300], [0, 200]
    source.WindowCenterWidthExplanation = ["BROKEN", "SOFT"]
    out = derive(source, bicubic_upscale, model=MODEL, node=NODE)
    assert (float(out.WindowWidth), out.WindowCenterWidthExplanation) == (200.0, "SOFT")
    assert float(out.WindowCenter) == 1023 + 1 - 300  # mirrored: the source is MONOCHROME1


@pytest.mark.parametrize(("name", "slope", "intercept"), [(SMALL, 0.01, 0), (SMALL, 0.684, 200.0), ("test1.dcm", 0.25, 7.5)])
def test_fractional_modality_steps_are_kept_with_a_rescale(name, slope, intercept):
    """Rounding modality values to whole units merged levels (10 bits at slope 0.01: 11 of 214 kept)."""
    source = chest(name)
    source.RescaleSlope, source.RescaleIntercept, source.RescaleType = slope, intercept, "OD"
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence"):
        source.pop(keyword, None)
    source_values = apply_modality_lut(decode(source), source)
    out = derive(source, lambda u: np.kron(u, np.ones((4, 4), dtype=np.float32)), model=MODEL, node=NODE)
    assert (float(out.RescaleSlope), out.RescaleType, out.BitsStored) == (slope, "OD", source.BitsStored)
    assert "RescaleSlope" in out.DerivationDescription
    out_values = apply_modality_lut(out.pixel_array, out)[::4, ::4]  # nearest-neighbour "SR": every level returns
    if source.PhotometricInterpretation == "MONOCHROME1":
        out_values = (2**source.BitsStored - 1) - out_values  # flipped to MONOCHROME2 around out_max
    # the ~1 % beyond the robust range (and their neighbours) come back bilinearly (restore_range)
    exact = np.abs(out_values - source_values) < slope / 2 + 1e-6
    assert exact.mean() > 0.98, exact.mean()
    assert len(np.unique(out.pixel_array)) >= len(np.unique(decode(source)))
    # and it still displays like the source, through the SOURCE MIN-MAX window on its modality values
    shown = _display(out, apply_modality_lut(out.pixel_array, out))[::4, ::4]
    assert np.corrcoef(_display(source, source_values).ravel(), shown.ravel())[0, 1] > 0.999
