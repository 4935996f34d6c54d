"""``cxr-sr-node bench receive|pipeline``: figures, and a ratio against a baseline run in the same run.

Both benchmarks drive real processes over loopback, as a site would: dcmtk's ``storescu`` sends,
the node runs as its own ``serve`` process, dcmtk's ``storescp`` is the baseline receiver (receive)
or the destination (pipeline). dcmtk gets ``TCP_NODELAY=1`` in its environment; the node sets
``TCP_NODELAY`` on its own sockets. Nothing here asserts on time: the tables report what was
measured, the machine it ran on (and its load: other jobs skew wall-clock figures), and whether
the targets were met.

receive
    ``count`` DX instances of ``size_mib`` each (16-bit container, MONOCHROME2, Explicit VR Little
    Endian, one study and series), sent by one ``storescu`` run over ONE association to each
    receiver in turn: ``storescp`` as dcmtk ships it (parses each dataset into memory, re-encodes
    it), ``storescp +B`` (bit-preserving: streams the dataset to the file as received, as the node
    does), ``storescp +B`` that also fsyncs each file, and the node (``serve --workers 0``: receive
    only, no torch). Every receiver and storescu get the same maximum PDU (default 131072, the most
    dcmtk allows; the node ships with 262144); every file goes over the network in its own transfer
    syntax (checked from storescu's log). Each receiver starts fresh per transfer, the order
    alternates between rounds and the median is reported. While the node receives, its RSS is
    sampled (``/proc/<pid>/status``) and its kernel peak (VmHWM, reset just before the transfer)
    read after it. Dirty pages are flushed (``sync``) between transfers so one receiver's writeback
    does not slow the next one down. The target ratio is judged against ``storescp`` as shipped;
    the table gives the ratio against the others too.

    Durability differs and the table says so: the node fsyncs each file and its folder before it
    answers 0x0000; ``storescp`` 3.6.7 has no fsync option and answers once the file is written to
    the page cache. The "+ sync FILE" row runs coreutils ``sync FILE`` (an fsync of that file)
    through ``--exec-on-reception --exec-sync``: storescp runs it *after* sending the response
    (dcmtk ``storeSCP()``), so it charges dcmtk the fsync work (single-threaded, the next request
    waits) without giving the same guarantee, plus a fork+exec per file.

pipeline
    ``images`` chest radiographs (copies of the shared test images with fresh Study/Series/SOP
    UIDs, so each is its own series) are sent one at a time to a node with one CPU worker whose
    destination is ``storescp``; the round trip is timed from the start of the send to the derived
    instance being complete at ``storescp``. The node's JSON log gives the breakdown per image.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from cxr_sr_node import procs
from cxr_sr_node.procs import HOST, find_executable, free_port, wait_until

NODE_AE = "CXRSR"
SCU_AE = "BENCH"
DCMTK_AE = "STORESCP"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DCMTK_MAX_PDU = 131072  # storescu / storescp accept 4096..131072
TARGET_TIME_RATIO = 1.3
TARGET_RSS_GROWTH_MIB = 200.0
CHEST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "chest"
CHEST_FILES = ("test1.dcm", "test2.dcm", "test3.dcm")
MIB = 2**20


class BenchError(RuntimeError):
    """A benchmark could not run (a peer is missing, did not start, or lost data); the message says which."""


# --- machine and tools ---------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    """What the figures were measured on, including the load that other processes put on it."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total_mib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_mib = int(line.split()[1]) // 1024
    import pydicom
    import pynetdicom

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model or platform.processor() or "unknown",
        "mem_total_mib": mem_total_mib,
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "dcmtk": _dcmtk_version(),
    }


def _machine_line(m: dict[str, Any]) -> str:
    end = f", {m['loadavg_1m_at_end']} at end" if "loadavg_1m_at_end" in m else ""
    return (f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_mib'] / 1024:.0f} GiB RAM, "
            f"1-min load average {m['loadavg_1m_at_start']} at start{end}, Linux "
            f"{m['kernel']}, Python {m['python']}, pynetdicom {m['pynetdicom']}, pydicom {m['pydicom']}, "
            f"dcmtk {m['dcmtk']}")


def _binary(name: str) -> str:
    path = find_executable(name, native=True)  # dcmtk's, not pynetdicom's Python app of the same name
    if path is None:
        package = "coreutils" if name == "sync" else "dcmtk"
        raise BenchError(f"{name} not found; the benchmarks need it: apt-get install -y {package}")
    return path


def _dcmtk_version() -> str:
    try:
        out = subprocess.run([_binary("storescu"), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (BenchError, OSError, subprocess.SubprocessError):
        return "not installed"
    first = out.splitlines()[0] if out else ""
    return next((w.lstrip("v") for w in first.split() if w.startswith("v3")), first or "unknown")


def dcmtk_env() -> dict[str, str]:
    """Our environment plus ``TCP_NODELAY=1`` (dcmtk otherwise leaves Nagle's algorithm on)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def node_env(**settings: Any) -> dict[str, str]:
    """The environment for a node under test: no ``CXRSR_*`` from the caller, only ``settings``; the
    source tree this module comes from first on ``PYTHONPATH``, so the node runs the same code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRSR_")}
    env.update({f"CXRSR_{k.upper()}": str(v) for k, v in settings.items()})
    source_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)
    return env


# --- processes and waiting -----------------------------------------------------------------------

@dataclass
class Process(procs.Process):
    """A benchmark process: failures raise :class:`BenchError`; SIGTERM goes to the leader (the
    node stops its workers itself) with 60 s before SIGKILL."""

    error_type: ClassVar[type[Exception]] = BenchError
    stop_deadline_s: ClassVar[float] = 60.0
    term_leader_only: bool = True


@contextlib.contextmanager
def running(process: Process, ready: Callable[[], Any], *, deadline_s: float, what: str) -> Iterator[Process]:
    process.start()
    try:
        process.wait_ready(ready, deadline_s, what)
        yield process
    finally:
        process.stop()


def echo_ok(port: int, called_ae: str) -> bool:
    """A C-ECHO answered with success: the peer is ready to take associations."""
    argv = [_binary("echoscu"), "-aet", SCU_AE, "-aec", called_ae, "-to", "2", "-ta", "2", HOST, str(port)]
    try:
        return subprocess.run(argv, capture_output=True, env=dcmtk_env(), timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def storescp_process(out_dir: Path, port: int, log_path: Path, *, max_pdu: int = DCMTK_MAX_PDU,
                     extra_args: Sequence[str] = (), on_reception: str | None = None) -> Process:
    """dcmtk ``storescp``, single process, Explicit VR Little Endian preferred, writing into ``out_dir``.

    ``on_reception`` runs synchronously after each stored file (``#p`` folder, ``#f`` file name)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [_binary("storescp"), "--single-process", "--aetitle", DCMTK_AE, "--output-directory", str(out_dir),
            "--prefer-little", "--max-pdu", str(max_pdu), *extra_args]
    if on_reception:
        argv += ["--exec-on-reception", on_reception, "--exec-sync"]
    return Process("storescp", [*argv, str(port)], log_path, dcmtk_env())


def node_process(spool: Path, port: int, log_path: Path, *, workers: int, series_idle_s: float,
                 extra_args: Sequence[str] = (), **settings: Any) -> Process:
    """``cxr-sr-node serve`` as its own process (JSON log to ``log_path``)."""
    argv = [sys.executable, "-m", "cxr_sr_node.cli", "serve", "--workers", str(workers), "--port", str(port),
            "--bind", HOST, "--spool", str(spool), "--ae", NODE_AE, "--series-idle-s", str(series_idle_s),
            *extra_args]
    return Process("cxr-sr-node", argv, log_path, node_env(log_json="true", **settings))


def storescu_argv(port: int, called_ae: str, files: Sequence[Path], *, max_pdu: int) -> list[str]:
    """One association for all ``files``; Explicit VR Little Endian first; only the contexts the files need."""
    return [_binary("storescu"), "-v", "-aet", SCU_AE, "-aec", called_ae, "--propose-little", "--required",
            "--max-pdu", str(max_pdu), HOST, str(port), *map(str, files)]


# --- /proc sampling ------------------------------------------------------------------------------

def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {key}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its waited-for children (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples VmRSS of ``pid`` every ``interval_s`` in a thread; reads the kernel's VmHWM at the end.

    VmHWM is reset (``clear_refs`` 5) on entry where the kernel allows it, so it is the peak of the
    sampled window, not of the process's start-up."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.baseline_kib = 0
        self.peak_kib = 0
        self.hwm_kib = 0
        self.hwm_reset = False
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.baseline_kib = self.peak_kib = _status_kib(self.pid, "VmRSS")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                rss = _status_kib(self.pid, "VmRSS")
            except (OSError, BenchError):
                return
            self.samples += 1
            self.peak_kib = max(self.peak_kib, rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, BenchError):
            self.peak_kib = max(self.peak_kib, _status_kib(self.pid, "VmRSS"))
            self.hwm_kib = _status_kib(self.pid, "VmHWM")

    def figures(self) -> dict[str, Any]:
        peak = max(self.peak_kib, self.hwm_kib if self.hwm_reset else 0)
        return {
            "baseline_mib": round(self.baseline_kib / 1024, 1),
            "sampled_peak_mib": round(self.peak_kib / 1024, 1),
            "vmhwm_mib": round(self.hwm_kib / 1024, 1),
            "vmhwm_reset_before_transfer": self.hwm_reset,
            "growth_mib": round((peak - self.baseline_kib) / 1024, 1),
            "samples": self.samples,
        }


# --- test data -----------------------------------------------------------------------------------

def make_instances(folder: Path, count: int, size_mib: float) -> list[Path]:
    """``count`` DX-for-presentation files of ~``size_mib`` pixel data each, one study and series.

    16-bit container (12 bits stored), MONOCHROME2, Explicit VR Little Endian; one random pixel
    buffer is shared by all, only the SOP Instance UID and Instance Number differ."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if size_mib <= 0:
        raise ValueError(f"size_mib must be > 0, got {size_mib}")
    pixels = max(16, round(size_mib * MIB / 2))
    rows = max(4, int(pixels**0.5))
    cols = max(4, pixels // rows)
    data = (np.random.default_rng(0).integers(0, 4096, size=rows * cols, dtype=np.uint16)).tobytes()

    ds = Dataset()
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "BENCH^RECEIVE"
    ds.PatientID = "BENCH-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = time.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = time.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "BENCH"
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "cxr-sr-node bench"
    ds.SeriesNumber = 1
    ds.SeriesDescription = "receive benchmark"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["A", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImagerPixelSpacing = ds.PixelSpacing = [0.15, 0.15]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelData = data
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --- receive -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Receiver:
    key: str
    label: str
    durable: str
    storescp_args: tuple[str, ...] = ()
    on_reception: str | None = None

    @property
    def is_node(self) -> bool:
        return self.key == "node"


RECEIVERS = (
    Receiver("dcmtk", "storescp (as shipped)", "no: page cache only"),
    Receiver("dcmtk_bp", "storescp +B (bit-preserving)", "no: page cache only", ("--bit-preserving",)),
    Receiver("dcmtk_bp_fsync", "storescp +B + sync FILE", "fsync after the response", ("--bit-preserving",),
             "sync #p/#f"),
    Receiver("node", "cxr-sr-node serve --workers 0", "yes: fsync file + folder, then 0x0000"),
)
BASELINE = "dcmtk"  # what the target ratio is judged against: storescp as dcmtk ships it


def _parse_storescu(output: str) -> dict[str, Any]:
    """Max send PDV and how each file's transfer syntax was sent, from ``storescu -v``.

    storescu logs "Converting transfer syntax: A -> B" for every file, also when A == B (no change)."""
    max_pdv, sent_as = None, set()
    for line in output.splitlines():
        if "Max Send PDV:" in line:
            with contextlib.suppress(ValueError):
                max_pdv = int(line.rsplit("Max Send PDV:", 1)[1].strip(" )"))
        if "Converting transfer syntax:" in line:
            sent_as.add(line.split("Converting transfer syntax:", 1)[1].strip())
    return {"max_send_pdv": max_pdv, "transfer_syntax_sent": sorted(sent_as)}


def _send(port: int, called_ae: str, files: Sequence[Path], *, max_pdu: int, log_path: Path) -> tuple[float, dict[str, Any]]:
    """Run storescu once; returns its wall-clock seconds and what it negotiated."""
    argv = storescu_argv(port, called_ae, files, max_pdu=max_pdu)
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=dcmtk_env(), timeout=3600)
    elapsed = time.perf_counter() - started
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise BenchError(f"storescu to {called_ae}@{HOST}:{port} exited {proc.returncode}:\n{tail}")
    return elapsed, _parse_storescu(proc.stdout + proc.stderr)


def _receive_once(receiver: Receiver, files: list[Path], work: Path, tag: str, *, max_pdu: int) -> dict[str, Any]:
    """Start one receiver, send ``files`` to it once, check they all arrived, stop it, clean up."""
    port = free_port()
    out = work / f"{receiver.key}-{tag}"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    if receiver.is_node:
        proc = node_process(out / "spool", port, logs / f"node-{tag}.log", workers=0, series_idle_s=3600,
                            max_pdu=max_pdu)
        called, stored_dir = NODE_AE, out / "spool" / "incoming"
    else:
        proc = storescp_process(out / "files", port, logs / f"{receiver.key}-{tag}.log", max_pdu=max_pdu,
                                extra_args=receiver.storescp_args, on_reception=receiver.on_reception)
        called, stored_dir = DCMTK_AE, out / "files"
    sample: dict[str, Any] = {}
    scu_log = logs / f"storescu-{receiver.key}-{tag}.log"
    with running(proc, lambda: echo_ok(port, called), deadline_s=120, what=f"C-ECHO on port {port}"):
        cpu_before = cpu_seconds(proc.pid)
        with RssSampler(proc.pid) if receiver.is_node else contextlib.nullcontext() as rss:
            elapsed, negotiated = _send(port, called, files, max_pdu=max_pdu, log_path=scu_log)
        sample["cpu_s"] = round(cpu_seconds(proc.pid) - cpu_before, 2)
    if rss is not None:
        sample["rss"] = rss.figures()
    stored = [p for p in stored_dir.rglob("*") if p.is_file() and p.name != "source.json"]
    if len(stored) != len(files):
        raise BenchError(f"{receiver.label}: {len(stored)} of {len(files)} files arrived in {stored_dir} "
                         f"(see {proc.log_path})")
    sample.update(seconds=round(elapsed, 3), files=len(stored), **negotiated)
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # storescp leaves dirty pages; flush them before the next transfer is timed
    return sample


def receive_benchmark(
    count: int = 100,
    size_mib: float = 8.0,
    *,
    rounds: int = 5,
    max_pdu: int = DCMTK_MAX_PDU,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Receive ``count`` x ``size_mib`` instances over one association: the node vs dcmtk ``storescp``.

    Returns the figures and ``"table"``, the text the CLI prints. ``work_dir`` (default: a temporary
    folder, removed afterwards) keeps the logs when given."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 4096 <= max_pdu <= DCMTK_MAX_PDU:
        raise ValueError(f"max_pdu must be 4096..{DCMTK_MAX_PDU} (what storescu and storescp accept), got {max_pdu}")
    for tool in ("storescu", "storescp", "echoscu", "sync"):
        _binary(tool)
    machine = machine_info()
    with _work_dir(work_dir, "cxrsr-bench-receive-") as work:
        started = time.perf_counter()
        files = make_instances(work / "send", count, size_mib)
        generate_s = time.perf_counter() - started
        total_bytes = sum(p.stat().st_size for p in files)
        import pydicom

        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        os.sync()
        samples: dict[str, list[dict[str, Any]]] = {r.key: [] for r in RECEIVERS}
        for rnd in range(rounds):
            order = RECEIVERS if rnd % 2 == 0 else tuple(reversed(RECEIVERS))
            for receiver in order:
                samples[receiver.key].append(_receive_once(receiver, files, work, f"r{rnd + 1}", max_pdu=max_pdu))
        if work_dir is not None:
            shutil.rmtree(work / "send", ignore_errors=True)
    machine["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    sender = storescu_argv(0, "AE", [], max_pdu=max_pdu)
    result: dict[str, Any] = {
        "benchmark": "receive",
        "machine": machine,
        "settings": {
            "count": count, "size_mib": size_mib, "rows": int(header.Rows), "columns": int(header.Columns),
            "bits_allocated": 16, "bits_stored": 12, "photometric_interpretation": "MONOCHROME2",
            "sop_class": "DX Image Storage - For Presentation", "transfer_syntax": "Explicit VR Little Endian",
            "file_mib": round(total_bytes / count / MIB, 3), "total_mib": round(total_bytes / MIB, 1),
            "rounds": rounds, "max_pdu": max_pdu, "generate_s": round(generate_s, 1),
            "sender": shlex.join(["storescu", *sender[1:-2]]) + " 127.0.0.1 PORT FILE...",
        },
        "receivers": {},
    }
    for receiver in RECEIVERS:
        runs = samples[receiver.key]
        median = statistics.median(s["seconds"] for s in runs)
        result["receivers"][receiver.key] = {
            "label": receiver.label,
            "durable": receiver.durable,
            "median_s": round(median, 3),
            "mib_per_s": round(total_bytes / MIB / median, 1),
            "median_cpu_s": round(statistics.median(s["cpu_s"] for s in runs), 2),
            "rounds": runs,
        }
    node = result["receivers"]["node"]
    result["ratio_node_to"] = {key: round(node["median_s"] / rec["median_s"], 2)
                               for key, rec in result["receivers"].items() if key != "node"}
    ratio = result["ratio_node_to"][BASELINE]
    growth = max(s["rss"]["growth_mib"] for s in node["rounds"])
    result["node_rss_growth_mib"] = growth
    result["targets"] = {
        "baseline": BASELINE,
        "time_ratio_max": TARGET_TIME_RATIO, "time_ratio": ratio, "time_ratio_met": ratio <= TARGET_TIME_RATIO,
        "rss_growth_max_mib": TARGET_RSS_GROWTH_MIB, "rss_growth_mib": growth,
        "rss_growth_met": growth < TARGET_RSS_GROWTH_MIB,
    }
    result["table"] = format_receive(result)
    return result


def format_receive(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        f"cxr-sr-node bench receive: {s['count']} x {s['file_mib']:.2f} MiB files, {s['sop_class']}, "
        f"{s['rows']}x{s['columns']} 16-bit MONOCHROME2, {s['transfer_syntax']} ({s['total_mib']} MiB per transfer)",
        _machine_line(r["machine"]),
        f"sender: {s['sender']} with TCP_NODELAY=1: one association per transfer, the same files to every receiver",
        f"max PDU {s['max_pdu']} on every receiver and on storescu; {s['rounds']} round(s), receiver order alternating;",
        "each receiver starts fresh per round; all files checked to have arrived; sync between transfers",
        "",
        f"{'receiver':<30} {'median s':>8} {'MiB/s':>7} {'node/this':>9} {'CPU s':>6}  {'rounds s':<30} durable",
    ]
    for key, rec in r["receivers"].items():
        per_round = ", ".join(f"{x['seconds']:.2f}" for x in rec["rounds"])
        ratio = "" if key == "node" else f"{r['ratio_node_to'][key]:.2f}x"
        lines.append(f"{rec['label']:<30} {rec['median_s']:>8.2f} {rec['mib_per_s']:>7.1f} {ratio:>9} "
                     f"{rec['median_cpu_s']:>6.2f}  {per_round:<30} {rec['durable']}")
    negotiated = {(x["max_send_pdv"], t) for rec in r["receivers"].values() for x in rec["rounds"]
                  for t in x["transfer_syntax_sent"] or ["?"]}
    lines.append("negotiated (storescu -v), every transfer: " + "; ".join(
        f"max send PDV {pdv}, transfer syntax {ts}" for pdv, ts in sorted(negotiated, key=str)))
    lines.append("CPU s = the receiver's user+system CPU during the transfer (its children included).")
    noisy = [rec["label"] for rec in r["receivers"].values()
             if max(x["seconds"] for x in rec["rounds"]) > 1.5 * min(x["seconds"] for x in rec["rounds"])]
    if noisy:
        lines.append(f"NOTE: the slowest round took over 1.5x the fastest for: {', '.join(noisy)}.")
        lines.append("  The machine is busy: wall-clock ratios are uncertain and CPU s is steadier; rerun with more")
        lines.append("  --rounds or on a quiet machine.")
    lines.append("")
    for i, x in enumerate(r["receivers"]["node"]["rounds"], 1):
        rss = x["rss"]
        hwm = "reset just before the transfer" if rss["vmhwm_reset_before_transfer"] else "since start"
        lines.append(f"node RSS round {i}: before {rss['baseline_mib']} MiB, peak {rss['sampled_peak_mib']} MiB "
                     f"({rss['samples']} samples at 20 ms), VmHWM {rss['vmhwm_mib']} MiB ({hwm}), "
                     f"growth {rss['growth_mib']} MiB")
    t = r["targets"]
    base = r["receivers"][t["baseline"]]["label"]
    lines.append(f"target time <= {t['time_ratio_max']}x {base}: {t['time_ratio']:.2f}x "
                 f"{'MET' if t['time_ratio_met'] else 'MISSED'}")
    lines.append(f"target RSS growth < {t['rss_growth_max_mib']:g} MiB: {t['rss_growth_mib']} MiB "
                 f"{'MET' if t['rss_growth_met'] else 'MISSED'}")
    lines += [
        "",
        "durability is not equal: the node fsyncs every file and its folder before it answers 0x0000; storescp",
        "3.6.7 has no fsync option and answers once the file is in the page cache. '+ sync FILE' runs coreutils",
        "'sync FILE' (an fsync) per file via --exec-on-reception --exec-sync, which storescp runs after sending the",
        "response: its fsync cost is charged (the next request waits), not the node's guarantee. Without +B storescp",
        "parses each dataset into memory and re-encodes it; +B streams it to the file as received, as the node does.",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def _work_dir(work_dir: Path | None, prefix: str) -> Iterator[Path]:
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        yield work_dir
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- pipeline ------------------------------------------------------------------------------------

def _tiny_checkpoint(folder: Path) -> Path:
    from model.inference import write_untrained_checkpoint

    return write_untrained_checkpoint(folder / "bench-tiny.safetensors", name="bench-tiny")


def _resolve_checkpoint(checkpoint: Path | None, work: Path) -> tuple[Path, str]:
    if checkpoint is not None:
        return Path(checkpoint), "given with --checkpoint"
    from model.inference import DEFAULT_CHECKPOINT

    if DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT, "the shipped default checkpoint"
    return _tiny_checkpoint(work), (f"the shipped checkpoint {DEFAULT_CHECKPOINT.name} does not exist yet, so a tiny "
                                    "random-weight model (1 block, 8 features) stands in: plumbing timings, not model timings")


def chest_copies(folder: Path, images: int, sources: Sequence[Path] | None = None) -> list[Path]:
    """``images`` copies of ``sources`` (default: the shared chest test images), cycling through them,
    each with fresh Study/Series/SOP Instance UIDs so that every copy is its own series."""
    import pydicom
    from pydicom.uid import generate_uid

    sources = [Path(p) for p in sources] if sources else [CHEST_DIR / name for name in CHEST_FILES]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise BenchError(f"source images missing: {', '.join(missing)}")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(images):
        source = sources[i % len(sources)]
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{i:03d}-{source.name}"
        ds.save_as(path)
        out.append(path)
    return out


def model_forward_s(checkpoint: Path, shape: tuple[int, int]) -> float:
    """Seconds for the model alone (``Upscaler``, the node's default tile and overlap, CPU) on one
    image of ``shape``, in this process, after a warm-up call on one tile with its overlap."""
    import numpy as np

    from cxr_sr_node.config import NodeConfig
    from model.inference import Upscaler, load_generator

    defaults = NodeConfig()
    upscale = Upscaler(load_generator(checkpoint, "cpu"), tile=defaults.tile, overlap=defaults.overlap)
    side = min(max(shape), defaults.tile + 2 * defaults.overlap)
    upscale(np.zeros((side, side), np.float32))
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    started = time.perf_counter()
    upscale(image)
    return time.perf_counter() - started


def _log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    events.append(json.loads(line))
    return events


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def pipeline_benchmark(
    images: int = 3,
    checkpoint: Path | None = None,
    *,
    series_idle_s: float = 0.5,
    sources: Sequence[Path] | None = None,
    forward_reference: bool = True,
    image_deadline_s: float = 1800.0,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Round trip per image on CPU: storescu -> node (1 worker) -> derived instance at storescp.

    ``checkpoint``: default the shipped checkpoint, or a tiny random-weight one while that does not
    exist (the table says so). ``sources``: default the shared chest test images. With
    ``forward_reference`` the model alone is also timed on the first image's size, in this process,
    after the node has stopped. Returns the figures and ``"table"``, the text the CLI prints."""
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    for tool in ("storescu", "storescp", "echoscu"):
        _binary(tool)
    machine = machine_info()
    with _work_dir(work_dir, "cxrsr-bench-pipeline-") as work:
        ckpt, ckpt_note = _resolve_checkpoint(checkpoint, work)
        files = chest_copies(work / "send", images, sources)
        import pydicom

        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        dest_port, node_port = free_port(), free_port()
        received_list = work / "storescp-received.txt"
        dest = storescp_process(work / "dest", dest_port, work / "storescp.log",
                                on_reception=f"echo '#f' >> {shlex.quote(str(received_list))}")
        node_log = work / "node.log"
        node = node_process(work / "spool", node_port, node_log, workers=1, series_idle_s=series_idle_s,
                            extra_args=["--dest", f"{DCMTK_AE}@{HOST}:{dest_port}", "--device", "cpu",
                                        "--checkpoint", str(ckpt)])

        def arrived() -> list[str]:
            with contextlib.suppress(FileNotFoundError):
                return received_list.read_text().split()
            return []

        per_image: list[dict[str, Any]] = []
        with running(dest, lambda: echo_ok(dest_port, DCMTK_AE), deadline_s=60, what=f"C-ECHO on port {dest_port}"):
            node_started = time.perf_counter()
            with running(node, lambda: any(e.get("event") == "node.started" for e in _log_events(node_log))
                         and echo_ok(node_port, NODE_AE), deadline_s=600, what="node.started (worker loaded)"):
                startup_s = time.perf_counter() - node_started
                for path, header in zip(files, headers, strict=True):
                    before = len(arrived())
                    t0 = time.perf_counter()
                    send_s, _ = _send(node_port, NODE_AE, [path], max_pdu=DCMTK_MAX_PDU,
                                      log_path=work / f"storescu-{path.stem}.log")

                    def done(before: int = before) -> bool:
                        if not node.alive:
                            raise node.error("exited during the round trip")
                        return len(arrived()) > before

                    try:
                        wait_until(done, image_deadline_s, f"the derived instance of {path.name} at storescp",
                                   interval_s=0.02)
                    except TimeoutError as exc:
                        raise node.error(str(exc)) from None
                    per_image.append({"file": path.name, "rows": int(header.Rows), "columns": int(header.Columns),
                                      "series_instance_uid": str(header.SeriesInstanceUID),
                                      "send_s": round(send_s, 3), "round_trip_s": round(time.perf_counter() - t0, 3)})
            node_exit = node.popen.returncode if node.popen else None
        events = _log_events(node_log)
        forward_s = model_forward_s(ckpt, (per_image[0]["rows"], per_image[0]["columns"])) if forward_reference else None
    machine["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    _breakdown(per_image, events)
    derive = [p["derive_s"] for p in per_image if p.get("derive_s") is not None]
    result: dict[str, Any] = {
        "benchmark": "pipeline",
        "machine": machine,
        "settings": {
            "images": images, "series_idle_s": series_idle_s, "workers": 1, "device": "cpu",
            "checkpoint": str(ckpt), "checkpoint_note": ckpt_note,
            "model": next((e.get("model") for e in events if e.get("event") == "worker.started"), None),
            "model_sha256": next((e.get("model_sha256") for e in events if e.get("event") == "worker.started"), None),
        },
        "node_startup_s": round(startup_s, 2),
        "node_exit_status": node_exit,
        "images": per_image,
        "total_s": round(sum(p["round_trip_s"] for p in per_image), 3),
        "mean_round_trip_s": round(statistics.mean(p["round_trip_s"] for p in per_image), 3),
        "mean_derive_s": round(statistics.mean(derive), 3) if derive else None,
        "model_forward_s": round(forward_s, 3) if forward_s is not None else None,
    }
    result["table"] = format_pipeline(result)
    return result


def _breakdown(per_image: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    """Stage times per image from the node's JSON log, matched by series (jobs) and order (derives)."""
    by_series: dict[str, dict[str, dict[str, Any]]] = {}
    job_series: dict[str, str] = {}
    for e in events:
        series = e.get("series_instance_uid")
        if e.get("event") == "job.created" and series:
            job_series[e["job_id"]] = series
        series = series or job_series.get(e.get("job_id", ""))
        if series and e.get("event") in ("store.received", "job.created", "job.started", "job.finished", "send.finished"):
            by_series.setdefault(series, {}).setdefault(e["event"], e)
    derived = [e for e in events if e.get("event") == "instance.derived"]
    for i, image in enumerate(per_image):
        ev = by_series.get(image["series_instance_uid"], {})
        image["derive_s"] = derived[i]["elapsed_s"] if i < len(derived) else None
        if {"store.received", "job.created"} <= ev.keys():
            image["series_wait_s"] = round(_ts(ev["job.created"]) - _ts(ev["store.received"]), 3)
        if {"job.created", "job.started"} <= ev.keys():
            image["queue_s"] = round(_ts(ev["job.started"]) - _ts(ev["job.created"]), 3)
        if "job.finished" in ev:
            image["job_s"] = ev["job.finished"].get("elapsed_s")
        if {"job.finished", "send.finished"} <= ev.keys():
            image["to_send_done_s"] = round(_ts(ev["send.finished"]) - _ts(ev["job.finished"]), 3)
            image["send_back_s"] = ev["send.finished"].get("elapsed_s")


def format_pipeline(r: dict[str, Any]) -> str:
    s = r["settings"]

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"cxr-sr-node bench pipeline: {s['images']} chest image(s), each its own series, sent one at a time:",
        "  storescu -> node (serve --workers 1 --device cpu) -> derived SC instance complete at dcmtk storescp",
        _machine_line(r["machine"]),
        f"model: {s['model']} sha256 {s['model_sha256']} from {s['checkpoint']}",
        f"  ({s['checkpoint_note']})",
        f"series_idle_s {s['series_idle_s']} (a series is complete after its association released and this idle time);",
        f"  node start-up to node.started (worker loaded the model): {r['node_startup_s']:.1f} s",
        "",
        f"{'image':<16} {'size':>9} {'round trip s':>12} {'send s':>7} {'series wait':>11} {'queue':>6} "
        f"{'derive s':>8} {'job s':>6} {'send back':>9}",
    ]
    for p in r["images"]:
        lines.append(f"{p['file'][:16]:<16} {p['rows']}x{p['columns']:<4} {p['round_trip_s']:>12.2f} {p['send_s']:>7.2f} "
                     f"{f(p.get('series_wait_s')):>11} {f(p.get('queue_s')):>6} {f(p.get('derive_s')):>8} "
                     f"{f(p.get('job_s')):>6} {f(p.get('send_back_s')):>9}")
    lines.append("")
    lines.append(f"total {r['total_s']:.2f} s, mean round trip {r['mean_round_trip_s']:.2f} s per image"
                 + (f"; mean derive (read + model + write, node log instance.derived) {r['mean_derive_s']:.2f} s, "
                    f"overhead {r['mean_round_trip_s'] - r['mean_derive_s']:.2f} s" if r["mean_derive_s"] is not None else ""))
    if r["model_forward_s"] is not None:
        p = r["images"][0]
        lines.append(f"model alone (Upscaler, same tile/overlap, CPU, this process after the node stopped) on "
                     f"{p['rows']}x{p['columns']}: {r['model_forward_s']:.2f} s")
    lines.append("series wait = store.received -> job.created (includes series_idle_s); queue = job.created -> job.started;")
    lines.append("job = the worker's processing of the series; send back = the node's C-STORE to storescp.")
    return "\n".join(lines)
