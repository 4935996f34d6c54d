"""Input eligibility: one table of rules, first failing rule wins (DESIGN §3).

Each rule is ``(rule id, predicate, reason-builder)``; the reason names what was found and what
was expected, and never contains patient data (it goes to the log). ``check`` is tolerant: a rule
that cannot read the dataset (a malformed value) fails with that rule's id and the error text
instead of raising, so the SCP can never crash on an odd header.

Decisions where DESIGN is silent:

- Rule order: ``own_output`` first (for our own output the loop guard is the one reason an
  operator needs), then modality, body_part, position, pixel_data, samples_per_pixel, photometric,
  single_frame, decodable. ``pixel_data`` comes before the Image Pixel rules so a CR/DX header
  without pixels is reported as such, not as a missing SamplesPerPixel.
- Modality: CR, DX, and the retired DR (still written by older digital radiography units).
  DX covers both "for presentation" and "for processing" SOP classes; SOP Class UID is not
  checked (the Udacity chest files are Secondary Capture objects with Modality DX).
- Body part: BodyPartExamined CHEST (case-insensitive). When it is absent or empty, the
  AnatomicRegionSequence (Type 1 in the DX Anatomy Imaged module) decides if present: SNOMED
  "Chest" 43799004 / "Thorax" 51185008 or the legacy SRT T-D3000. When neither is present the
  descriptions decide: a Study / Series / Protocol / Requested Procedure description that names
  non-chest anatomy as a whole word (a Body Part Examined defined term such as KNEE, HAND,
  SKULL, or a common word such as TEETH, DENTAL, TIBIA) makes the image ineligible, so a dental
  CR without BodyPartExamined (CR-ModalitySequenceLUT.dcm, "MODALITYLUT - TEETH") is skipped,
  while a chest DX without it ("No Finding") is processed. A description that also names the
  chest (CHEST, THORAX, LUNG, CXR) wins. With no anatomy anywhere the image is eligible unless
  ``require_body_part`` is True.
- Position: which view it is does not matter (PA, AP, lateral are all processed), but a
  PatientPosition or ViewPosition that is neither a DICOM patient-position term (HFS, FFS, …) nor
  a radiographic view term (PA, AP, LL, RL, LAT, …) marks a mislabelled header, and the image is
  skipped with the value named (Udacity's test6.dcm, PatientPosition "XX"). Absent is fine.
- ``decodable`` without ``decode=True`` is a header check: a Transfer Syntax known (or implied by
  the encoding of a headerless file), a pydicom decoder with its plugin installed, and Pixel Data
  encapsulated exactly when the syntax is compressed (native data of the expected length
  otherwise), and for JPEG / JPEG-LS / JPEG 2000 a first fragment that starts with that codec's
  signature. ``decode=True`` also decodes and reports the decoder's error text.
- ``header_only=True`` is for a header read with ``stop_before_pixels=True`` (the SCP's
  association thread): Pixel Data is not looked at, so ``pixel_data`` passes and ``decodable``
  only checks that the transfer syntax has an installed decoder. The worker re-checks the full
  dataset before deriving.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import NamedTuple

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import Tag
from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

from cxr_sr_node import pixels

PIXEL_DATA_TAG = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH = 0xFFFFFFFF

SERIES_MARKER = "SR x4 (CSAEGAN)"

ACCEPTED_MODALITIES = ("CR", "DX", "DR")
ACCEPTED_BODY_PARTS = ("CHEST",)
CHEST_REGION_CODES = frozenset({("SCT", "43799004"), ("SCT", "51185008"), ("SRT", "T-D3000")})
ACCEPTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
# PatientPosition defined terms (PS3.3 C.7.3.1.1.2) and radiographic view terms (ViewPosition,
# PS3.3 C.8.11.5.1.1 and CID 4010 short forms) that CR/DX writers put in either attribute.
KNOWN_POSITIONS = frozenset({
    "HFP", "HFS", "HFDR", "HFDL", "HFV", "HFI", "FFDR", "FFDL", "FFP", "FFS", "FFV", "FFI",
    "LFP", "LFS", "RFP", "RFS", "AFDR", "AFDL", "PFDR", "PFDL", "SITTING",
    "PA", "AP", "LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLO", "RLO", "LPO", "RPO", "LAO", "RAO",
    "AP SUPINE", "AP ERECT", "PA ERECT", "ERECT", "SUPINE", "DECUBITUS", "OBLIQUE", "LORDOTIC",
})
# Free-text fallback when BodyPartExamined and AnatomicRegionSequence are both absent.
DESCRIPTION_KEYWORDS = ("SeriesDescription", "StudyDescription", "ProtocolName", "RequestedProcedureDescription")
CHEST_WORDS = frozenset({"CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "CXR", "THX"})
NON_CHEST_WORDS = frozenset({
    "SKULL", "HEAD", "BRAIN", "FACE", "SINUS", "SINUSES", "JAW", "MANDIBLE", "TMJ", "TEETH", "TOOTH",
    "DENTAL", "PANORAMIC", "NECK", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "SPINE", "COCCYX", "SACRUM",
    "PELVIS", "HIP", "HIPS", "ABDOMEN", "KUB", "SHOULDER", "HUMERUS", "ELBOW", "FOREARM", "WRIST",
    "HAND", "FINGER", "FEMUR", "KNEE", "TIBIA", "FIBULA", "ANKLE", "FOOT", "TOE", "EXTREMITY",
    "ARM", "LEG", "BREAST", "MAMMO", "MAMMOGRAPHY",
})
ELIGIBLE = "eligible"

# First bytes of the first fragment of each compressed family: a cheap header-level check that
# catches a wrong Transfer Syntax UID (e.g. raw pixels sent as "JPEG Baseline").
JPEG_SOI = b"\xff\xd8"
J2K_SIGNATURES = (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c\x6a\x50\x20\x20")  # codestream SOC+SIZ, JP2 box
FRAGMENT_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    **{uid: (JPEG_SOI,) for uid in JPEGTransferSyntaxes + JPEGLSTransferSyntaxes},
    **{uid: J2K_SIGNATURES for uid in JPEG2000TransferSyntaxes},
}
ITEM_HEADER_BYTES = 8  # (FFFE,E000) item tag + 4-byte length

# Rules that derive() needs to turn pixels into an output image, whatever the routing policy.
PIXEL_RULES = ("pixel_data", "samples_per_pixel", "photometric", "single_frame")


@dataclass(frozen=True)
class Verdict:
    """Outcome of :func:`check`: ``rule`` is the first failing rule id, or ``"eligible"``."""

    eligible: bool
    rule: str
    reason: str


@dataclass(frozen=True)
class _Options:
    require_body_part: bool
    own_device_uid: str | None
    decode: bool
    header_only: bool


class Rule(NamedTuple):
    id: str
    passes: Callable[[Dataset, _Options], bool]
    reason: Callable[[Dataset, _Options], str]


def is_own_output(ds: Dataset, own_device_uid: str | None) -> bool:
    """True when ``ds`` was produced by this node (loop guard, DESIGN §2).

    Either an item of ContributingEquipmentSequence has DeviceUID == ``own_device_uid``, or the
    SeriesDescription contains :data:`SERIES_MARKER` (which also catches output of another
    cxr-sr-node instance).
    """
    if SERIES_MARKER in str(ds.get("SeriesDescription", "") or ""):
        return True
    if not own_device_uid:
        return False
    for item in ds.get("ContributingEquipmentSequence", None) or []:
        if str(item.get("DeviceUID", "") or "").strip() == own_device_uid:
            return True
    return False


def check(
    ds: Dataset,
    *,
    require_body_part: bool = False,
    own_device_uid: str | None = None,
    decode: bool = False,
    header_only: bool = False,
    rules: Collection[str] | None = None,
) -> Verdict:
    """Apply :data:`RULES` in order; the first failing rule decides.

    ``header_only``: ``ds`` was read without Pixel Data (see module docstring). ``rules`` limits
    the check to those rule ids (e.g. :data:`PIXEL_RULES`); unknown ids raise ValueError. Never
    raises for a malformed dataset: a rule that cannot read it fails.
    """
    if decode and header_only:
        raise ValueError("check(decode=True) needs the Pixel Data; it cannot be combined with header_only=True")
    if rules is not None:
        unknown = set(rules) - {rule.id for rule in RULES}
        if unknown:
            raise ValueError(f"unknown eligibility rule ids {sorted(unknown)}; known: {[r.id for r in RULES]}")
    opts = _Options(require_body_part, own_device_uid, decode, header_only)
    for rule in RULES:
        if rules is not None and rule.id not in rules:
            continue
        try:
            if rule.passes(ds, opts):
                continue
            reason = rule.reason(ds, opts)
        except Exception as exc:  # tolerant on input: a malformed value fails the rule, never the SCP
            reason = f"{rule.id} could not be checked: {type(exc).__name__}: {exc}"
        return Verdict(False, rule.id, reason)
    return Verdict(True, ELIGIBLE, "all eligibility rules passed")


# -- rule predicates and reasons ---------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "") or ""
    if isinstance(value, MultiValue):  # several values where one is expected: the DICOM form, not a list repr
        value = "\\".join(str(v) for v in value)
    return str(value).strip().upper()


def _found(ds: Dataset, keyword: str) -> str:
    value = _text(ds, keyword)
    return f"{keyword} is '{value}'" if value else f"{keyword} is absent"  # as written, backslashes single


def _description_anatomy(ds: Dataset) -> tuple[str, str] | None:
    """(keyword, word) of the first description naming non-chest anatomy, unless one names the chest."""
    found = None
    for keyword in DESCRIPTION_KEYWORDS:
        words = set(re.findall(r"[A-Z]+", _text(ds, keyword)))
        if words & CHEST_WORDS:
            return None
        hit = sorted(words & NON_CHEST_WORDS)
        if hit and found is None:
            found = (keyword, hit[0])
    return found


def _is_chest(ds: Dataset, opts: _Options) -> bool:
    body_part = _text(ds, "BodyPartExamined")
    if body_part:
        return body_part in ACCEPTED_BODY_PARTS
    regions = ds.get("AnatomicRegionSequence", None) or []
    if regions:
        item = regions[0]
        return (_text(item, "CodingSchemeDesignator"), _text(item, "CodeValue")) in CHEST_REGION_CODES
    if _description_anatomy(ds) is not None:
        return False
    return not opts.require_body_part


def _body_part_reason(ds: Dataset, opts: _Options) -> str:
    expected = f"only {', '.join(ACCEPTED_BODY_PARTS)} is processed"
    if _text(ds, "BodyPartExamined"):
        return f"{_found(ds, 'BodyPartExamined')}; {expected}"
    regions = ds.get("AnatomicRegionSequence", None) or []
    if regions:
        item = regions[0]
        code = f"({item.get('CodeValue', '')}, {item.get('CodingSchemeDesignator', '')}, {item.get('CodeMeaning', '')!r})"
        return f"AnatomicRegionSequence is {code}; only chest is processed"
    described = _description_anatomy(ds)
    if described is not None:
        return f"BodyPartExamined is absent and {described[0]} names {described[1]}; {expected}"
    return f"BodyPartExamined is absent and require_body_part is on; {expected}"


def _bad_position(ds: Dataset) -> str | None:
    """'PatientPosition is …' when a position attribute holds a value that is no known term."""
    for keyword in ("ViewPosition", "PatientPosition"):
        value = _text(ds, keyword)
        if value and value not in KNOWN_POSITIONS:
            return f"{keyword} is {value!r}"
    return None


def _number_of_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames", None)
    return 1 if value in (None, "") else int(value)


IMAGE_PIXEL_SIZES = ("Rows", "Columns", "BitsAllocated", "BitsStored")


def _decode_problem(ds: Dataset, opts: _Options) -> str | None:
    """None when the pixel data can be decoded, else a sentence saying why not."""
    for keyword in IMAGE_PIXEL_SIZES:
        value = ds.get(keyword, None)
        if value in (None, "") or int(value) < 1:
            found = "absent" if value in (None, "") else str(value)
            return f"{keyword} is {found}; the Image Pixel module needs {', '.join(IMAGE_PIXEL_SIZES)} of at least 1"
    tsyntax = pixels.transfer_syntax_of(ds)
    if tsyntax is None:
        return "the Transfer Syntax UID is absent and the dataset's encoding is unknown"
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        return f"transfer syntax {tsyntax.name} ({tsyntax}) has no pydicom decoder"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "an image codec plugin"
        return f"no decoding plugin for {tsyntax.name} is installed (needs {missing})"
    if opts.header_only:
        return None
    encapsulated = bool(ds["PixelData"].is_undefined_length)
    if tsyntax.is_encapsulated and not encapsulated:
        return f"transfer syntax is {tsyntax.name}, which needs encapsulated Pixel Data, but it is native"
    if not tsyntax.is_encapsulated and encapsulated:
        return f"transfer syntax is {tsyntax.name} (native), but the Pixel Data is encapsulated"
    if not tsyntax.is_encapsulated:
        expected, found = get_expected_length(ds), len(ds.PixelData)
        if found < expected:
            return f"Pixel Data is {found} bytes; Rows, Columns and BitsAllocated need {expected}"
    elif not _first_fragment(ds.PixelData).startswith(FRAGMENT_SIGNATURES.get(tsyntax, (b"",))):
        return f"transfer syntax is {tsyntax.name}, but the first Pixel Data fragment is not a {tsyntax.name} stream"
    if opts.decode:
        try:
            pixels.decode(ds)
        except Exception as exc:  # any decoder error means "not decodable"; its text is the reason
            return f"decoding {tsyntax.name} Pixel Data failed: {type(exc).__name__}: {exc}"
    return None


def short_native_pixel_data(ds: Dataset) -> str | None:
    """Why the native Pixel Data of ``ds`` is shorter than its header needs, else None.

    For the SCP: a cheap check before answering on a header read with ``defer_size`` (the Pixel
    Data value is never read, only its length), so an instance cut short, or one whose Rows,
    Columns or BitsAllocated are wrong, is refused as malformed instead of being acknowledged and
    then skipped as undecodable. Encapsulated (compressed) Pixel Data has no expected length and is
    left to the worker's ``decodable`` rule.
    """
    raw = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    if raw is None:
        return None
    # a raw element (deferred, or not yet converted) has its length; a converted one its value
    length = raw.length if hasattr(raw, "length") else len(raw.value or b"")
    if length in (0, UNDEFINED_LENGTH):
        return None
    tsyntax = pixels.transfer_syntax_of(ds)
    if tsyntax is not None and tsyntax.is_encapsulated:
        return None
    try:
        expected = get_expected_length(ds)
    except (AttributeError, KeyError, TypeError, ValueError):  # not an image header: not ours to judge
        return None
    if length >= expected:
        return None
    return (
        f"Pixel Data is {length} bytes; Rows {ds.get('Rows')} x Columns {ds.get('Columns')} x "
        f"BitsAllocated {ds.get('BitsAllocated')} x SamplesPerPixel {ds.get('SamplesPerPixel', 1)} x "
        f"frames {ds.get('NumberOfFrames', 1)} need {expected}: the instance is truncated or its Image Pixel "
        "attributes are wrong"
    )


def _first_fragment(encapsulated: bytes, size: int = 16) -> bytes:
    """The first bytes of the first fragment: skip the Basic Offset Table item and one item header."""
    offset_table_bytes = int.from_bytes(encapsulated[4:ITEM_HEADER_BYTES], "little")
    start = ITEM_HEADER_BYTES + offset_table_bytes + ITEM_HEADER_BYTES
    return bytes(encapsulated[start : start + size])


RULES: tuple[Rule, ...] = (
    Rule(
        "own_output",
        lambda ds, o: not is_own_output(ds, o.own_device_uid),
        lambda ds, o: f"produced by this node (our DeviceUID or SeriesDescription marker {SERIES_MARKER!r}); "
        "skipped to avoid a routing loop",
    ),
    Rule(
        "modality",
        lambda ds, o: _text(ds, "Modality") in ACCEPTED_MODALITIES,
        lambda ds, o: f"{_found(ds, 'Modality')}; only {', '.join(ACCEPTED_MODALITIES)} are processed",
    ),
    Rule("body_part", _is_chest, _body_part_reason),
    Rule(
        "position",
        lambda ds, o: _bad_position(ds) is None,
        lambda ds, o: f"{_bad_position(ds)}; expected a view (PA, AP, LL, RL, …) or a patient position "
        "(HFS, FFS, …) — the header looks mislabelled",
    ),
    Rule(
        "pixel_data",
        lambda ds, o: o.header_only or "PixelData" in ds,
        lambda ds, o: "Pixel Data (7FE0,0010) is absent; only images with Pixel Data are processed "
        "(Float/Double Float Pixel Data is not supported)",
    ),
    Rule(
        "samples_per_pixel",
        lambda ds, o: ds.get("SamplesPerPixel", None) == 1,
        lambda ds, o: f"SamplesPerPixel is {ds.get('SamplesPerPixel', 'absent')}; only 1 (grayscale) is processed",
    ),
    Rule(
        "photometric",
        lambda ds, o: _text(ds, "PhotometricInterpretation") in ACCEPTED_PHOTOMETRIC,
        lambda ds, o: f"{_found(ds, 'PhotometricInterpretation')}; only {', '.join(ACCEPTED_PHOTOMETRIC)} "
        "are processed",
    ),
    Rule(
        "single_frame",
        lambda ds, o: _number_of_frames(ds) == 1,
        lambda ds, o: f"NumberOfFrames is {_number_of_frames(ds)}; only single-frame images are processed",
    ),
    Rule(
        "decodable",
        lambda ds, o: _decode_problem(ds, o) is None,
        lambda ds, o: f"Pixel Data cannot be decoded: {_decode_problem(ds, o)}",
    ),
)
