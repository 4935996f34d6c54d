"""Build the derived Secondary Capture image and its provenance (DESIGN §5).

``derive`` is pure apart from the clock (ContentDate/Time, ContributionDateTime): pixels in, a
dataset out. Super-resolution is passed in as a plain callable, so this module (and the receive
path that imports it) never imports torch.

Decisions where DESIGN is silent:

- UIDs: ``2.25.<uuid5>`` over (kind, source UID, model sha256, node version) in a fixed namespace
  (:data:`UID_NAMESPACE`; changing it would change every derived UID). SeriesInstanceUID comes
  from the source SeriesInstanceUID, SOPInstanceUID from the source SOPInstanceUID.
- SeriesNumber = source SeriesNumber + 1000 (1000 when absent), so the derived series sorts after
  the source; InstanceNumber is copied (1 when absent or < 1).
- SeriesDescription: source description + " SR x4 (CSAEGAN) — not for primary diagnosis"; the em
  dash is used only when the source's SpecificCharacterSet can encode it (ISO_IR 192, GB18030,
  ...); otherwise " - " (ISO_IR 100, the default repertoire, ISO 2022 Japanese...). The source
  part is cut first so the result fits LO's 64 characters with the marker and disclaimer intact.
- ContributingEquipmentSequence holds exactly two items (acquisition, this node); highdicom's own
  library item is replaced, the node being the processing equipment. The acquisition item's
  Manufacturer is Type 1: "UNKNOWN" when the source has none.
- BurnedInAnnotation is "NO" unless the source says "YES" (super-resolution keeps burned-in text).
- LossyImageCompression: a source that declares "01" is copied with its Ratio/Method; a source
  received in a lossy-capable transfer syntax (JPEG baseline/extended, JPEG-LS near-lossless,
  JPEG 2000 (4.91/4.93), HTJ2K (4.203)) without that declaration gets "01" plus the method and the
  approximate ratio of this encoding. JPEG 2000 4.91 may hold a reversible stream; we mark it lossy
  anyway, because under-declaring lossy compression is the unsafe error.
- Pixel spacing: PixelSpacing and ImagerPixelSpacing (each when present with two values) are
  divided per axis by the true ratio out_rows/src_rows, out_cols/src_cols.
- Also copied, being series/image facts the SR does not change: BodyPartExamined, Laterality,
  PatientOrientation (empty, Type 2, when the source has none), PixelSpacingCalibrationType/
  Description.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom import Dataset, config
from pydicom.charset import convert_encodings, encode_string
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)
from pydicom.valuerep import DA, DS, TM

from cxr_sr_node import __version__, eligibility, pixels
from cxr_sr_node.eligibility import SERIES_MARKER

UID_NAMESPACE = uuid.UUID("7902b83a-5afd-5d65-bd0b-4390d866e8d9")  # uuid5(NAMESPACE_URL, "urn:cxr-sr-node:derived-uid")
UID_KINDS = ("series", "sop")
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(UID_NAMESPACE, 'implementation-class').int}"  # fixed per product
IMPLEMENTATION_VERSION_NAME = f"CXRSR_{__version__}"[:16]  # SH, 16 characters
SUPPORTED_SCALE = 4  # the CSAEGAN model's scale, and the "x4" in SERIES_MARKER
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_MAX_CHARS = 64
SHA256_PREFIX_CHARS = 12

IMAGE_TYPE = ["DERIVED", "SECONDARY", "SUPER_RESOLUTION"]
CONVERSION_TYPE_WORKSTATION = "WSD"
SERIES_NUMBER_OFFSET = 1000
LO_MAX_CHARS = 64
ST_MAX_CHARS = 1024
EM_DASH = "\u2014"
ASCII_DASH = "-"
DISCLAIMER = "not for primary diagnosis"
UNKNOWN_MANUFACTURER = "UNKNOWN"
BITS_ALLOCATED = 16

LOSSY_METHOD_BY_SYNTAX = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
    JPEG2000MC: "ISO_15444_1",
    HTJ2K: "ISO_15444_15",
}

# Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study modules
# (root attributes): copied unchanged so the derived series files under the same patient/study.
PATIENT_STUDY_KEYWORDS = (
    # Patient
    "ReferencedPatientSequence", "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar", "PatientSex", "QualityControlSubject", "StrainDescription",
    "StrainNomenclature", "StrainStockSequence", "StrainAdditionalInformation", "StrainCodeSequence",
    "GeneticModificationsSequence", "OtherPatientNames", "OtherPatientIDsSequence",
    "ReferencedPatientPhotoSequence", "EthnicGroup", "EthnicGroupCodeSequence", "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence",
    "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
    "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID", "OtherClinicalTrialProtocolIDsSequence", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID", "ClinicalTrialSubjectID",
    "IssuerOfClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialSubjectReadingID", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "StudyDescription", "ProcedureCodeSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "ReferencedStudySequence", "StudyID",
    "RequestingService", "RequestingServiceCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize",
    "PatientSizeCodeSequence", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension",
    "PatientWeight", "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus", "AdditionalPatientHistory",
    "PregnancyStatus", "LastMenstrualDate", "PatientSexNeutered", "ReasonForVisit",
    "ReasonForVisitCodeSequence", "AdmissionID", "IssuerOfAdmissionIDSequence", "ServiceEpisodeID",
    "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence", "PatientState",
    # Clinical Trial Study
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription", "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType", "ClinicalTrialTimePointTypeCodeSequence",
    "IssuerOfClinicalTrialTimePointID", "ConsentForClinicalTrialUseSequence",
)
SERIES_IMAGE_KEYWORDS = (
    "BodyPartExamined", "Laterality", "PixelSpacingCalibrationType", "PixelSpacingCalibrationDescription",
    # what hanging protocols and comparison with priors match on (PA/AP/LAT, when it was taken)
    "ViewPosition", "ImageLaterality", "PatientPosition", "AcquisitionDate", "AcquisitionTime",
    "AcquisitionDateTime",
)
# every spacing the source may carry (Image Plane / DX Detector / CR Image / SC Image modules): divided
# by the true scale, so measurements on the derived image stay in mm
SPACING_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
ACQUISITION_EQUIPMENT_KEYWORDS = (
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions", "DeviceUID",
)


class DeriveError(ValueError):
    """The source dataset cannot be derived; the message names the attribute and what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """The super-resolution model as recorded in the provenance tags."""

    name: str
    version: str
    sha256: str
    scale: int = SUPPORTED_SCALE
    tile: int = 256
    overlap: int = 16

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError(f"ModelInfo needs a name and a version; got name={self.name!r}, version={self.version!r}")
        if not SHA256_PATTERN.fullmatch(self.sha256):
            raise ValueError(f"ModelInfo.sha256 must be 64 lowercase hex digits; got {self.sha256!r}")
        if self.scale != SUPPORTED_SCALE:
            raise ValueError(
                f"ModelInfo.scale must be {SUPPORTED_SCALE} (the CSAEGAN model's scale and the series "
                f"marker {SERIES_MARKER!r}); got {self.scale}"
            )
        if self.tile < 1 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"ModelInfo needs tile >= 1 and 0 <= overlap < tile; got tile={self.tile}, overlap={self.overlap}")


@dataclass(frozen=True)
class NodeInfo:
    """This node, as the processing equipment of the derived series."""

    device_uid: str
    node_version: str = __version__
    manufacturer: str = "cxr-sr-node"
    model_name: str = "cxr-sr-node super-resolution x4"  # the network that ran: SoftwareVersions, DerivationDescription
    station_name: str = ""
    institution_name: str = ""

    def __post_init__(self) -> None:
        if len(self.device_uid) > UID_MAX_CHARS or not UID_PATTERN.fullmatch(self.device_uid):
            raise ValueError(f"NodeInfo.device_uid must be a valid DICOM UID (<= 64 chars, digits and dots); got {self.device_uid!r}")
        if not self.node_version or not self.manufacturer:
            raise ValueError("NodeInfo needs a node_version and a manufacturer")


def derived_uid(kind: str, source_uid: str, model_sha256: str, node_version: str) -> str:
    """Deterministic ``2.25.<int>`` UID: the same inputs always give the same UID, so reprocessing
    replaces instead of duplicating; another model or node version gives another UID."""
    if kind not in UID_KINDS:
        raise ValueError(f"derived_uid kind must be one of {UID_KINDS}; got {kind!r}")
    name = "\n".join((kind, str(source_uid), model_sha256, node_version))
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


@contextlib.contextmanager
def strict_writing() -> Iterator[None]:
    """Set pydicom's writing validation to RAISE for the block, then restore it.

    pydicom's setting is process-global: values assigned by other threads during the block are
    validated strictly too (which only makes them stricter).
    """
    previous = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.RAISE
    try:
        yield
    finally:
        config.settings.writing_validation_mode = previous


def series_description(source: Dataset) -> str:
    """Source SeriesDescription + marker + disclaimer, at most 64 characters (see module docstring)."""
    dash = EM_DASH if _can_encode(EM_DASH, source.get("SpecificCharacterSet")) else ASCII_DASH
    suffix = f"{SERIES_MARKER} {dash} {DISCLAIMER}"
    value = source.get("SeriesDescription", "") or ""
    if isinstance(value, MultiValue):  # LO is single-valued; some sources send several anyway
        value = " ".join(str(v) for v in value)
    base = str(value).strip()
    room = LO_MAX_CHARS - len(suffix) - 1
    base = base[:room].rstrip()
    return f"{base} {suffix}" if base else suffix


def derive(
    source: Dataset,
    upscale: Callable[[np.ndarray], np.ndarray],
    *,
    model: ModelInfo,
    node: NodeInfo,
    max_output_px: int = 4096,
    now: datetime.datetime | None = None,
) -> Dataset:
    """Super-resolve ``source`` and return the derived Secondary Capture image.

    ``upscale`` gets the (H, W) float32 image in [0, 1] (bone bright) and must return the
    (scale*H, scale*W) float image in [0, 1]. ``now`` fixes the clock (ContentDate/Time,
    ContributionDateTime). Raises :class:`DeriveError` for a source that cannot be derived or an
    ``upscale`` result of the wrong shape or with non-finite values.
    """
    _check_source(source)
    now = now or datetime.datetime.now()
    unit, mapping = _to_unit(source)
    sr = _super_resolve(upscale, np.clip(unit, 0.0, 1.0), model.scale)  # the model's range
    sr = pixels.restore_range(sr, unit)  # the ~1 % beyond the robust range, so the map stays exact
    sr, resample_rows, resample_cols = pixels.resample_to_fit(sr, max_output_px)
    out_pixels = pixels.from_unit(sr, mapping)  # (H', W') uint16, MONOCHROME2
    row_ratio = out_pixels.shape[0] / unit.shape[0]  # true per-axis scale, output / source
    col_ratio = out_pixels.shape[1] / unit.shape[1]
    resampled = (resample_rows, resample_cols) != (1.0, 1.0)
    try:
        with strict_writing():
            out = _secondary_capture(source, out_pixels, model, node, now)
            resample = (row_ratio, col_ratio) if resampled else None
            description = _derivation_description(model, mapping, resample, max_output_px)
            _set_provenance(out, source, model, node, now, description)
            _set_pixel_description(out, source, mapping, row_ratio, col_ratio)
            out.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID  # the writer is this node
            out.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        _check_round_trip(out)
    except DeriveError:
        raise
    except Exception as exc:  # noqa: BLE001 - a source value that strict writing refuses or cannot be read
        raise DeriveError(f"cannot build the derived image for SOPInstanceUID {source.SOPInstanceUID}: "
                          f"{type(exc).__name__}: {exc}") from exc
    return out


def write_dataset(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``ds`` atomically: a temporary file in the same folder (written with validation set to
    raise), fsynced, renamed into place, and the folder fsynced. Returns the final path.

    The file is created under the process's umask (like any file a program writes; not mkstemp's
    0600), so an import agent or PACS running as another user can read a batch's output.
    """
    path = Path(path)
    tmp_name = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle, strict_writing():
            ds.save_as(handle, enforce_file_format=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)
    return path


# -- checks ----------------------------------------------------------------------------------------


def _required(source: Dataset, keyword: str) -> Any:
    value = source.get(keyword, None)
    if value in (None, ""):
        raise DeriveError(f"source has no {keyword}; a derived image must reference its source by {keyword}")
    return value


def _check_source(source: Dataset) -> None:
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality", "BitsStored"):
        _required(source, keyword)
    verdict = eligibility.check(source, rules=eligibility.PIXEL_RULES)
    if not verdict.eligible:
        raise DeriveError(f"cannot derive: {verdict.reason}")


def _to_unit(source: Dataset) -> tuple[np.ndarray, pixels.PixelMapping]:
    """pixels.to_unit, with decoder errors and out-of-range values as DeriveError.

    The output stores modality values unsigned in [0, 2**BitsStored - 1], BitsStored widened up
    to 16 where the values need it (see pixels); a source with any value outside that (signed
    data, a Rescale Intercept below zero, values above 65535) would be clipped, so it is refused
    rather than silently changed, even when only a few pixels are.
    """
    try:
        unit, mapping = pixels.to_unit(source)
    except Exception as exc:  # noqa: BLE001 - any decoder or Modality LUT error is the source's, said once
        raise DeriveError(f"cannot decode and map the Pixel Data: {type(exc).__name__}: {exc}") from exc
    lowest = mapping.low if mapping.vmin is None else mapping.vmin
    highest = mapping.high if mapping.vmax is None else mapping.vmax
    if lowest < 0 or highest > mapping.out_max:
        raise DeriveError(
            f"modality values (after RescaleSlope/RescaleIntercept or the Modality LUT) span "
            f"[{lowest:.6g}, {highest:.6g}], outside 0-{mapping.out_max} of BitsStored "
            f"{mapping.bits_stored}; the unsigned output cannot hold them without clipping"
            + (" (signed or negative values: convert the image to unsigned values first)" if lowest < 0 else "")
        )
    return unit, mapping


def _super_resolve(upscale: Callable[[np.ndarray], np.ndarray], unit: np.ndarray, scale: int) -> np.ndarray:
    sr = np.asarray(upscale(unit))
    expected = (unit.shape[0] * scale, unit.shape[1] * scale)
    if sr.shape != expected:
        raise DeriveError(f"upscale returned shape {sr.shape}; expected {expected} ({scale}x the {unit.shape} input)")
    if not np.issubdtype(sr.dtype, np.floating):
        raise DeriveError(f"upscale returned dtype {sr.dtype}; expected float values in [0, 1]")
    if not np.isfinite(sr).all():
        raise DeriveError("upscale returned non-finite values (NaN or inf)")
    return sr


def _check_round_trip(ds: Dataset) -> None:
    """The object must survive write + read with validation set to raise (STYLE habit 3)."""
    buffer = io.BytesIO()
    with strict_writing():
        ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    pydicom.dcmread(buffer, stop_before_pixels=True)


# -- building the object ---------------------------------------------------------------------------


def _secondary_capture(source: Dataset, out_pixels: np.ndarray, model: ModelInfo, node: NodeInfo, now: datetime.datetime) -> Dataset:
    series_number = int(source.get("SeriesNumber", None) or 0) + SERIES_NUMBER_OFFSET
    instance_number = int(source.get("InstanceNumber", None) or 1)
    out = hd.sc.SCImage(
        pixel_array=out_pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=BITS_ALLOCATED,
        # highdicom insists on an orientation for PATIENT; it is replaced below by the source's
        # PatientOrientation (or left empty, Type 2), whatever letters that uses.
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=derived_uid("series", source.SeriesInstanceUID, model.sha256, node.node_version),
        series_number=series_number,
        sop_instance_uid=derived_uid("sop", source.SOPInstanceUID, model.sha256, node.node_version),
        instance_number=max(1, instance_number),
        manufacturer=node.manufacturer,
        manufacturer_model_name=node.model_name,
        software_versions=_software_versions(model, node),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(source),
        series_date=now.date(),
        series_time=now.time(),
        content_date=now.date(),
        content_time=now.time(),
    )
    for keyword in PATIENT_STUDY_KEYWORDS + SERIES_IMAGE_KEYWORDS:
        _copy(source, out, keyword)
    if "SpecificCharacterSet" in source:
        out.SpecificCharacterSet = copy.deepcopy(source.SpecificCharacterSet)
    out.InstanceCreationDate = out.DateOfSecondaryCapture = DA(now.date())  # one clock for the object
    out.InstanceCreationTime = out.TimeOfSecondaryCapture = TM(now.time())
    out.PatientOrientation = None  # Type 2: empty unless the source has one
    _copy(source, out, "PatientOrientation")
    out.Modality = source.Modality  # SC allows any modality; the series then lists with the source
    out.ImageType = IMAGE_TYPE
    out.ConversionType = CONVERSION_TYPE_WORKSTATION
    out.SecondaryCaptureDeviceID = node.device_uid
    out.SecondaryCaptureDeviceManufacturer = node.manufacturer
    out.SecondaryCaptureDeviceManufacturerModelName = node.model_name
    out.SecondaryCaptureDeviceSoftwareVersions = _software_versions(model, node)
    if node.station_name:
        out.StationName = node.station_name
    if node.institution_name:
        out.InstitutionName = node.institution_name
    return out


def _set_provenance(
    out: Dataset,
    source: Dataset,
    model: ModelInfo,
    node: NodeInfo,
    now: datetime.datetime,
    derivation_description: str,
) -> None:
    out.DerivationDescription = derivation_description
    out.DerivationCodeSequence = [hd.sr.CodedConcept.from_code(codes.DCM.SpatialResampling)]
    source_ref = Dataset()
    source_ref.ReferencedSOPClassUID = source.SOPClassUID
    source_ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    source_ref.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    out.SourceImageSequence = [source_ref]
    instance_ref = Dataset()
    instance_ref.ReferencedSOPClassUID = source.SOPClassUID
    instance_ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = source.SeriesInstanceUID
    series_ref.ReferencedInstanceSequence = [instance_ref]
    out.ReferencedSeriesSequence = [series_ref]
    out.ContributingEquipmentSequence = [_acquisition_equipment(source), _processing_equipment(model, node, now)]


def _set_pixel_description(
    out: Dataset, source: Dataset, mapping: pixels.PixelMapping, row_ratio: float, col_ratio: float
) -> None:
    out.BitsStored = mapping.stored_bits
    out.HighBit = mapping.stored_bits - 1
    out.PixelRepresentation = 0
    if mapping.storage is not None:  # Modality LUT module: fractional modality steps (see pixels.Storage)
        out.RescaleSlope = _ds(mapping.storage.slope)
        out.RescaleIntercept = _ds(mapping.storage.intercept)
        out.RescaleType = _text(source, "RescaleType") or "US"
    out.BurnedInAnnotation = "YES" if _text(source, "BurnedInAnnotation") == "YES" else "NO"
    for keyword in SPACING_KEYWORDS:
        spacing = _spacing(source, keyword)
        if spacing:
            setattr(out, keyword, [_ds(spacing[0] / row_ratio), _ds(spacing[1] / col_ratio)])
    for keyword, value in pixels.voi_for_output(source, mapping).items():
        setattr(out, keyword, value)
    for keyword, value in _lossy_compression(source).items():
        setattr(out, keyword, value)


def _spacing(source: Dataset, keyword: str) -> tuple[float, float] | None:
    """The source's row/column spacing under ``keyword``, or None when absent or not a real spacing.

    A zero, negative or non-numeric value (``0.000\\0.000`` is seen in real CR files) is not carried:
    scaled, it would still claim a calibration, and viewers would measure nonsense.
    """
    values = _as_list(source.get(keyword, None))
    if len(values) != 2:
        return None
    try:
        row, col = float(values[0]), float(values[1])
    except (TypeError, ValueError):
        return None
    return (row, col) if min(row, col) > 0 and np.isfinite(row) and np.isfinite(col) else None


def _acquisition_equipment(source: Dataset) -> Dataset:
    item = hd.ContributingEquipment(
        manufacturer=str(source.get("Manufacturer", "") or "") or UNKNOWN_MANUFACTURER,
        purpose_of_reference=codes.DCM.AcquisitionEquipment,
        contribution_description="Acquisition equipment of the source image",
    )
    for keyword in ACQUISITION_EQUIPMENT_KEYWORDS:
        _copy(source, item, keyword)
    return item


def _processing_equipment(model: ModelInfo, node: NodeInfo, now: datetime.datetime) -> Dataset:
    item = hd.ContributingEquipment(
        manufacturer=node.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=node.model_name,
        software_versions=_software_versions(model, node),
        station_name=node.station_name or None,
        institution_name=node.institution_name or None,
        contribution_datetime=now,
        contribution_description=(
            f"{model.scale}x super-resolution by {model.name} {model.version} "
            f"(sha256 {model.sha256[:SHA256_PREFIX_CHARS]}); {DISCLAIMER}"
        ),
    )
    item.DeviceUID = node.device_uid
    return item


def _software_versions(model: ModelInfo, node: NodeInfo) -> list[str]:
    return [f"cxr-sr-node {node.node_version}", f"{model.name} {model.version}"[:LO_MAX_CHARS]]


def _derivation_description(
    model: ModelInfo, mapping: pixels.PixelMapping, resample: tuple[float, float] | None, max_output_px: int
) -> str:
    parts = [
        f"{model.scale}x super-resolution: model {model.name} {model.version}, "
        f"sha256 {model.sha256[:SHA256_PREFIX_CHARS]}, tile {model.tile} px, overlap {model.overlap} px (input pixels)",
        f"pixels: {mapping.describe()}",
    ]
    if resample is not None:
        parts.append(
            f"output resampled ({pixels.RESAMPLE_FILTER_NAME}) to fit {max_output_px} px: "
            f"rows x{resample[0]:.6f}, columns x{resample[1]:.6f} of the source"
        )
    parts.append(DISCLAIMER)
    return "; ".join(parts)[:ST_MAX_CHARS]


def _lossy_compression(source: Dataset) -> dict[str, Any]:
    declared = _text(source, "LossyImageCompression")
    method = LOSSY_METHOD_BY_SYNTAX.get(pixels.transfer_syntax_of(source))
    if declared == "01":
        out: dict[str, Any] = {"LossyImageCompression": "01"}
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if source.get(keyword, None):
                out[keyword] = copy.deepcopy(source[keyword].value)
        return out
    if method is not None:
        return {
            "LossyImageCompression": "01",
            "LossyImageCompressionRatio": [_ds(_compression_ratio(source))],
            "LossyImageCompressionMethod": [method],
        }
    return {"LossyImageCompression": declared} if declared else {}


def _compression_ratio(source: Dataset) -> float:
    """Approximate: native size / encapsulated size (item headers included)."""
    native_bytes = int(source.Rows) * int(source.Columns) * int(source.SamplesPerPixel) * int(source.BitsAllocated) // 8
    return round(native_bytes / max(1, len(source.PixelData)), 2)


# -- small helpers ---------------------------------------------------------------------------------


def _copy(source: Dataset, target: Dataset, keyword: str) -> None:
    if keyword in source:
        element = source[keyword]
        target[element.tag] = copy.deepcopy(element)


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().upper()


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _ds(value: float) -> DS:
    return DS(value, auto_format=True)


def _can_encode(text: str, specific_character_set: Any) -> bool:
    encodings = convert_encodings(_as_list(specific_character_set) or None)
    try:
        with strict_writing():
            encode_string(text, encodings)
    except (UnicodeError, LookupError):
        return False
    return True


def _fsync_directory(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
