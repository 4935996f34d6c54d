"""C-STORE SCU: send a job's derived instances to a peer over one association.

Retries and backoff are the caller's (the spool's send stage); this module makes one attempt and
reports either success or a ``SendError`` whose message names the peer and the DICOM status or
network error, which ends up in ``failed/<job>/reason.json`` after the last try.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from cxr_sr_node import statuses
from cxr_sr_node.config import Peer
from cxr_sr_node.scp import handle_conn_open

# Warning statuses (coercion, elements discarded, does not match SOP class) still mean stored.
WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}


class SendError(RuntimeError):
    """A send attempt failed; the message names the peer and the status or network error."""


@dataclass(frozen=True)
class SendResult:
    peer: str
    sent: int
    statuses: dict[str, str]  # SOPInstanceUID -> status


def send_files(
    peer: Peer,
    files: list[Path],
    *,
    calling_ae: str,
    timeout_s: float = 60.0,
    max_pdu: int = 262144,
) -> SendResult:
    if not files:
        return SendResult(str(peer), 0, {})
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.maximum_pdu_size = max_pdu
    for sop_class in sorted({str(h.SOPClassUID) for h in headers}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, handle_conn_open)])
    except OSError as exc:
        raise SendError(f"{peer}: cannot connect ({exc})") from None
    if not assoc.is_established:
        raise SendError(f"{peer}: {_not_established(peer, assoc, calling_ae)}")
    results: dict[str, str] = {}
    try:
        for path, header in zip(files, headers, strict=True):
            status = assoc.send_c_store(path)
            uid = str(header.SOPInstanceUID)
            if not status or "Status" not in status:
                raise SendError(f"{peer}: no response to C-STORE of {uid} within dimse_timeout_s={timeout_s:g} s, or "
                                f"the connection was lost; a peer that does not accept calling AE {calling_ae} may "
                                "drop it here (Orthanc: add it to DicomModalities), a busy one may need a longer "
                                "dimse_timeout_s")
            code = int(status.Status)
            results[uid] = f"0x{code:04X}"
            if code != statuses.SUCCESS and code not in WARNING_STATUSES:
                raise SendError(f"{peer}: C-STORE of {uid} answered 0x{code:04X} ({_status_name(code)})")
    finally:
        if assoc.is_established:
            assoc.release()
    return SendResult(str(peer), len(results), results)


def _not_established(peer: Peer, assoc: Any, calling_ae: str) -> str:
    """Why an association did not come up and what to check, as far as can be told: pynetdicom logs
    the socket error but does not return it, so a refused or unreachable peer is told apart from
    one that took the connection and then aborted by trying the TCP connection once more."""
    knows_us = f"check the AE title {peer.ae_title} and that the peer knows us as {calling_ae}"
    if assoc.is_rejected:
        return f"association rejected; {knows_us}"
    try:
        with socket.create_connection((peer.host, peer.port), timeout=5):
            pass
    except OSError as exc:
        return (f"cannot connect ({exc.strerror or exc}); check that the peer runs and listens on "
                f"{peer.host}:{peer.port} (the job is tried again)")
    return (f"association aborted (the peer accepted the TCP connection, then dropped it, or did not answer "
            f"within the timeouts); {knows_us}")


def _status_name(code: int) -> str:
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    if code in STORAGE_SERVICE_CLASS_STATUS:
        return " - ".join(STORAGE_SERVICE_CLASS_STATUS[code])
    for (lo, hi), name in ((0xA700, 0xA7FF), "Out of resources"), ((0xA900, 0xA9FF), "Data set does not match SOP class"), ((0xC000, 0xCFFF), "Cannot understand"):
        if lo <= code <= hi:
            return name
    return "unknown status"


def echo(peer: Peer, *, calling_ae: str, timeout_s: float = 10.0) -> int:
    """C-ECHO a peer; returns the status (0x0000 success) or raises SendError."""
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise SendError(f"{peer}: {_not_established(peer, assoc, calling_ae)}")
    try:
        status = assoc.send_c_echo()
        if not status or "Status" not in status:
            raise SendError(f"{peer}: no response to C-ECHO")
        return int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()
