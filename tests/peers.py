"""Real peers for end-to-end tests: dcmtk ``storescp``, Orthanc, RabbitMQ, and dcmtk SCU wrappers.

Every peer runs as its own process on free loopback ports with its own configuration under a test
directory; its log goes to a file there and is quoted in the error when it fails to start. Starting
waits on a condition with a deadline (port open, ``GET /system``, AMQP handshake), never on a bare
sleep; stopping happens in ``finally`` (SIGTERM to the process group, SIGKILL after a deadline).

dcmtk and Orthanc get ``TCP_NODELAY=1`` in their environment (otherwise their DICOM sockets use
Nagle's algorithm). pynetdicom never sets ``TCP_NODELAY``; bind :data:`TCP_NODELAY_HANDLERS` to
``AE.associate(..., evt_handlers=...)`` and ``AE.start_server(..., evt_handlers=...)``.

A missing binary raises :class:`PeerMissing`, which the fixtures in ``conftest.py`` turn into a
skip naming the Debian package to install.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydicom import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from cxr_sr_node.procs import (
    HOST,
    Process,
    find_executable,
    free_port,
    free_ports,
    port_accepts,
    wait_until,
)

INSTALL_HINT = "apt-get install -y dcmtk orthanc rabbitmq-server"
LOG_TAIL_LINES = 60

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700

class PeerMissing(RuntimeError):
    """A peer's binary is not installed; the message names the Debian package."""


class PeerStartError(RuntimeError):
    """A peer exited or did not become ready; the message quotes the tail of its log."""


# --------------------------------------------------------------------------------------------------
# Ports and waiting (free_port, free_ports, port_accepts, wait_until and Process: cxr_sr_node.procs)


def port_is_bindable(port: int, host: str = "0.0.0.0") -> bool:
    """Whether ``port`` can be bound now (Orthanc binds 0.0.0.0, so that is the default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(host: str, port: int, deadline_s: float) -> None:
    """Wait until ``host:port`` accepts TCP connections."""
    wait_until(lambda: port_accepts(host, port), deadline_s, f"{host}:{port} to accept TCP connections")


def require_binary(name: str, package: str) -> str:
    """The absolute path of ``name``; raises :class:`PeerMissing` naming the Debian package."""
    # dcmtk's tools, not pynetdicom's Python apps of the same name (first on an activated venv's PATH)
    path = find_executable(name, native=package == "dcmtk")
    if path is None:
        raise PeerMissing(f"{name} not found (Debian package {package}): {INSTALL_HINT}")
    return path


def peer_env(**extra: str) -> dict[str, str]:
    """This process's environment plus ``TCP_NODELAY=1`` (read by dcmtk and Orthanc's DICOM layer)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------------
# Processes


@dataclass
class PeerProcess(Process):
    """One peer process in its own session, logging stdout+stderr to ``log_path``; ``stop`` sends
    SIGTERM to its process group."""

    error_type: ClassVar[type[Exception]] = PeerStartError
    tail_lines: ClassVar[int] = LOG_TAIL_LINES

    def listens_on(self, port: int) -> bool:
        """Whether a process of this peer's process group has a TCP socket listening on ``port``.

        Guards readiness checks against another program that grabbed the port after
        :func:`free_port` released it. Where ``/proc`` is unavailable, any listener counts.
        """
        if not self.alive or self.popen is None:
            return False
        inodes = _listening_socket_inodes(port)
        if inodes is None:
            return port_accepts(HOST, port)
        targets = {f"socket:[{inode}]" for inode in inodes}
        for pid in _process_group_members(self.popen.pid):
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd) in targets:
                            return True
        return False


def _listening_socket_inodes(port: int) -> set[str] | None:
    """Inodes of TCP sockets in LISTEN state on ``port`` (any address); None without ``/proc``."""
    inodes: set[str] = set()
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found_table = True
        for line in lines:
            fields = line.split()  # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes if found_table else None


def _process_group_members(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


# --------------------------------------------------------------------------------------------------
# pynetdicom: TCP_NODELAY and an in-process Storage SCP


def set_tcp_nodelay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: disable Nagle's algorithm on the association's socket.

    pynetdicom 3 triggers ``EVT_CONN_OPEN`` right after ``connect()`` (requestor) or after wrapping
    the accepted socket (acceptor), before any PDU is sent, so the option applies to the whole
    association. The socket is ``event.assoc.dul.socket.socket``.
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


TCP_NODELAY_HANDLERS: list[tuple[evt.NotificationEvent, Callable[[evt.Event], None]]] = [
    (evt.EVT_CONN_OPEN, set_tcp_nodelay)
]


@dataclass
class ReceivedInstance:
    calling_ae: str
    dataset: Dataset  # with file_meta


@dataclass
class PynetdicomStoreSCP:
    """An in-process Storage + Verification SCP; what it receives is kept in memory."""

    ae: str
    host: str
    port: int
    received: list[ReceivedInstance] = field(default_factory=list)
    echoes: list[str] = field(default_factory=list)  # calling AE titles
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def wait_for_instances(self, n: int, deadline_s: float = 30.0) -> list[ReceivedInstance]:
        wait_until(lambda: len(self.received) >= n, deadline_s, f"{n} instance(s) at {self.ae}@{self.port}")
        with self._lock:
            return list(self.received)

    def _on_store(self, event: evt.Event) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception:  # a handler returns a status, never raises
            return STATUS_OUT_OF_RESOURCES
        with self._lock:
            self.received.append(ReceivedInstance(event.assoc.requestor.ae_title, ds))
        return STATUS_SUCCESS

    def _on_echo(self, event: evt.Event) -> int:
        with self._lock:
            self.echoes.append(event.assoc.requestor.ae_title)
        return STATUS_SUCCESS


@contextlib.contextmanager
def pynetdicom_storescp(
    *, ae: str = "CXRSR", port: int = 0, evt_handlers: Sequence[tuple[Any, ...]] = ()
) -> Iterator[PynetdicomStoreSCP]:
    """Run a pynetdicom Storage SCP (all storage SOP classes + Verification) on 127.0.0.1.

    ``port=0`` lets the kernel pick the port while binding, so there is no race. Its sockets get
    ``TCP_NODELAY``; ``evt_handlers`` are bound after ours.
    """
    app = AE(ae_title=ae)
    app.supported_contexts = AllStoragePresentationContexts
    app.add_supported_context(Verification)
    app.network_timeout = 30
    app.acse_timeout = 30
    scp = PynetdicomStoreSCP(ae=ae, host=HOST, port=0)
    handlers = [
        *TCP_NODELAY_HANDLERS,
        (evt.EVT_C_STORE, scp._on_store),
        (evt.EVT_C_ECHO, scp._on_echo),
        *evt_handlers,
    ]
    server = app.start_server((HOST, port), block=False, evt_handlers=handlers)
    try:
        scp.port = server.server_address[1]
        yield scp
    finally:
        server.shutdown()


# --------------------------------------------------------------------------------------------------
# dcmtk storescp


@dataclass
class StoreSCP:
    """A running dcmtk ``storescp``; every received object is written to ``out_dir``."""

    ae: str
    host: str
    port: int
    out_dir: Path
    log_path: Path
    received_list: Path  # one file name per line, appended after each file is complete
    process: PeerProcess = field(repr=False)

    def files(self) -> list[Path]:
        """Completely received files in order of first arrival (a re-sent instance overwrites its file)."""
        try:
            names = self.received_list.read_text().split()
        except FileNotFoundError:
            return []
        return [self.out_dir / name for name in dict.fromkeys(names)]

    def receptions(self) -> int:
        """Number of C-STORE requests stored so far (re-sent instances count again)."""
        try:
            return len(self.received_list.read_text().split())
        except FileNotFoundError:
            return 0

    def wait_for_files(self, n: int, deadline_s: float = 30.0) -> list[Path]:
        def enough() -> list[Path] | None:
            if not self.process.alive:
                raise self.process.error(f"exited while waiting for {n} file(s)")
            files = self.files()
            return files if len(files) >= n else None

        try:
            return wait_until(enough, deadline_s, f"{n} file(s) in {self.out_dir}")
        except TimeoutError as exc:
            raise self.process.error(f"{exc}; {len(self.files())} received") from exc


@contextlib.contextmanager
def dcmtk_storescp(
    out_dir: Path,
    *,
    ae: str = "STORESCP",
    port: int | None = None,
    log_dir: Path | None = None,
    start_deadline_s: float = 15.0,
) -> Iterator[StoreSCP]:
    """Run ``storescp`` (single process, all transfer syntaxes) writing into ``out_dir``.

    Files are named ``<modality prefix>.<SOP Instance UID>`` as dcmtk does by default. After each file
    is written, ``storescp`` appends its name to ``received_list`` (``--exec-on-reception`` run
    synchronously), so :meth:`StoreSCP.files` never returns a half-written file. The log and the
    list live in ``log_dir`` (default: ``out_dir``'s parent).
    """
    binary = require_binary("storescp", "dcmtk")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_dir = Path(log_dir) if log_dir is not None else out_dir.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    received_list = log_dir / f"storescp-{port}-received.txt"
    on_reception = f"echo '#f' >> {shlex.quote(str(received_list))}"
    argv = [
        binary, "--verbose", "--single-process", "--aetitle", ae, "--output-directory", str(out_dir),
        "--accept-all", "--exec-on-reception", on_reception, "--exec-sync", str(port),
    ]  # fmt: skip
    process = PeerProcess("storescp", argv, log_dir / f"storescp-{port}.log", peer_env())
    scp = StoreSCP(ae, HOST, port, out_dir, process.log_path, received_list, process)
    try:
        process.start()
        process.wait_ready(lambda: process.listens_on(port), start_deadline_s, f"a listener on port {port}")
        yield scp
    finally:
        process.stop()


# --------------------------------------------------------------------------------------------------
# dcmtk SCUs


def echoscu(
    host: str,
    port: int,
    *,
    calling_ae: str = "ECHOSCU",
    called_ae: str = "ANY-SCP",
    timeout_s: float = 30.0,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run dcmtk ``echoscu`` (C-ECHO) once; ``returncode == 0`` means success."""
    argv = _scu_argv("echoscu", calling_ae, called_ae, timeout_s, extra_args, host, port)
    return subprocess.run(
        argv, capture_output=True, text=True, env=peer_env(), timeout=timeout_s + 10, check=False
    )


def storescu(
    host: str,
    port: int,
    files: Iterable[Path | str],
    *,
    calling_ae: str = "STORESCU",
    called_ae: str = "ANY-SCP",
    extra_args: Sequence[str] = (),
    timeout_s: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` over one association with dcmtk ``storescu``; ``returncode == 0`` means success.

    By default storescu proposes uncompressed transfer syntaxes only; a compressed file needs the
    matching ``--propose-*`` option, e.g. ``extra_args=("--propose-j2k-lossy",)`` for JPEG 2000
    (1.2.840.10008.1.2.4.91, like ``RG1_J2KI.dcm``).
    """
    paths = [str(f) for f in files]
    if not paths:
        raise ValueError("files must name at least one DICOM file, found none")
    argv = [*_scu_argv("storescu", calling_ae, called_ae, timeout_s, extra_args, host, port), *paths]
    return subprocess.run(
        argv, capture_output=True, text=True, env=peer_env(), timeout=timeout_s + 10, check=False
    )


def _scu_argv(
    name: str,
    calling_ae: str,
    called_ae: str,
    timeout_s: float,
    extra_args: Sequence[str],
    host: str,
    port: int,
) -> list[str]:
    """dcmtk SCU command line with connection, ACSE and DIMSE timeouts all set to ``timeout_s``."""
    t = str(max(1, int(timeout_s)))
    timeouts = ["--timeout", t, "--acse-timeout", t, "--dimse-timeout", t]
    return [
        require_binary(name, "dcmtk"),
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        *timeouts,
        *extra_args,
        host,
        str(port),
    ]


# --------------------------------------------------------------------------------------------------
# Orthanc


class OrthancError(RuntimeError):
    """A REST call to Orthanc answered with an HTTP error."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"Orthanc {method} {path} -> HTTP {status}: {body.strip()[:2000]}")
        self.method = method
        self.path = path
        self.status = status
        self.body = body


# Options verified against Orthanc 1.10.1 (`Orthanc --config=-`). There is no bind-address option:
# HTTP and DICOM listen on 0.0.0.0; RemoteAccessAllowed=false limits HTTP to localhost.
ORTHANC_BASE_CONFIG: dict[str, Any] = {
    "Name": "peers-test",
    "Plugins": [],  # our own config file: nothing from /usr/share/orthanc/plugins is loaded
    "LuaScripts": [],
    "ConcurrentJobs": 2,
    "StableAge": 2,
    "SaveJobs": False,
    "RemoteAccessAllowed": False,
    "AuthenticationEnabled": False,
    "RegisteredUsers": {},
    "HttpThreadsCount": 10,
    "DicomThreadsCount": 4,
    "OrthancExplorerEnabled": False,
    "WebDavEnabled": False,
    "DicomAlwaysAllowEcho": True,
    "DicomAlwaysAllowStore": True,  # otherwise an unknown AE's store is dropped with a reset
    "DicomCheckCalledAet": False,
    "DicomModalitiesInDatabase": False,
    "DicomAssociationCloseDelay": 0,  # close Orthanc's SCU association right after a store
    "DicomScuTimeout": 10,
    "OverwriteInstances": False,
    "StorageCompression": False,
    "TcpNoDelay": True,  # HTTP sockets; the DICOM ones follow the TCP_NODELAY environment variable
}


@dataclass
class OrthancServer:
    """A running Orthanc with a tiny urllib REST client (no proxy, no credentials)."""

    aet: str
    host: str
    http_port: int
    dicom_port: int
    work_dir: Path
    config_path: Path
    log_path: Path
    default_modalities: dict[str, dict[str, Any]]
    process: PeerProcess = field(repr=False)
    request_timeout_s: float = 60.0
    _opener: urllib.request.OpenerDirector = field(
        default_factory=lambda: urllib.request.build_opener(urllib.request.ProxyHandler({})), repr=False
    )

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    # --- raw REST -------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, raw: bool = False) -> Any:
        """``method path``; a dict/list body is sent as JSON, bytes as-is. JSON answers are decoded."""
        data: bytes | None
        headers = {}
        if body is None:
            data = None
        elif isinstance(body, bytes | bytearray):
            data, headers["Content-Type"] = bytes(body), "application/octet-stream"
        else:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        req = urllib.request.Request(self.http_url + path, data=data, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self.request_timeout_s) as resp:
                payload = resp.read()
                content_type = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise OrthancError(method, path, exc.code, exc.read().decode(errors="replace")) from None
        if raw:
            return payload
        if "json" in content_type:
            return json.loads(payload) if payload else None
        return payload.decode(errors="replace")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def get_bytes(self, path: str) -> bytes:
        return self.request("GET", path, raw=True)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, {} if body is None else body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    # --- resources ------------------------------------------------------------------------------

    def upload(self, dcm: bytes | Path | str) -> dict[str, Any]:
        """``POST /instances``; returns Orthanc's answer (``ID``, ``ParentSeries``, ``Status``...)."""
        data = dcm if isinstance(dcm, bytes | bytearray) else Path(dcm).read_bytes()
        return self.post("/instances", bytes(data))

    def studies(self) -> list[str]:
        return self.get("/studies")

    def series_of_study(self, study_id: str) -> list[dict[str, Any]]:
        return self.get(f"/studies/{study_id}/series")

    def instances_of_series(self, series_id: str) -> list[dict[str, Any]]:
        return self.get(f"/series/{series_id}/instances")

    def find_series(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every series of the study with that Study Instance UID (expanded)."""
        query = {"Level": "Series", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True}
        return self.post("/tools/find", query)

    def instance_file(self, instance_id: str) -> bytes:
        return self.get_bytes(f"/instances/{instance_id}/file")

    def statistics(self) -> dict[str, Any]:
        return self.get("/statistics")

    def wait_for_instances(self, n: int, deadline_s: float = 30.0) -> int:
        """Wait until Orthanc holds at least ``n`` instances; returns the count."""

        def count() -> list[int] | None:
            self.check_alive()
            found = int(self.statistics()["CountInstances"])
            return [found] if found >= n else None

        return wait_until(count, deadline_s, f"{n} instance(s) in Orthanc {self.aet}")[0]

    # --- modalities -----------------------------------------------------------------------------

    def register_modality(self, name: str, *, aet: str, port: int, host: str = HOST) -> None:
        """Add or update a modality at runtime (``PUT /modalities/{name}``)."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def modalities(self) -> dict[str, dict[str, Any]]:
        return self.get("/modalities?expand")

    def echo_modality(self, modality: str = "CXRSR", *, timeout_s: int = 10) -> bool:
        """Orthanc sends C-ECHO to ``modality``; True when it succeeded."""
        try:
            self.post(f"/modalities/{modality}/echo", {"Timeout": timeout_s})
        except OrthancError:
            return False
        return True

    def store_to_modality(
        self, modality: str = "CXRSR", resources: Sequence[str] = (), *, timeout_s: int = 30
    ) -> dict[str, Any]:
        """Orthanc C-STOREs ``resources`` (Orthanc IDs of any level) to ``modality``, synchronously."""
        if not resources:
            raise ValueError("resources must name at least one Orthanc ID, found none")
        body = {"Resources": list(resources), "Synchronous": True, "Timeout": timeout_s}
        return self.post(f"/modalities/{modality}/store", body)

    # --- lifecycle ------------------------------------------------------------------------------

    def check_alive(self) -> None:
        if not self.process.alive:
            raise self.process.error("is not running")

    def reset(self) -> None:
        """Back to a clean state: no patients, modalities as configured, no change/export logs."""
        self.check_alive()
        for patient in self.get("/patients"):
            self.delete(f"/patients/{patient}")
        configured = self.default_modalities
        for name in self.get("/modalities"):
            if name not in configured:
                self.delete(f"/modalities/{name}")
        for name, modality in configured.items():
            self.put(f"/modalities/{name}", modality)
        self.delete("/changes")
        self.delete("/exports")

    def start(self, deadline_s: float = 30.0) -> None:
        wait_until(
            lambda: port_is_bindable(self.http_port) and port_is_bindable(self.dicom_port),
            deadline_s,
            f"ports {self.http_port}/{self.dicom_port} to be released for Orthanc",
        )
        self.process.start()
        self.process.wait_ready(self._system_answers, deadline_s, f"GET {self.http_url}/system")

    def stop(self, deadline_s: float = 20.0) -> None:
        self.process.stop(deadline_s)

    def restart(self, deadline_s: float = 30.0) -> None:
        """Stop and start again with the same config and storage (ports included)."""
        self.stop()
        self.start(deadline_s)

    def _system_answers(self) -> bool:
        if not (self.process.listens_on(self.http_port) and self.process.listens_on(self.dicom_port)):
            return False
        try:
            return self.get("/system").get("DicomAet") == self.aet
        except (OSError, OrthancError, ValueError):
            return False


def orthanc_config(
    work_dir: Path,
    *,
    aet: str,
    http_port: int,
    dicom_port: int,
    modalities: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The JSON config written for :func:`orthanc_server` (exposed so tests can tweak a copy)."""
    storage = work_dir / "storage"
    return {
        **ORTHANC_BASE_CONFIG,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "DicomModalities": modalities,
    }


@contextlib.contextmanager
def orthanc_server(
    tmp_dir: Path,
    *,
    node_ae: str = "CXRSR",
    node_port: int | None = None,
    aet: str = "ORTHANC",
    start_deadline_s: float = 30.0,
    extra_config: dict[str, Any] | None = None,
) -> Iterator[OrthancServer]:
    """Run Orthanc with its config, storage and log under ``tmp_dir``.

    Our node is registered as modality ``node_ae`` (AET ``node_ae``, 127.0.0.1, ``node_port``) when
    ``node_port`` is given; otherwise register it later with :meth:`OrthancServer.register_modality`.
    """
    binary = require_binary("Orthanc", "orthanc")
    work_dir = Path(tmp_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_ports(2)
    modalities = {}
    if node_port is not None:
        modalities[node_ae] = {"AET": node_ae, "Host": HOST, "Port": node_port}
    config = orthanc_config(
        work_dir, aet=aet, http_port=http_port, dicom_port=dicom_port, modalities=modalities
    )
    config.update(extra_config or {})
    config_path = work_dir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    process = PeerProcess(
        "Orthanc", [binary, "--verbose", str(config_path)], work_dir / "orthanc.log", peer_env(), cwd=work_dir
    )
    server = OrthancServer(
        aet=aet,
        host=HOST,
        http_port=http_port,
        dicom_port=dicom_port,
        work_dir=work_dir,
        config_path=config_path,
        log_path=process.log_path,
        default_modalities=modalities,
        process=process,
    )
    try:
        server.start(start_deadline_s)
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------
# RabbitMQ

AMQP_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


def amqp_handshake(host: str, port: int, timeout_s: float = 2.0) -> bytes:
    """Send the AMQP 0-9-1 protocol header and return the payload of the Connection.Start frame.

    Raises :class:`ConnectionError` when the answer is not a Connection.Start method frame.
    """
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(AMQP_PROTOCOL_HEADER)
        header = _recv_exactly(sock, 7)
        frame_type, channel, size = header[0], int.from_bytes(header[1:3]), int.from_bytes(header[3:7])
        if frame_type != 1 or channel != 0 or size > 1 << 20:
            raise ConnectionError(f"expected an AMQP method frame on channel 0, found header {header!r}")
        payload = _recv_exactly(sock, size + 1)
    if payload[-1] != 0xCE or payload[:4] != b"\x00\x0a\x00\x0a":
        raise ConnectionError(f"expected Connection.Start (class 10, method 10), found {payload[:8]!r}")
    return payload[:-1]


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(chunks)} of {n} bytes")
        chunks += chunk
    return bytes(chunks)


@dataclass
class RabbitMQServer:
    host: str
    port: int
    node_name: str
    epmd_port: int
    dist_port: int
    state_dir: Path
    log_path: Path
    process: PeerProcess = field(repr=False)
    env: dict[str, str] = field(repr=False)
    user: str | None = None

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}//"

    def handshake(self) -> bytes:
        return amqp_handshake(self.host, self.port)

    def rabbitmqctl(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n NODE args`` as the broker's user with its cookie and epmd port."""
        binary = _rabbitmq_script("rabbitmqctl")
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs.update(user=self.user, group=pwd.getpwnam(self.user).pw_gid, extra_groups=[])
        return subprocess.run(
            [binary, "-n", self.node_name, *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.state_dir,
            timeout=timeout_s,
            check=False,
            **kwargs,
        )

    def stop(self, deadline_s: float = 30.0) -> None:
        """``rabbitmqctl stop``; then the process group is signalled and epmd on our port killed."""
        try:
            if self.process.alive:
                result = self.rabbitmqctl("stop", timeout_s=deadline_s)
                if result.returncode == 0 and self.process.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.popen.wait(timeout=deadline_s)
        except (subprocess.TimeoutExpired, OSError):
            pass
        finally:
            self.process.stop(deadline_s=10)
            self._kill_epmd()

    def _kill_epmd(self) -> None:
        epmd = shutil.which("epmd")
        if epmd is None or not port_accepts(HOST, self.epmd_port):
            return
        env = {**self.env, "ERL_EPMD_PORT": str(self.epmd_port)}
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run([epmd, "-kill"], env=env, capture_output=True, timeout=10, check=False)
        with contextlib.suppress(TimeoutError):
            wait_until(
                lambda: not port_accepts(HOST, self.epmd_port), 5, f"epmd on port {self.epmd_port} to exit"
            )


@contextlib.contextmanager
def rabbitmq_server(tmp_dir: Path, *, start_deadline_s: float = 60.0) -> Iterator[RabbitMQServer]:
    """Run a private RabbitMQ node (AMQP on 127.0.0.1, own epmd and distribution ports).

    rabbitmq-server runs as user ``rabbitmq`` when we are root, so its state (mnesia, logs, config,
    Erlang cookie in ``HOME``) lives in a ``rabbitmq``-owned directory under the system temp dir
    (pytest's ``/tmp/pytest-of-root`` is mode 0700); it is removed on exit. The broker's stdout,
    which carries its whole log, goes to ``tmp_dir/rabbitmq.log``.
    """
    require_binary("rabbitmq-server", "rabbitmq-server")
    require_binary("rabbitmqctl", "rabbitmq-server")
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    user = _rabbitmq_user()
    server_bin = _rabbitmq_script("rabbitmq-server")
    state_dir = Path(tempfile.mkdtemp(prefix="peers-rabbitmq-")) if user else tmp_dir / "rabbitmq-state"
    amqp_port, epmd_port, dist_port, ctl_port = free_ports(4)
    node_name = f"peers-{amqp_port}@localhost"
    try:
        for sub in ("mnesia", "log", "home"):
            (state_dir / sub).mkdir(parents=True, exist_ok=True)
        (state_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {HOST}:{amqp_port}\nloopback_users.guest = true\n"
        )
        (state_dir / "enabled_plugins").write_text("[].\n")
        (state_dir / "rabbitmq-env.conf").write_text("")
        if user is not None:
            entry = pwd.getpwnam(user)
            for path in [state_dir, *state_dir.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(state_dir / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(state_dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(state_dir / "rabbitmq.conf"),  # 3.10 accepts the .conf path
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(state_dir / "advanced.config"),  # absent on purpose
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(state_dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(state_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(state_dir / "log"),
            "RABBITMQ_LOGS": "-",  # the whole log on stdout, i.e. in tmp_dir/rabbitmq.log
            "RABBITMQ_NODENAME": node_name,
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(ctl_port),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(ctl_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": HOST,
        }
        process = PeerProcess(
            "rabbitmq-server", [server_bin], tmp_dir / "rabbitmq.log", env, cwd=state_dir, user=user
        )
        server = RabbitMQServer(
            host=HOST,
            port=amqp_port,
            node_name=node_name,
            epmd_port=epmd_port,
            dist_port=dist_port,
            state_dir=state_dir,
            log_path=process.log_path,
            process=process,
            env=env,
            user=user,
        )
        try:
            process.start()
            process.wait_ready(
                lambda: process.listens_on(amqp_port) and _handshake_ok(HOST, amqp_port),
                start_deadline_s,
                f"AMQP handshake on port {amqp_port}",
            )
            yield server
        finally:
            server.stop()
    finally:
        if user is not None:
            shutil.rmtree(state_dir, ignore_errors=True)


def _rabbitmq_script(name: str) -> str:
    """The real script behind Debian's ``/usr/sbin`` wrapper.

    The wrapper ``cd``s to /var/lib/rabbitmq, resets ``HOME`` (hence the Erlang cookie) and sends the
    server's log to /var/log/rabbitmq; we switch the user ourselves, so we skip it.
    """
    debian = Path("/usr/lib/rabbitmq/bin") / name
    return str(debian) if debian.exists() else require_binary(name, "rabbitmq-server")


def _rabbitmq_user() -> str | None:
    """``rabbitmq`` when we are root and that user exists; otherwise run as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        return None
    return "rabbitmq"


def _handshake_ok(host: str, port: int) -> bool:
    try:
        amqp_handshake(host, port)
    except OSError:  # ConnectionError and socket timeouts are OSErrors
        return False
    return True
