"""The C-ECHO / C-STORE SCP: validate the header, write durably, answer, and nothing more.

Handlers are bound with their dependencies and *return* a named status; they never raise (a raise
would become pynetdicom's generic 0xC211) and never decode pixels or touch torch. Datasets arrive
in chunks straight to a file in ``spool/tmp`` (``STORE_RECV_CHUNKED_DATASET``); the handler reads
the header only, fsyncs, renames the file into ``spool/incoming`` and only then answers 0x0000.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from cxr_sr_node import eligibility, pixels, statuses
from cxr_sr_node.config import NodeConfig
from cxr_sr_node.logs import get_logger
from cxr_sr_node.spool import Spool, safe_name

# Every transfer syntax pydicom (+ pylibjpeg) can decode; offered for every storage SOP class.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# A deflated dataset is inflated in memory to read its header (pydicom cannot defer it): bounded, or
# 400 KiB sent made the receiving process grow by 800 MB
DEFLATE_MAX_INFLATED_MB = 256

log = get_logger("cxr_sr_node.scp")


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle's algorithm: DIMSE messages are small writes followed by a wait for a reply."""
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def handle_conn_open(event: evt.Event) -> None:
    set_nodelay(event.assoc.dul.socket.socket if event.assoc.dul.socket else None)


MIN_PDU_RATE_BYTES_PER_S = 64 * 1024  # a PDU must arrive at least this fast (after network_timeout_s of grace)


def guard_reads(assoc_socket: Any, *, limit: int, timeout_s: float | None, max_instance_bytes: int | None) -> None:
    """Wrap an association socket's ``recv`` (which pynetdicom's reader calls with the exact length of
    each PDU) with three bounds.

    - A PDU announced above ``limit`` is refused before it is read: pynetdicom buffered a whole
      PDU in memory whatever its announced length (up to 4 GiB) and the maximum it advertised.
    - A PDU must arrive within ``timeout_s`` plus its length at ``MIN_PDU_RATE_BYTES_PER_S``: a
      peer that trickles one byte just inside the socket's read deadline held its association.
    - An instance larger than ``max_instance_bytes`` ends the association as soon as its dataset
      fragments pass it (``max_instance_mb`` was checked only after the whole instance was on
      disk); the partial file is deleted as for any aborted association.
    Each refusal is answered as a broken connection (pynetdicom then closes it) and logged.
    """
    raw = assoc_socket.socket
    state: dict[str, Any] = {"pdu_type": None, "dataset_bytes": 0}  # the PDU being read; the instance's size

    def refuse(event: str, reason: str) -> None:
        log.warning(event, reason=reason, assoc_id=id(assoc_socket.assoc))
        raise ConnectionError(reason)

    def guarded(nr_bytes: int) -> bytearray:
        if nr_bytes > limit:
            refuse("association.pdu_too_large", f"the peer announced a PDU of {nr_bytes} bytes, above the "
                                                f"{limit} this node accepts; connection closed")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s + nr_bytes / MIN_PDU_RATE_BYTES_PER_S
        data = bytearray()
        try:
            while len(data) < nr_bytes:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        refuse("association.too_slow", f"a PDU of {nr_bytes} bytes did not arrive in time "
                                                       f"({len(data)} received); connection closed")
                    raw.settimeout(min(left, timeout_s))
                chunk = raw.recv(min(nr_bytes - len(data), 65536))
                if not chunk:  # the peer closed: return what there is, as pynetdicom's recv does
                    break
                data.extend(chunk)
        finally:
            with contextlib.suppress(OSError):
                raw.settimeout(timeout_s)
        if nr_bytes == 6 and len(data) == 6:  # a PDU header: remember its type for the body that follows
            state["pdu_type"] = data[0]
        elif state.get("pdu_type") == 0x04 and max_instance_bytes is not None:  # P-DATA-TF body
            state["pdu_type"] = None
            _count_dataset_bytes(data, state)
            if state["dataset_bytes"] > max_instance_bytes:
                refuse("store.too_large", f"instance passed max_instance_mb ({max_instance_bytes} bytes) while "
                                          "arriving; association closed, the partial file deleted")
        return data

    assoc_socket.recv = guarded


def _count_dataset_bytes(body: bytes | bytearray, state: dict[str, Any]) -> None:
    """Add the dataset fragments of one P-DATA-TF body (PS3.8 9.3.5) to ``state["dataset_bytes"]``;
    a last fragment ends the instance (the count restarts with the next one)."""
    at = 0
    while at + 6 <= len(body):
        item_length = int.from_bytes(body[at:at + 4], "big")
        control = body[at + 5]
        if not control & 0x01:  # a dataset fragment (bit 0 set: a command)
            state["dataset_bytes"] += max(item_length - 2, 0)
            if control & 0x02:  # its last fragment: the instance is complete
                state["dataset_bytes"] = 0
        at += 4 + item_length


class BoundedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with two waits bounded.

    - The TLS handshake runs in the connection's own thread with a deadline: pynetdicom makes it in
      the accept loop without one, so a single connection that sends nothing froze every later
      connection for as long as it stayed open.
    - Every read has a deadline (``read_timeout_s``, the node's ``network_timeout_s``): accepted
      sockets are otherwise blocking without a timeout, so a peer that stops halfway through a PDU
      held its association (one of ``max_associations``) until it disconnected, even after
      pynetdicom's own network timeout had logged the association as aborted.
    """

    read_timeout_s: float | None = None
    handshake_timeout_s: float = 10.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        return self.socket.accept()  # plain accept: the handshake is finish_request's, in its thread

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.read_timeout_s)
        if self.ssl_context:
            request.settimeout(self.handshake_timeout_s)
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
                log.warning("tls.handshake_failed", address=client_address[0], reason=f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(OSError):
                    request.close()
                return
            request.settimeout(self.read_timeout_s)
        super().finish_request(request, client_address)


class SeriesTracker:
    """Which series are still arriving: the associations delivering them and the last arrival.

    A series is complete when every association that delivered it has ended and nothing arrived
    for ``idle_s``, or ``max_wait_s`` after its first instance, whatever is still open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], dict[str, Any]] = {}
        self._assoc_series: dict[int, set[tuple[str, str]]] = {}

    def arrived(self, key: tuple[str, str], assoc_id: int) -> None:
        now = time.monotonic()
        with self._lock:
            state = self._series.setdefault(key, {"first": now, "last": now, "assocs": set()})
            state["last"] = now
            state["assocs"].add(assoc_id)
            self._assoc_series.setdefault(assoc_id, set()).add(key)

    def association_ended(self, assoc_id: int) -> None:
        with self._lock:
            for key in self._assoc_series.pop(assoc_id, set()):
                if key in self._series:
                    self._series[key]["assocs"].discard(assoc_id)
                    self._series[key]["last"] = time.monotonic()

    def is_complete(self, key: tuple[str, str], *, idle_s: float, max_wait_s: float, fallback_age_s: float) -> bool:
        now = time.monotonic()
        with self._lock:
            state = self._series.get(key)
            if state is None:  # received before a restart: its associations are long gone
                return fallback_age_s >= idle_s
            if now - state["first"] >= max_wait_s:
                return True
            return not state["assocs"] and now - state["last"] >= idle_s

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._series.pop(key, None)


def _clip(value: Any, limit: int) -> Any:
    """A value sent by a peer, cut to ``limit`` characters for a reason text (the log renderer clips
    every logged value itself: ``logs.MAX_VALUE_CHARS``)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}...(+{len(value) - limit} chars)"
    return value


def _command_mismatch(request: Any, header: pydicom.Dataset) -> str | None:
    """Why the C-STORE command and its dataset disagree on the SOP Class / Instance UID, else None.

    The spool files an instance under its dataset's SOP Instance UID: two commands for different
    instances that carry one dataset UID were both acknowledged and the second overwrote the first
    (PS3.4 C.4.2.1.4.1: the dataset must match the command; 0xA900 otherwise)."""
    for keyword, command_keyword in (("SOPInstanceUID", "AffectedSOPInstanceUID"),
                                     ("SOPClassUID", "AffectedSOPClassUID")):
        in_command = str(getattr(request, command_keyword, "") or "").strip("\0 ")
        in_dataset = str(header.get(keyword, "") or "").strip("\0 ")
        if in_command and in_dataset and in_command != in_dataset:
            return (f"the dataset's {keyword} {_clip(in_dataset, 64)} is not the command's {command_keyword} "
                    f"{_clip(in_command, 64)}: the sender mixed up its instances")
    return None


def inflated_size_over(path: Path, limit: int) -> int | None:
    """For a Deflated Explicit VR Little Endian file: how many bytes its dataset inflated to before
    passing ``limit`` (counting stops there, in 1 MiB steps), else None (not deflated, or small enough)."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - no readable file meta: not a deflated Part 10 file; dcmread judges it
        return None
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian or "FileMetaInformationGroupLength" not in meta:
        return None
    with open(path, "rb") as f:
        f.seek(132 + 12 + int(meta.FileMetaInformationGroupLength))  # preamble, DICM, (0002,0000) element, group 2
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while chunk := f.read(65536):
            while chunk:
                try:
                    out = inflater.decompress(chunk, 1 << 20)
                except zlib.error:
                    return None  # not valid deflate: the header read refuses it
                total += len(out)
                if total > limit:
                    return total
                chunk = inflater.unconsumed_tail
    return None


def beyond_end_of_file(header: pydicom.Dataset, file_size: int) -> str | None:
    """Why a deferred (unread) element of ``header`` claims bytes past the end of the file, else None.

    A header read with ``defer_size`` only notes where each large value starts and how long it
    says it is: a Pixel Data declaring 2 GiB with 16 bytes behind it parsed fine and was
    acknowledged, then failed to decode."""
    for tag in list(header.keys()):
        elem = header.get_item(tag, keep_deferred=True)  # elements() would read the deferred values
        tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
        if elem.value is None and tell is not None and length not in (None, 0xFFFFFFFF) and tell + length > file_size:
            return (f"element {elem.tag} declares {length} bytes but the instance ends {file_size - tell} bytes "
                    "after it starts: the instance is truncated")
    return None


def server_tls_context(cfg: NodeConfig) -> ssl.SSLContext | None:
    """DICOM TLS (PS3.15 B.9 / BCP 195): TLS 1.2+, our certificate, optionally client certificates.
    None without ``tls_cert``; ssl.SSLError for files that are not a PEM certificate and its key."""
    if cfg.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=cfg.tls_cert, keyfile=cfg.tls_key)
    if cfg.tls_ca is not None:
        context.load_verify_locations(cafile=cfg.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class StorageSCP:
    """pynetdicom AE serving C-ECHO and C-STORE into the spool."""

    def __init__(
        self,
        config: NodeConfig,
        spool: Spool,
        tracker: SeriesTracker,
        *,
        on_store: Callable[[int], None] | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.tracker = tracker
        self.on_store = on_store or (lambda status: None)
        self.server = None
        # per association: what it did, for the audit line at its end (who, from where, what, outcome)
        self._activity: dict[int, Counter[str]] = {}
        self._activity_lock = threading.Lock()
        self.ae = AE(ae_title=config.ae_title)
        self.ae.require_called_aet = True
        self.ae.maximum_associations = config.max_associations
        self.ae.maximum_pdu_size = config.max_pdu
        self.ae.acse_timeout = config.acse_timeout_s
        self.ae.dimse_timeout = config.dimse_timeout_s
        self.ae.network_timeout = config.network_timeout_s
        self.ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        if not config.allow:
            log.warning("scp.open_to_all", detail="no allow-list: any calling AE may store; set allow")

    def pdu_limit(self) -> int:
        """The longest PDU read: the advertised max_pdu (P-DATA), at least 1 MiB (an A-ASSOCIATE-RQ
        proposing every storage class), 256 MiB when max_pdu = 0 ("unlimited")."""
        return max(self.config.max_pdu, 2**20) if self.config.max_pdu else 256 * 2**20

    def handle_conn_open(self, event: evt.Event) -> None:
        handle_conn_open(event)
        if event.assoc.dul.socket is not None and event.assoc.dul.socket.socket is not None:
            guard_reads(event.assoc.dul.socket, limit=self.pdu_limit(), timeout_s=self.config.network_timeout_s,
                        max_instance_bytes=self.config.max_instance_mb * 1024 * 1024)

    def handlers(self) -> list:
        return [
            (evt.EVT_CONN_OPEN, self.handle_conn_open),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_ESTABLISHED, self.handle_established),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.handle_ended),
            (evt.EVT_ABORTED, self.handle_ended),
        ]

    def start(self) -> None:
        # pynetdicom writes chunked receives with NamedTemporaryFile: put them on the spool's file
        # system, so accepting one is a rename, not a copy. These are process-wide settings (the
        # process is the node); stop() restores them. Set once the server exists: a start that fails
        # (port in use, bad TLS files) must not leave them changed (later temporary files of the
        # process landed in spool/tmp).
        server = self.ae.make_server(
            (self.config.bind_address, self.config.port), evt_handlers=self.handlers(),
            ssl_context=self.tls_context(), server_class=BoundedServer,
        )
        self._previous_globals = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET,
                                  _config.UNRESTRICTED_STORAGE_SERVICE)
        tempfile.tempdir = str(self.spool.tmp_dir)
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.UNRESTRICTED_STORAGE_SERVICE = self.config.accept_any_sop_class
        self.server = server
        self.server.read_timeout_s = self.config.network_timeout_s
        self.server.handshake_timeout_s = min(10.0, self.config.network_timeout_s)
        self.ae._servers.append(self.server)  # as start_server does: the server's shutdown() removes it there
        threading.Thread(target=self.server.serve_forever, name="scp-acceptor", daemon=True).start()
        log.info("scp.started", ae_title=self.config.ae_title, port=self.port, bind_address=self.config.bind_address,
                 tls=self.config.tls_cert is not None, client_certificates=self.config.tls_ca is not None)

    def tls_context(self) -> ssl.SSLContext | None:
        return server_tls_context(self.config)

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.config.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
            (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET,
             _config.UNRESTRICTED_STORAGE_SERVICE) = self._previous_globals
            log.info("scp.stopped")

    # --- handlers --------------------------------------------------------------------------------
    def _allowed(self, ae_title: str, address: str) -> bool:
        return not self.config.allow or any(rule.matches(ae_title, address) for rule in self.config.allow)

    def handle_requested(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        calling = rq.primitive.calling_ae_title.strip() if rq.primitive else ""
        if not self._allowed(calling, rq.address):
            log.warning("association.rejected", calling_ae=calling, address=rq.address, reason="calling AE not allowed")
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, calling AE not recognised
            event.assoc.kill()  # waits until the A-ASSOCIATE-RJ is on the wire, as pynetdicom's own checks do
            return
        called = rq.primitive.called_ae_title.strip() if rq.primitive else ""
        if called != self.config.ae_title:
            # pynetdicom's own check (require_called_aet) would reject it too, but without a log line:
            # a peer configured with the wrong AE title is the commonest set-up error
            log.warning("association.rejected", calling_ae=calling, address=rq.address, called_ae=called,
                        reason=f"called AE title {called!r} is not this node's {self.config.ae_title!r} (ae_title)")
            event.assoc.acse.send_reject(0x01, 0x01, 0x07)  # rejected-permanent, called AE not recognised
            event.assoc.kill()
            return
        active = sum(1 for a in self.ae.active_associations if a.is_acceptor)  # this one included
        if active > self.config.max_associations:
            # pynetdicom would reject it too (the same transient local-limit reason), without a log line
            log.warning("association.rejected", calling_ae=calling, address=rq.address,
                        reason=f"max_associations={self.config.max_associations} already open; retry later")
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)  # rejected-transient, local limit exceeded
            event.assoc.kill()
            return
        free_mb = self.spool.free_mb()
        if free_mb < self.config.min_free_disk_mb:
            # before any data arrives: an instance is otherwise written in full, then refused (0xA700)
            log.warning("association.rejected", calling_ae=calling, address=rq.address,
                        reason=f"free disk {free_mb} MiB below min_free_disk_mb={self.config.min_free_disk_mb}")
            event.assoc.acse.send_reject(0x02, 0x03, 0x01)  # rejected-transient, temporary congestion: retry later
            event.assoc.kill()

    def handle_established(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        log.info("association.accepted", calling_ae=rq.ae_title.strip(), address=rq.address, port=rq.port,
                 assoc_id=id(event.assoc))

    def _count(self, assoc: Any, *keys: str) -> None:
        with self._activity_lock:
            self._activity.setdefault(id(assoc), Counter()).update(keys)

    def handle_ended(self, event: evt.Event) -> None:
        self.tracker.association_ended(id(event.assoc))
        rq = event.assoc.requestor
        outcome = "released" if event.event is evt.EVT_RELEASED else "aborted"
        with self._activity_lock:
            activity = self._activity.pop(id(event.assoc), Counter())
        statuses_seen = {k.removeprefix("status:"): n for k, n in sorted(activity.items()) if k.startswith("status:")}
        log.info(f"association.{outcome}", calling_ae=rq.ae_title.strip(), address=rq.address, assoc_id=id(event.assoc),
                 echoes=activity["echo"], stored=statuses_seen.get("0x0000", 0),
                 refused=sum(n for k, n in statuses_seen.items() if k != "0x0000"), statuses=statuses_seen,
                 sop_classes=sorted(k.removeprefix("sop_class:") for k in activity if k.startswith("sop_class:")))
        if outcome == "aborted":
            self._discard_partial(event.assoc)

    def _discard_partial(self, assoc: Any) -> None:
        """Delete the instance an aborted association was still sending.

        pynetdicom writes a chunked C-STORE into a temporary file in ``spool/tmp`` and deletes it
        only after the handler ran; a transfer cut off mid-instance (peer killed, cable pulled)
        leaves it there, and a peer that keeps dropping large transfers would fill the disk until
        every store is refused. The in-progress message is pynetdicom's ``assoc.dimse.message``
        (private attributes, read defensively); ``Spool.sweep_tmp`` is the backstop for anything
        this misses. Nothing here was acknowledged, so nothing acknowledged is lost.
        """
        message = getattr(getattr(assoc, "dimse", None), "message", None)
        handle, path = getattr(message, "_data_set_file", None), getattr(message, "_data_set_path", None)
        if path is None or Path(path).parent.resolve() != self.spool.tmp_dir.resolve():
            return
        with contextlib.suppress(OSError):
            if handle is not None:
                handle.close()
        try:
            size = Path(path).stat().st_size
            Path(path).unlink()
        except OSError:
            return
        log.info("store.partial_discarded", assoc_id=id(assoc), bytes=size,
                 reason="association aborted mid-instance; nothing of it was acknowledged")

    def handle_echo(self, event: evt.Event) -> int:
        self._count(event.assoc, "echo")
        log.info("echo.received", calling_ae=event.assoc.requestor.ae_title.strip(), assoc_id=id(event.assoc))
        return statuses.SUCCESS

    def handle_store(self, event: evt.Event) -> int:
        started = time.perf_counter()
        try:
            status, fields = self._store(event)
        except OSError as exc:  # the spool could not take it (disk, permissions): the peer may retry later
            status, fields = statuses.OUT_OF_RESOURCES, {"reason": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # noqa: BLE001 - the SCP must keep serving; the reason is logged
            # anything else comes from what was sent (e.g. a made-up transfer syntax UID): 0xA700
            # would tell the peer to retry the same bytes
            status, fields = statuses.CANNOT_UNDERSTAND, {"reason": f"{type(exc).__name__}: {exc}"}
        fields["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 2)
        rq = event.assoc.requestor
        name = "store.received" if status == statuses.SUCCESS else "store.refused"
        self._count(event.assoc, f"status:0x{status:04X}", f"sop_class:{event.request.AffectedSOPClassUID}")
        (log.info if status == statuses.SUCCESS else log.warning)(
            name, status=f"0x{status:04X}", calling_ae=rq.ae_title.strip(), address=rq.address,
            assoc_id=id(event.assoc), **fields
        )
        self.on_store(status)
        return status

    def _store(self, event: evt.Event) -> tuple[int, dict[str, Any]]:
        path = Path(event.dataset_path)
        rq = event.assoc.requestor
        calling, address = rq.ae_title.strip(), rq.address
        size = path.stat().st_size
        fields: dict[str, Any] = {"bytes": size, "sop_instance_uid": str(event.request.AffectedSOPInstanceUID)}
        if size > self.config.max_instance_mb * 1024 * 1024:
            fields["reason"] = f"instance of {size} bytes exceeds max_instance_mb={self.config.max_instance_mb}"
            return statuses.OUT_OF_RESOURCES, fields
        free_mb = self.spool.free_mb()
        if free_mb < self.config.min_free_disk_mb:
            fields["reason"] = f"free disk {free_mb} MiB below min_free_disk_mb={self.config.min_free_disk_mb}"
            return statuses.OUT_OF_RESOURCES, fields
        limit_mb = min(self.config.max_instance_mb, DEFLATE_MAX_INFLATED_MB)
        inflated = inflated_size_over(path, limit_mb * 1024 * 1024)
        if inflated is not None:
            fields["reason"] = (f"deflated instance inflates to more than {inflated} bytes, above "
                                f"{limit_mb} MiB (max_instance_mb, at most {DEFLATE_MAX_INFLATED_MB} for deflate)")
            return statuses.OUT_OF_RESOURCES, fields
        try:
            # one read serves every check: Pixel Data is deferred (its length known, its value unread)
            header = pydicom.dcmread(path, defer_size=1024)
            uids = {k: str(header[k].value).strip() for k in REQUIRED_UIDS if k in header and header[k].value}
        except Exception as exc:  # noqa: BLE001 - any parse failure means we cannot understand it
            reason = f"dataset cannot be parsed: {type(exc).__name__}: {exc}"
            self.spool.quarantine(path, reason=reason, calling_ae=calling, address=address)
            fields["reason"] = reason
            return statuses.CANNOT_UNDERSTAND, fields
        missing = [k for k in REQUIRED_UIDS if k not in uids]
        if missing:
            reason = f"dataset lacks {', '.join(missing)}"
            self.spool.quarantine(path, reason=reason, calling_ae=calling, address=address)
            fields["reason"] = reason
            return statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, fields
        fields.update(series_instance_uid=uids["SeriesInstanceUID"], study_instance_uid=uids["StudyInstanceUID"],
                      sop_instance_uid=uids["SOPInstanceUID"])
        deflated = pixels.transfer_syntax_of(header) == DeflatedExplicitVRLittleEndian  # offsets are inflated ones
        problem = (_command_mismatch(event.request, header) or (None if deflated else beyond_end_of_file(header, size))
                   or eligibility.short_native_pixel_data(header))
        if problem:
            self.spool.quarantine(path, reason=problem, calling_ae=calling, address=address)
            fields["reason"] = problem
            return statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, fields
        if self.config.reject_ineligible and not eligibility.is_own_output(header, self.config.device_uid):
            verdict = eligibility.check(header, require_body_part=self.config.require_body_part, header_only=True,
                                        own_device_uid=self.config.device_uid, decode=False)
            if not verdict.eligible:
                fields.update(rule=verdict.rule, reason=verdict.reason)
                return statuses.INELIGIBLE_REFUSED, fields
        # tracked before the file is in place: the scheduler takes a series it does not track as one
        # received before a restart (complete once idle), which a slow fsync could otherwise fake
        key = (safe_name(uids["StudyInstanceUID"]), safe_name(uids["SeriesInstanceUID"]))
        self.tracker.arrived(key, id(event.assoc))
        self.spool.accept_instance(
            path,
            study_uid=uids["StudyInstanceUID"],
            series_uid=uids["SeriesInstanceUID"],
            sop_uid=uids["SOPInstanceUID"],
            calling_ae=calling,
            address=address,
        )
        return statuses.SUCCESS, fields
