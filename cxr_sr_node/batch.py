"""``cxr-sr-node batch IN OUT``: the node's eligibility and derive code over a folder of files.

Output goes to ``OUT/<StudyInstanceUID>/<derived SeriesInstanceUID>/<derived SOPInstanceUID>.dcm``.
Files that are not eligible are skipped with their rule; files that look eligible but whose pixels
cannot be decoded or derived are failures, and the exit code is 1 when there is any.
Derived UIDs are deterministic (source UID + model sha256 + node version), so a second run finds
each output already there and skips it: an interrupted batch resumes where it stopped. Ctrl-C
stops after the file in hand (a second Ctrl-C at once; writes are atomic, so never a partial file)
and prints what was done.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from cxr_sr_node import __version__
from cxr_sr_node.config import NodeConfig
from cxr_sr_node.derive import derived_uid, write_dataset
from cxr_sr_node.eligibility import check
from cxr_sr_node.logs import get_logger
from cxr_sr_node.spool import safe_name
from cxr_sr_node.worker import Engine, derive_file

log = get_logger("cxr_sr_node.batch")

# A file whose header says "process me" but whose pixels cannot be decoded or derived is a
# failure (the exit code says so), not a policy skip: a researcher must hear about corrupt data.
FAILURE_RULES = ("decodable", "derive", "readable")


@dataclass
class BatchSummary:
    processed: int = 0
    already_done: int = 0
    skipped: Counter = field(default_factory=Counter)  # rule -> count
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    elapsed_s: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (file, the file processed with its UID)
    unsearched_folders: int = 0  # sub-folders left out without --recursive
    interrupted: bool = False


class BatchError(RuntimeError):
    """The batch cannot run at all (output folder, model); the message says what to do."""


def find_files(root: Path, *, recursive: bool) -> list[Path]:
    pattern = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in pattern if p.is_file() and not p.name.startswith("."))


def check_out_dir(out_dir: Path) -> None:
    """Create OUT_DIR and prove it writable before any model runs (not after hours of inference)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BatchError(f"OUT_DIR {out_dir} cannot be created or written ({exc}); choose another folder") from None


def read_header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM file (Part 10, or a bare dataset without preamble); None if not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass
    except Exception:  # noqa: BLE001 - a damaged Part-10 file: try the tolerant reader below
        pass
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001
        return None
    return ds if "SOPInstanceUID" in ds and "SOPClassUID" in ds else None


def output_path(out_dir: Path, header: pydicom.Dataset, model_sha256: str) -> Path:
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID") if not str(header.get(k, "") or "").strip()]
    if missing:
        raise ValueError(
            f"the file has no {' or '.join(missing)}: a derived image joins its source's study as a new "
            "series, so both UIDs are needed; add them to the source (e.g. dcmodify -i) and run again"
        )
    study = str(header.StudyInstanceUID)
    series = derived_uid("series", str(header.SeriesInstanceUID), model_sha256, __version__)
    sop = derived_uid("sop", str(header.SOPInstanceUID), model_sha256, __version__)
    return out_dir / safe_name(study) / safe_name(series) / f"{safe_name(sop)}.dcm"


def run_batch(in_dir: Path, out_dir: Path, config: NodeConfig, *, recursive: bool = False,
              progress: bool = True, engine: Engine | None = None) -> BatchSummary:
    started = time.perf_counter()
    summary = BatchSummary()
    check_out_dir(out_dir)
    files = find_files(in_dir, recursive=recursive)
    if not recursive:
        summary.unsearched_folders = sum(1 for p in in_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    stop = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # the second Ctrl-C: now
        stop.set()
        sys.stderr.write("\nstopping after this file (Ctrl-C again to stop now)\n")

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        engine = _run(files, out_dir, config, summary, progress=progress, engine=engine, stop=stop)
    except KeyboardInterrupt:  # inside a file: nothing partial is on disk (atomic writes)
        summary.interrupted = True
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    summary.interrupted |= stop.is_set()
    summary.elapsed_s = time.perf_counter() - started
    return summary


def _run(files: list[Path], out_dir: Path, config: NodeConfig, summary: BatchSummary, *, progress: bool,
         engine: Engine | None, stop: threading.Event) -> Engine | None:
    written: dict[Path, str] = {}  # outputs of this run -> the file they came from
    # Log lines name an input by its position in the sorted list and its SOPInstanceUID, never by its
    # file name (exports are often named after the patient); the summary printed at the end has the paths.
    for number, path in enumerate(tqdm(files, disable=not progress, unit="file", desc="cxr-sr-node batch"), 1):
        if stop.is_set():
            break
        header = read_header(path)
        if header is None:
            summary.skipped["not_dicom"] += 1
            log.info("instance.skipped", input=number, rule="not_dicom")
            continue
        verdict = check(header, require_body_part=config.require_body_part, own_device_uid=config.device_uid,
                        header_only=True)
        if not verdict.eligible:  # header rules first: no pixel decoding, no model for these
            summary.skipped[verdict.rule] += 1
            log.info("instance.skipped", sop_instance_uid=str(header.get("SOPInstanceUID", "")), rule=verdict.rule,
                     reason=verdict.reason)
            continue
        if engine is None:
            try:
                engine = Engine.load(config)
            except (ValueError, RuntimeError, OSError) as exc:  # a bad checkpoint, no CUDA: nothing can run
                raise BatchError(f"cannot load the model: {exc}") from None
        try:
            target = output_path(out_dir, header, engine.model.sha256)
        except ValueError as exc:
            summary.failed.append((str(path), str(exc)))
            log.error("instance.failed", input=number, sop_instance_uid=str(header.get("SOPInstanceUID", "")),
                      error=str(exc))
            continue
        if target in written:  # two inputs with one SOPInstanceUID: a copy, or a damaged file posing as one
            summary.duplicates.append((str(path), written[target]))
            log.warning("instance.duplicate", input=number, sop_instance_uid=str(header.SOPInstanceUID))
            continue
        if target.exists():
            summary.already_done += 1
            continue
        try:
            outcome = derive_file(path, engine)
            if outcome.kind == "skipped" and outcome.rule in FAILURE_RULES:
                summary.failed.append((str(path), outcome.reason))
                log.error("instance.failed", input=number, sop_instance_uid=outcome.sop_instance_uid, rule=outcome.rule,
                          reason=outcome.reason)
                continue
            if outcome.kind == "skipped":
                summary.skipped[outcome.rule] += 1
                log.info("instance.skipped", sop_instance_uid=outcome.sop_instance_uid, rule=outcome.rule,
                         reason=outcome.reason)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            write_dataset(outcome.dataset, target)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
            summary.failed.append((str(path), f"{type(exc).__name__}: {exc}"))
            log.error("instance.failed", input=number, sop_instance_uid=str(header.get("SOPInstanceUID", "")),
                      error=f"{type(exc).__name__}: {exc}")
            continue
        summary.processed += 1
        summary.outputs.append(target)
        written[target] = str(path)
    return engine


def print_summary(summary: BatchSummary) -> None:
    import click

    if summary.interrupted:
        click.echo("interrupted: what was done so far (run the same command again to go on)", err=True)
    rows = [("processed", summary.processed), ("already done", summary.already_done)]
    rows += [(f"skipped: {rule}", n) for rule, n in sorted(summary.skipped.items())]
    if summary.duplicates:
        rows += [("skipped: duplicate SOPInstanceUID", len(summary.duplicates))]
    rows += [("failed", len(summary.failed))]
    width = max(len(r[0]) for r in rows)
    for name, n in rows:
        click.echo(f"{name:<{width}}  {n}")
    for file, first in summary.duplicates:
        click.echo(f"duplicate {file}: same SOPInstanceUID as {first} (processed in this run); not read", err=True)
    for file, reason in summary.failed:
        click.echo(f"failed {file}: {reason}", err=True)
    if summary.unsearched_folders:
        click.echo(f"note: {summary.unsearched_folders} sub-folder(s) of IN_DIR not searched (--recursive "
                   "descends into them)", err=True)
    click.echo(f"elapsed {summary.elapsed_s:.1f} s")
