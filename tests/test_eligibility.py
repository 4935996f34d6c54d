"""Eligibility rules against every shared DICOM file and against targeted edits of them."""

from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.tag import Tag

from cxr_sr_node.eligibility import RULES, SERIES_MARKER, Verdict, check, is_own_output
from tests.dicom_helpers import CHEST_DIR, CHEST_FILES, OTHER_DIR, chest, other, require_data

require_data()

OWN_DEVICE_UID = "1.2.826.0.1.3680043.8.498.77"

# What each file in other/ must give with the default settings: every one is skipped, with the
# reason the data README predicts.
# - test6.dcm: a chest DX whose PatientPosition is "XX", neither a view nor a patient position.
# - CR-ModalitySequenceLUT.dcm: a dental CR without BodyPartExamined whose descriptions say TEETH.
EXPECTED_OTHER = {
    "test4.dcm": "body_part",  # BodyPartExamined RIBCAGE
    "test5.dcm": "modality",  # CT
    "test6.dcm": "position",  # PatientPosition XX
    "RG3_J2KR.dcm": "body_part",  # EXTREMITY
    "RG3_J2KI.dcm": "body_part",
    "CR-ModalitySequenceLUT.dcm": "body_part",  # descriptions name TEETH
    "6154": "body_part",  # CSPINE
    "CT_small.dcm": "modality",
    "MR_small.dcm": "modality",
    "MR_small_RLE.dcm": "modality",
    "MR_small_bigendian.dcm": "modality",
    "MR_small_implicit.dcm": "modality",
    "JPEG2000.dcm": "modality",  # NM
    "JPGExtended.dcm": "modality",
    "JPEG-LL.dcm": "modality",
    "emri_small_jpeg_ls_lossless.dcm": "modality",  # MR, 10 frames
    "image_dfl.dcm": "modality",  # OT
    "test-SR.dcm": "modality",  # SR document, no pixels
    "genFile.dcm": "modality",  # no Modality, undecodable pixels
}
EXPECTED_WITH_REQUIRED_BODY_PART = {"CR-ModalitySequenceLUT.dcm": "body_part", "test6.dcm": "position"}


def test_the_tables_cover_every_shared_file():
    assert sorted(p.name for p in OTHER_DIR.iterdir()) == sorted(EXPECTED_OTHER)
    assert sorted(p.name for p in CHEST_DIR.iterdir()) == sorted(CHEST_FILES)


@pytest.mark.parametrize("name", CHEST_FILES)
def test_chest_files_are_eligible_even_when_decoded(name):
    ds = chest(name)
    assert check(ds) == Verdict(True, "eligible", "all eligibility rules passed")
    assert check(ds, decode=True).eligible


@pytest.mark.parametrize(("name", "rule"), sorted(EXPECTED_OTHER.items()))
def test_other_files_get_the_expected_rule(name, rule):
    verdict = check(other(name))
    assert verdict.rule == rule, verdict.reason
    assert verdict.eligible == (rule == "eligible")


@pytest.mark.parametrize(("name", "rule"), sorted(EXPECTED_WITH_REQUIRED_BODY_PART.items()))
def test_require_body_part_changes_only_files_without_one(name, rule):
    assert check(other(name), require_body_part=True).rule == rule


def test_missing_body_part_is_eligible_unless_required():
    covid = chest(CHEST_FILES[3])
    assert "BodyPartExamined" not in covid
    assert check(covid).eligible
    verdict = check(covid, require_body_part=True)
    assert verdict.rule == "body_part"
    assert "absent" in verdict.reason and "CHEST" in verdict.reason


def test_reasons_name_what_was_found_and_what_is_expected():
    assert check(other("test5.dcm")).reason == "Modality is 'CT'; only CR, DX, DR are processed"
    assert check(other("test4.dcm")).reason == "BodyPartExamined is 'RIBCAGE'; only CHEST is processed"
    assert check(other("genFile.dcm")).reason == "Modality is absent; only CR, DX, DR are processed"


def test_a_multi_valued_attribute_is_named_in_its_dicom_form():
    ds = chest("test1.dcm")
    ds.BodyPartExamined = ["CHEST", "ABDOMEN"]
    assert check(ds).reason == "BodyPartExamined is 'CHEST\\ABDOMEN'; only CHEST is processed"


def test_the_rule_ids_are_the_documented_ones():
    assert [rule.id for rule in RULES] == [
        "own_output", "modality", "body_part", "position", "pixel_data", "samples_per_pixel", "photometric",
        "single_frame", "decodable",
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")  # lowercase CS, as some devices send it
def test_retired_dr_modality_and_lowercase_values_are_accepted():
    ds = chest("test1.dcm")
    ds.Modality = "DR"
    ds[Tag("BodyPartExamined")] = RawDataElement(Tag("BodyPartExamined"), "CS", 6, b"chest ", 0, True, True)
    assert check(ds).eligible


def test_anatomic_region_sequence_decides_when_body_part_is_absent():
    ds = chest(CHEST_FILES[3])  # no BodyPartExamined
    region = pydicom.Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "72696002", "SCT", "Knee"
    ds.AnatomicRegionSequence = [region]
    verdict = check(ds)
    assert verdict.rule == "body_part" and "Knee" in verdict.reason
    region.CodeValue, region.CodeMeaning = "43799004", "Chest"
    assert check(ds, require_body_part=True).eligible


@pytest.mark.parametrize(
    ("keyword", "value", "rule"),
    [
        ("SamplesPerPixel", 3, "samples_per_pixel"),
        ("PhotometricInterpretation", "PALETTE COLOR", "photometric"),
        ("NumberOfFrames", 2, "single_frame"),
    ],
)
def test_image_pixel_rules(keyword, value, rule):
    ds = chest("CR-MONO1-10-chest.dcm")
    setattr(ds, keyword, value)
    verdict = check(ds)
    assert verdict.rule == rule
    assert str(value) in verdict.reason


@pytest.mark.parametrize(("keyword", "value", "found"), [("Rows", None, "absent"), ("Rows", 0, "0"),
                                                     ("Columns", None, "absent"), ("BitsAllocated", 0, "0")])
def test_a_missing_or_zero_image_size_is_named(keyword, value, found):
    ds = chest("CR-MONO1-10-chest.dcm")
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    for verdict in (check(ds), check(ds, decode=True)):
        assert verdict.rule == "decodable"
        assert f"{keyword} is {found}; the Image Pixel module needs Rows, Columns, BitsAllocated" in verdict.reason


def test_missing_pixel_data_is_reported_as_such():
    ds = chest("test1.dcm")
    del ds.PixelData
    assert check(ds).rule == "pixel_data"


def test_header_only_skips_pixel_data_but_not_the_transfer_syntax():
    header = pydicom.dcmread(CHEST_DIR / "RG1_J2KI.dcm", stop_before_pixels=True)
    assert check(header).rule == "pixel_data"
    assert check(header, header_only=True).eligible
    header.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG-2: no pydicom decoder
    verdict = check(header, header_only=True)
    assert verdict.rule == "decodable" and "MPEG2" in verdict.reason
    with pytest.raises(ValueError, match="header_only"):
        check(header, header_only=True, decode=True)


def test_raw_pixels_under_a_jpeg_syntax_are_not_decodable():
    ds = other("genFile.dcm")  # JPEG Baseline syntax, but the fragment holds raw pixels
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    verdict = check(ds)
    assert verdict.rule == "decodable"
    assert "first Pixel Data fragment is not a JPEG Baseline" in verdict.reason
    assert check(ds, decode=True).rule == "decodable"


def test_native_pixel_data_under_a_compressed_syntax_is_not_decodable():
    ds = chest("test1.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"  # JPEG Lossless SV1, data still native
    verdict = check(ds)
    assert verdict.rule == "decodable"
    assert "needs encapsulated Pixel Data, but it is native" in verdict.reason


def test_truncated_native_pixel_data_is_not_decodable():
    ds = chest("test1.dcm")
    ds.PixelData = ds.PixelData[:1000]
    verdict = check(ds)
    assert verdict.rule == "decodable" and "1000 bytes" in verdict.reason


def test_decode_true_reports_the_decoder_error():
    ds = chest("RG1_J2KI.dcm")
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])  # a J2K header and nothing else
    assert check(ds).eligible  # the header check cannot see it
    verdict = check(ds, decode=True)
    assert verdict.rule == "decodable"
    assert "decoding JPEG 2000 Image Compression Pixel Data failed" in verdict.reason


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_malformed_value_fails_its_rule_instead_of_raising():
    ds = chest("test1.dcm")
    ds[Tag("NumberOfFrames")] = RawDataElement(Tag("NumberOfFrames"), "IS", 4, b"abc ", 0, True, True)
    verdict = check(ds)
    assert verdict.rule == "single_frame"
    assert "could not be checked" in verdict.reason


def test_own_output_by_series_marker_or_device_uid():
    ds = chest("test1.dcm")
    assert not is_own_output(ds, OWN_DEVICE_UID)
    marked = copy.deepcopy(ds)
    marked.SeriesDescription = f"PA {SERIES_MARKER} - not for primary diagnosis"
    assert is_own_output(marked, None)
    assert check(marked).rule == "own_output"

    equipment = pydicom.Dataset()
    equipment.Manufacturer = "cxr-sr-node"
    equipment.DeviceUID = OWN_DEVICE_UID
    ds.ContributingEquipmentSequence = [equipment]
    assert is_own_output(ds, OWN_DEVICE_UID)
    assert not is_own_output(ds, "1.2.3.4")
    assert not is_own_output(ds, None)
    assert check(ds, own_device_uid=OWN_DEVICE_UID).rule == "own_output"
    assert check(ds, own_device_uid="1.2.3.4").eligible


def test_rules_subset():
    ds = chest("test1.dcm")
    ds.Modality = "CT"
    assert check(ds, rules=("pixel_data", "decodable")).eligible
    with pytest.raises(ValueError, match="unknown eligibility rule"):
        check(ds, rules=("no_such_rule",))


def test_description_names_anatomy_only_when_body_part_is_absent():
    ds = chest("test1.dcm").copy()
    del ds.BodyPartExamined
    ds.SeriesDescription = "HAND PA"
    assert check(ds).rule == "body_part"
    assert "SeriesDescription names HAND" in check(ds).reason
    ds.SeriesDescription = "CHEST PA"  # names the chest: eligible
    assert check(ds).eligible
    ds.SeriesDescription = "Handheld portable"  # whole words only: HAND is not in HANDHELD
    assert check(ds).eligible


@pytest.mark.parametrize("value", ["PA", "AP", "LL", "HFS", ""])
def test_known_positions_pass(value):
    ds = chest("test1.dcm").copy()
    ds.PatientPosition = value
    assert check(ds).eligible
