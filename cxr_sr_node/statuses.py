"""DICOM status codes the node returns, by name (PS3.4 Annex B, PS3.7 Annex C).

Every failure the SCP knows about maps to one of these in one place, so a handler returns a
named constant and never a bare hex number.
"""

from __future__ import annotations

SUCCESS = 0x0000
# C-STORE failures (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700  # disk below the free-space floor, instance too large, spool write failed
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # lacks the UIDs the node needs, or native Pixel Data shorter than its header says
CANNOT_UNDERSTAND = 0xC000  # not a parseable dataset; quarantined
NOT_AUTHORISED = 0x0124  # calling AE not in the allow-list (also rejected at association)
SOP_CLASS_NOT_SUPPORTED = 0x0122
INELIGIBLE_REFUSED = 0xA901  # reject_ineligible=true: header rules say this is not a chest CR/DX

NAMES = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES: "Refused: Out of resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data set does not match SOP class",
    CANNOT_UNDERSTAND: "Error: Cannot understand",
    NOT_AUTHORISED: "Refused: Not authorised",
    SOP_CLASS_NOT_SUPPORTED: "Refused: SOP class not supported",
    INELIGIBLE_REFUSED: "Error: Data set does not match SOP class (ineligible for processing)",
}


def describe(status: int) -> str:
    return f"0x{status:04X} {NAMES.get(status, 'Unknown status')}"
