"""The processing step and the worker process that runs it.

``process_job(job_id, spool, engine)`` is the one pure-ish step every runner calls (the embedded
worker process here, or a Celery task): read ``jobs/<job>/in``, check each instance, derive the
super-resolved Secondary Capture into ``jobs/<job>/out``, and return a result record. Outputs
already present (a resumed job) are not recomputed: their UIDs are deterministic.

``worker_main`` is the body of a child process: it loads the model once, then claims jobs from
the spool's table until told to stop (SIGTERM finishes the current job first).
"""

from __future__ import annotations

import dataclasses
import errno
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from cxr_sr_node import __version__
from cxr_sr_node.config import NodeConfig
from cxr_sr_node.derive import DeriveError, ModelInfo, NodeInfo, derive, derived_uid, write_dataset
from cxr_sr_node.eligibility import check
from cxr_sr_node.logs import configure_logging, get_logger
from cxr_sr_node.spool import Job, LeaseLost, Spool, safe_name

log = get_logger("cxr_sr_node.worker")


@dataclass
class Engine:
    """What a worker holds for its lifetime: the loaded model and the derive settings."""

    upscale: Any  # model.inference.Upscaler (a callable float32 HxW -> 4Hx4W)
    model: ModelInfo
    node: NodeInfo
    max_output_px: int
    require_body_part: bool

    @classmethod
    def load(cls, config: NodeConfig) -> Engine:
        from model.inference import Upscaler, load_generator  # the only torch import of the node

        loaded = load_generator(config.checkpoint, config.device)
        upscaler = Upscaler(loaded, tile=config.tile, overlap=config.overlap)
        card = loaded.card
        return cls(
            upscale=upscaler,
            model=ModelInfo(name=card.name, version=card.version, sha256=card.sha256, tile=config.tile,
                            overlap=config.overlap),
            node=NodeInfo(device_uid=config.device_uid, node_version=__version__,
                          station_name=config.station_name, institution_name=config.institution_name),
            max_output_px=config.max_output_px,
            require_body_part=config.require_body_part,
        )


@dataclass(frozen=True)
class Outcome:
    """What happened to one input file: ``derived`` (with the dataset) or ``skipped`` (with a rule)."""

    kind: str  # "derived" | "skipped"
    sop_instance_uid: str = ""
    rule: str = ""
    reason: str = ""
    dataset: pydicom.Dataset | None = None


def derive_file(path: Path, engine: Engine, *, dataset: pydicom.Dataset | None = None) -> Outcome:
    """Read, check and derive one file. Inputs that are not eligible or cannot be derived are
    ``skipped`` with the rule and reason; anything else unexpected raises."""
    try:
        ds = dataset if dataset is not None else pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001 - unreadable input is skipped with its reason
        return Outcome("skipped", rule="readable", reason=f"cannot read the file as DICOM: {exc}")
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    verdict = check(ds, require_body_part=engine.require_body_part, own_device_uid=engine.node.device_uid, decode=True)
    if not verdict.eligible:
        return Outcome("skipped", sop_uid, verdict.rule, verdict.reason)
    try:
        derived = derive(ds, engine.upscale, model=engine.model, node=engine.node, max_output_px=engine.max_output_px)
    except DeriveError as exc:
        return Outcome("skipped", sop_uid, "derive", str(exc))
    return Outcome("derived", sop_uid, dataset=derived)


def process_files(files: list[Path], out_dir: Path, engine: Engine,
                  before_each: Callable[[], None] | None = None) -> dict[str, Any]:
    """Derive each file into ``out_dir/<derived SOP UID>.dcm``; outputs already there are kept.
    ``before_each`` runs before every file (the worker renews its lease there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    processed, skipped = [], []
    for path in files:
        if before_each is not None:
            before_each()
        started = time.perf_counter()
        try:
            header = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            out_uid = derived_uid("sop", str(header.SOPInstanceUID), engine.model.sha256, engine.node.node_version)
        except Exception:  # noqa: BLE001 - derive_file reports why
            out_uid = ""
        out_path = out_dir / f"{safe_name(out_uid)}.dcm"
        if not (out_uid and out_path.exists()):
            outcome = derive_file(path, engine)
            if outcome.kind == "skipped":
                skipped.append({"sop_instance_uid": outcome.sop_instance_uid, "rule": outcome.rule, "reason": outcome.reason})
                log.info("instance.skipped", sop_instance_uid=outcome.sop_instance_uid, rule=outcome.rule,
                         reason=outcome.reason)
                continue
            out_uid = str(outcome.dataset.SOPInstanceUID)
            out_path = out_dir / f"{safe_name(out_uid)}.dcm"
            write_dataset(outcome.dataset, out_path)
        elapsed = time.perf_counter() - started
        processed.append({"derived_sop_instance_uid": out_uid, "file": out_path.name, "elapsed_s": round(elapsed, 3)})
        log.info("instance.derived", derived_sop_instance_uid=out_uid, elapsed_s=round(elapsed, 3),
                 model_sha256=engine.model.sha256[:12])
    return {"processed": processed, "skipped": skipped}


class DiskLow(OSError):
    """The spool's file system is below ``min_free_disk_mb``: the job waits for space, using no attempt."""


DISK_WAIT_S = 30.0  # how long a job waits for disk space before it is tried again


def check_disk(spool: Spool, config: NodeConfig) -> None:
    """:class:`DiskLow` when the spool has less free space than ``min_free_disk_mb``: the derived
    images (16-bit, 16x the pixels: ~32x an 8-bit source) must not fill the disk the SCP receives on."""
    free_mb = spool.free_mb()
    if free_mb < config.min_free_disk_mb:
        raise DiskLow(f"{free_mb} MiB free on the spool's file system, below min_free_disk_mb="
                      f"{config.min_free_disk_mb}: free space; the job waits and then goes on by itself")


def _out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, DiskLow) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))


def process_job(job_id: str, spool: Spool, engine: Engine, before_each: Callable[[], None] | None = None) -> dict[str, Any]:
    """Derive a job's inputs into its ``out/``. Outputs there that this run did not make or keep (an
    earlier attempt with another model or node version, cut short by a crash: other UIDs) are
    removed, so that only one derived series is sent."""
    job_dir = spool.job_dir(job_id)
    started = time.perf_counter()
    result = process_files(sorted((job_dir / "in").glob("*.dcm")), job_dir / "out", engine, before_each)
    kept = {entry["file"] for entry in result["processed"]}
    stale = [path for path in (job_dir / "out").glob("*.dcm") if path.name not in kept]
    for path in stale:
        path.unlink()
    if stale:
        log.warning("job.stale_outputs_removed", job_id=job_id, files=len(stale),
                    reason="made by an earlier attempt with another model or node version")
    result.update(job_id=job_id, model=engine.model.name, model_sha256=engine.model.sha256,
                  elapsed_s=round(time.perf_counter() - started, 3))
    return result


def run_claimed(job: Job, spool: Spool, engine: Engine, config: NodeConfig) -> tuple[str, dict[str, Any] | None]:
    """Process a job this worker has claimed and record the outcome, fenced by the claim's attempt
    number. Returns ``("processed", result)``, ``("ready", None)`` (failed; retried after a
    backoff), ``("failed", None)`` (dead-lettered) or ``("lease_lost", None)`` (another worker took
    the job over meanwhile; nothing was recorded). The embedded worker and the Celery task share it."""
    log.info("job.started", job_id=job.job_id, series_instance_uid=job.series_uid, attempt=job.attempts)
    try:
        def renew() -> None:  # a long series keeps its lease; a job taken over stops here (LeaseLost)
            spool.renew_lease(job.job_id, stage="process", attempt=job.attempts, lease_s=config.lease_s)
            check_disk(spool, config)

        try:
            result = process_job(job.job_id, spool, engine, renew)
        except LeaseLost:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded on the job; retried, then dead-lettered
            if _out_of_space(exc):  # not the job's fault: it waits for space and keeps its attempts
                reason = str(exc) if isinstance(exc, DiskLow) else (
                    f"no space left on the spool's file system ({exc}): free space; the job waits and then goes on by itself")
                state = spool.postpone(job.job_id, stage="process", attempt=job.attempts, reason=reason,
                                       delay_s=DISK_WAIT_S)
                log.error("job.waiting_for_disk", job_id=job.job_id, reason=reason, retry_in_s=DISK_WAIT_S)
                return state, None
            reason = f"{type(exc).__name__}: {exc}"
            state = spool.fail_attempt(job.job_id, stage="process", reason=reason, max_attempts=config.max_attempts,
                                       backoff_s=config.send_backoff_s, attempt=job.attempts)
            log.error("job.failed", job_id=job.job_id, reason=reason, state=state)
            return state, None
        spool.finish_processing(job.job_id, result, has_output=bool(result["processed"]), attempt=job.attempts)
    except LeaseLost as lost:
        log.warning("job.lease_lost", job_id=job.job_id, attempt=job.attempts, reason=str(lost))
        return "lease_lost", None
    log.info("job.finished", job_id=job.job_id, series_instance_uid=job.series_uid,
             processed=len(result["processed"]), skipped=len(result["skipped"]), elapsed_s=result["elapsed_s"],
             model_sha256=engine.model.sha256[:12])
    return "processed", result


def _exit_with_the_node() -> None:
    """Exit when the node process that started this worker is gone.

    A ``kill -9`` (or OOM kill) of the node leaves its spawned worker re-parented to init, still
    holding the model (GPU memory) and polling the spool with the old config; after a restart two
    workers would run. A daemon thread waits on the parent's sentinel and ends this process at
    once, as a crash would: its job's lease is released by the restarted node (see
    ``Spool.expire_leases``), and outputs are only ever renamed into place whole.
    """
    parent = mp.parent_process()
    if parent is None:  # run in-process (tests, a debugger): nothing to watch
        return

    def watch() -> None:
        parent.join()
        log.error("worker.node_gone", pid=os.getpid(),
                  reason="the node process exited without stopping this worker; exiting so a restart takes its job")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(3)

    threading.Thread(target=watch, name="node-watch", daemon=True).start()


def holding(slot: Any) -> tuple[str, int] | None:
    """The (job id, attempt) a worker's shared ``slot`` says it is processing, or None."""
    value = slot.value.decode() if slot is not None else ""
    if not value:
        return None
    job_id, attempt = value.rsplit(":", 1)
    return job_id, int(attempt)


def worker_main(
    config: NodeConfig, ready: Any = None, poll_s: float = 0.5, index: int = 0, slot: Any = None
) -> None:
    """Child-process entry point (multiprocessing 'spawn'); ``index`` picks its GPU (see
    ``model.inference.worker_device``: worker i of N on GPU i mod N when device is auto or cuda).
    ``slot`` (a shared char array) holds ``job_id:attempt`` while a job is processed, so the node
    can release that job's lease the moment it sees this process die."""
    configure_logging(config.log_level, json=config.log_json)
    _exit_with_the_node()
    from model.inference import worker_device  # torch is imported by the worker anyway (Engine.load)

    config = dataclasses.replace(config, device=worker_device(config.device, index))
    # the handler only flips a flag: an Event.set() in a signal handler can deadlock on the lock the
    # interrupted Event.wait() holds
    stopping = [False]
    signal.signal(signal.SIGTERM, lambda *_: stopping.__setitem__(0, True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    spool = Spool(config.spool)
    try:
        engine = Engine.load(config)
    except Exception as exc:  # noqa: BLE001 - one line naming the setting, not a traceback in the log
        log.error("worker.start_failed", pid=os.getpid(), checkpoint=str(config.checkpoint or "default"),
                  device=config.device, error=f"{type(exc).__name__}: {exc}")
        sys.exit(1)
    log.info("worker.started", pid=os.getpid(), index=index, model=engine.model.name, model_sha256=engine.model.sha256[:12],
             device=str(getattr(engine.upscale, "device", "cpu")))
    if ready is not None:
        ready.set()
    while not stopping[0]:
        job = spool.claim(stage="process", lease_s=config.lease_s, max_attempts=config.max_attempts)
        if job is None:
            time.sleep(poll_s)
            continue
        if slot is not None:
            slot.value = f"{job.job_id}:{job.attempts}".encode()
        run_claimed(job, spool, engine, config)
        if slot is not None:  # not cleared when run_claimed raises: the node then releases the job's lease
            slot.value = b""
    log.info("worker.stopped", pid=os.getpid())
