"""The node behind ``serve``: SCP threads, a series scheduler, and one of two runners (DESIGN §7).

``runner = "embedded"`` (the default) needs no server besides the node itself. Workers are child
processes started with 'spawn' (the parent never imports torch); each loads the model once. The
sender runs in the parent so network retries never hold a GPU. SIGTERM / Ctrl-C stop the SCP first,
let workers finish their current job, and leave everything unfinished in the spool for the next start.

``runner = "celery"`` starts no worker and no sender: the scheduler publishes a ``process`` message
for each job it creates, and ``cxr-sr-node worker`` processes elsewhere do the work (see
``cxr_sr_node.queue``). The spool stays the truth: every ``RECONCILE_INTERVAL_S`` the scheduler
re-publishes jobs that wait without a message (a publish that failed, a message the broker lost)
and jobs whose worker's lease expired.
"""

from __future__ import annotations

import dataclasses
import errno
import multiprocessing as mp
import os
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr_sr_node.config import NodeConfig, Peer
from cxr_sr_node.logs import get_logger
from cxr_sr_node.metrics import Metrics, start_http
from cxr_sr_node.scp import SeriesTracker, StorageSCP
from cxr_sr_node.send import SendError, send_files
from cxr_sr_node.spool import Job, Spool
from cxr_sr_node.worker import holding, worker_main

log = get_logger("cxr_sr_node.node")

# celery runner: how often the scheduler looks for jobs without a message, and how long a job must
# have waited (or its lease have been expired) before it is re-published
RECONCILE_INTERVAL_S = 30.0


class StartError(RuntimeError):
    """The node cannot start as configured; the message names the setting to change."""


def destination(config: NodeConfig, calling_ae: str) -> Peer | None:
    """Back to the caller when return_to_sender is on and the caller is a known peer, else dest."""
    if config.return_to_sender and calling_ae in config.peers:
        return config.peers[calling_ae]
    return config.dest


def routing_of(config: NodeConfig) -> dict[str, Any]:
    """The settings that decide where and as whom a job is sent (``Spool.write_routing``)."""
    return {
        "ae_title": config.ae_title,
        "dest": str(config.dest) if config.dest else None,
        "return_to_sender": config.return_to_sender,
        "peers": {ae: str(peer) for ae, peer in sorted(config.peers.items())},
    }


def routed(spool: Spool, config: NodeConfig) -> NodeConfig:
    """``config`` with the routing of the node that runs on ``spool`` (the node is the authority:
    a queue worker started without ``dest``, or with an old one, still sends where the node would)."""
    routing = spool.read_routing()
    if routing is None or routing == routing_of(config):
        return config
    where = f"{spool.root / Spool.ROUTING_FILE}"
    return dataclasses.replace(
        config,
        ae_title=routing["ae_title"],
        dest=Peer.parse(routing["dest"], key=f"dest (from {where})") if routing["dest"] else None,
        return_to_sender=bool(routing["return_to_sender"]),
        peers={ae: Peer.parse(text, key=f"peers.{ae} (from {where})") for ae, text in routing["peers"].items()},
    )


def send_job(spool: Spool, config: NodeConfig, job: Job) -> str:
    """One send attempt for a job claimed for the send stage (by the embedded sender or a Celery
    ``send`` task), routed as the spool's node routes (:func:`routed`). Returns the outcome: ``ok``,
    ``skipped`` (no destination; output kept in done/), ``retry`` (back to outgoing after a
    backoff) or ``failed`` (dead-lettered with the reason)."""
    config = routed(spool, config)
    files = sorted((spool.job_dir(job.job_id, "sending") / "out").glob("*.dcm"))
    peer = destination(config, job.calling_ae)
    if peer is None:
        reason = (f"calling AE {job.calling_ae!r} is not in [peers] (return_to_sender) and no dest is configured"
                  if config.return_to_sender else "no destination configured")
        spool.finish_sending(job.job_id, {"peer": None, "sent": 0, "note": f"{reason}; output kept in done/"},
                             attempt=job.send_attempts)
        log.info("send.skipped", job_id=job.job_id, reason=reason, files=len(files))
        return "skipped"
    started = time.perf_counter()
    try:
        result = send_files(peer, files, calling_ae=config.ae_title, timeout_s=config.dimse_timeout_s,
                            max_pdu=config.max_pdu)
    except Exception as exc:  # noqa: BLE001 - any failure is an attempt: retried, then dead-lettered with its reason
        # SendError/OSError name the peer and status; anything else (an unreadable output file, a
        # dataset pynetdicom cannot encode) would otherwise leave the job 'sending' under its lease,
        # retaken forever every lease_s
        reason = str(exc) if isinstance(exc, (SendError, OSError)) else f"{peer}: {type(exc).__name__}: {exc}"
        state = spool.fail_attempt(job.job_id, stage="send", reason=reason, max_attempts=config.send_retries + 1,
                                   backoff_s=config.send_backoff_s, attempt=job.send_attempts)
        if state == "failed":
            log.error("send.failed", job_id=job.job_id, peer=str(peer), reason=reason, attempt=job.send_attempts,
                      state=state, action=f"once the destination answers: cxr-sr-node retry {job.job_id}")
            return "failed"
        log.warning("send.failed", job_id=job.job_id, peer=str(peer), reason=reason, attempt=job.send_attempts, state=state)
        return "retry"
    spool.finish_sending(job.job_id, {"peer": result.peer, "sent": result.sent, "statuses": result.statuses},
                         attempt=job.send_attempts)
    log.info("send.finished", job_id=job.job_id, peer=result.peer, sent=result.sent,
             elapsed_s=round(time.perf_counter() - started, 3))
    return "ok"


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        try:
            self.spool = Spool(config.spool)
        except (OSError, sqlite3.Error) as exc:
            raise StartError(
                f"spool {config.spool} cannot be created or opened ({exc}); fix its permissions or choose "
                "another spool (--spool, CXRSR_SPOOL)"
            ) from None
        self._lock_fd: int | None = None
        self.tracker = SeriesTracker()
        self.metrics = Metrics(self.spool, broker_ok=lambda: self._broker_ok)
        self.scp = StorageSCP(config, self.spool, self.tracker, on_store=self.metrics.stored)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers: list[mp.Process] = []
        self._slots: list = []  # per worker index: the job id and attempt it is processing (worker.holding)
        self._signalled = False
        self._http = None
        # celery runner: the publisher, and when each (job, stage) was last published by this node
        self.queue = None
        self.reconcile_interval_s = RECONCILE_INTERVAL_S
        self._published: dict[tuple[str, str], float] = {}
        self._broker_ok: bool | None = None
        if config.runner == "celery":
            try:
                from cxr_sr_node.queue import Publisher  # celery is imported only for this runner
            except ImportError as exc:
                raise RuntimeError(f"runner celery needs Celery ({exc}): pip install 'cxr-sr-node[queue]'") from None
            self.queue = Publisher(config)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self, *, wait_for_workers_s: float = 300.0) -> None:
        self._lock_fd = self.spool.lock_for_node()  # before anything touches jobs or leases
        self.spool.write_routing(routing_of(self.config))  # what queue workers send by
        fixed = self.spool.recover()
        if self.queue is None:  # embedded: no lease can belong to a live process now
            fixed["leases_expired"] = self.spool.expire_leases()
        log.info("spool.recovered", root=str(self.spool.root), **fixed, **self.spool.counts())
        ctx = mp.get_context("spawn")
        events = []
        try:
            for index in range(self.config.workers if self.queue is None else 0):
                ready = ctx.Event()
                self._slots.append(ctx.Array("c", 256, lock=False))
                proc = self._spawn(index, ready)
                events.append((proc, ready))
            deadline = time.monotonic() + wait_for_workers_s
            for proc, ready in events:
                while not ready.wait(0.2):
                    if not proc.is_alive():
                        raise RuntimeError(
                            f"worker process exited with code {proc.exitcode} while loading the model; see the log above"
                        )
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"worker did not load the model within {wait_for_workers_s} s")
            if self.queue is not None:
                self._declare_queues()
            self._listen("port", self.config.port, self.scp.start)
            loops = [(self._schedule_loop, "scheduler")] + ([(self._send_loop, "sender")] if self.queue is None else [])
            for target, name in loops:
                t = threading.Thread(target=target, name=name, daemon=True)
                t.start()
                self._threads.append(t)
            if self.config.http_port:
                self._http = self._listen(
                    "http_port", self.config.http_port,
                    lambda: start_http(self.config.bind_address, self.config.http_port, self.metrics, self.health),
                )
        except BaseException:
            # the workers are not daemons: left running they would keep the process alive (and a
            # half-started node receiving) after the error is printed
            self.stop(worker_grace_s=30.0)
            raise
        log.info("node.started", ae_title=self.config.ae_title, port=self.scp.port,
                 dest=str(self.config.dest) if self.config.dest else None, workers=len(self._workers),
                 spool=str(Path(self.config.spool).resolve()), runner=self.config.runner)

    def _spawn(self, index: int, ready: Any = None) -> mp.Process:
        proc = mp.get_context("spawn").Process(
            target=worker_main, args=(self.config, ready), kwargs={"index": index, "slot": self._slots[index]},
            daemon=False, name=f"cxr-sr-worker-{index}",
        )
        proc.start()
        if index < len(self._workers):
            self._workers[index] = proc  # the replacement takes the same GPU and slot
        else:
            self._workers.append(proc)
        return proc

    def _listen(self, key: str, port: int, start: Callable[[], Any]) -> Any:
        """``start()``, with an OSError (port in use, address not here, bad TLS files) turned into
        an error that names the setting to change."""
        try:
            return start()
        except ssl.SSLError as exc:
            raise StartError(
                f"tls_cert / tls_key / tls_ca ({self.config.tls_cert}, {self.config.tls_key}, {self.config.tls_ca}) "
                f"cannot be loaded: {exc}; give a PEM certificate and its private key"
            ) from None
        except OSError as exc:
            what = {errno.EADDRINUSE: "is already in use (another node or program listens there)",
                    errno.EADDRNOTAVAIL: "is not an address of this machine",
                    errno.EACCES: "needs privileges (ports below 1024)"}.get(exc.errno, f"cannot be opened ({exc})")
            raise StartError(
                f"{key} {port} on {self.config.bind_address} {what}: choose another {key} (or bind_address)"
            ) from None

    def stop(self, *, worker_grace_s: float = 600.0) -> None:
        self.scp.stop()
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        for proc in self._workers:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the worker finishes its current job, then exits
        for proc in self._workers:
            proc.join(timeout=worker_grace_s)
            if proc.is_alive():
                proc.kill()
        if self._http is not None:
            self._http.shutdown()
        if self.queue is not None:
            self.queue.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("node.stopped")

    def health(self) -> tuple[bool, dict]:
        """Up = receiving works: the SCP runs, every worker lives, the spool takes files and has
        more free space than ``min_free_disk_mb`` (below it every association is refused)."""
        alive = sum(p.is_alive() for p in self._workers)
        free_mb = self.spool.free_mb()
        writable = os.access(self.spool.tmp_dir, os.W_OK) and os.access(self.spool.root / "incoming", os.W_OK)
        disk_ok = free_mb >= self.config.min_free_disk_mb
        ok = self.scp.server is not None and alive == len(self._workers) and writable and disk_ok
        detail = {"scp": self.scp.server is not None, "workers_alive": alive, "workers": len(self._workers),
                  "spool_writable": writable, "free_disk_mb": free_mb, "disk_ok": disk_ok}
        if self.queue is not None:  # receiving goes on while the broker is away; the spool keeps the jobs
            detail.update(runner="celery", broker_ok=self._broker_ok)
        return ok, {**detail, **self.spool.counts()}

    def serve_forever(self) -> None:
        import signal

        # the handler only flips a flag: Event.set() from a handler deadlocks when the signal lands
        # while the main thread holds that Event's lock (inside its own wait)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "_signalled", True))
        self.start()
        try:
            while not self._signalled:
                time.sleep(0.5)
                self.check_workers()
        finally:
            self.stop()

    def check_workers(self) -> list[int]:
        """Replace workers that died; the job one was processing is released to be taken at once
        (not after its lease, 15 min by default). Returns the indexes replaced."""
        dead = [i for i, p in enumerate(self._workers) if not p.is_alive()]
        if not dead:
            return []
        log.error("worker.died", exitcodes=[self._workers[i].exitcode for i in dead])
        for index in dead:
            held = holding(self._slots[index])
            if held and self.spool.release_lease(held[0], attempt=held[1]):
                log.warning("job.released", job_id=held[0], attempt=held[1], reason="its worker died")
            self._slots[index].value = b""
            self._spawn(index)
        return dead

    # --- loops -----------------------------------------------------------------------------------
    def _schedule_loop(self) -> None:
        last_purge = last_sweep = last_reconcile = 0.0
        # A live transfer's file grows with every PDU, and a PDU must arrive within network_timeout_s
        # plus its length at 64 KiB/s (scp.guard_reads): a file idle three times that belongs to a
        # transfer that died without cleaning up (the disk filled under pynetdicom's reader thread),
        # and it holds space that makes the node refuse every association until it goes.
        idle_s = 3 * self.config.network_timeout_s + 60.0
        while not self._stop.wait(0.2):
            try:
                self.schedule_once()
                if self.queue is not None and time.monotonic() - last_reconcile > self.reconcile_interval_s:
                    self.reconcile_once()
                    last_reconcile = time.monotonic()
                if time.monotonic() - last_sweep > 60:
                    stale = self.spool.sweep_tmp(idle_s)
                    if stale:
                        log.warning("spool.tmp_swept", files=stale, reason="left by aborted transfers")
                    last_sweep = time.monotonic()
                if time.monotonic() - last_purge > 600:
                    self.spool.purge_done(self.config.keep_done_days * 86400)
                    last_purge = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - keep scheduling; the error is logged
                log.error("scheduler.error", error=f"{type(exc).__name__}: {exc}")

    def schedule_once(self) -> list[str]:
        created = []
        for series in self.spool.incoming_series():
            try:
                age = time.time() - self.spool.last_arrival(series)
            except FileNotFoundError:
                continue
            if self.tracker.is_complete(series.key, idle_s=self.config.series_idle_s,
                                        max_wait_s=self.config.series_max_wait_s, fallback_age_s=age):
                job_id = self.spool.create_job(series)
                self.tracker.forget(series.key)
                if job_id:
                    job = self.spool.get(job_id)
                    log.info("job.created", job_id=job_id, series_instance_uid=job.series_uid,
                             study_instance_uid=job.study_uid, calling_ae=job.calling_ae)
                    created.append(job_id)
                    if self.queue is not None and self._broker_ok is not False:  # else the reconciler will
                        self._publish("process", job_id)
        return created

    # --- celery runner -----------------------------------------------------------------------------
    def _declare_queues(self) -> dict[str, int] | None:
        """Declare the exchanges and queues; returns the messages waiting per work queue, or None
        when the broker cannot be reached (jobs then wait in the spool; the reconciler publishes them)."""
        try:
            waiting = self.queue.declare()
        except Exception as exc:  # noqa: BLE001 - any broker/network error: keep receiving, retry later
            self._set_broker_ok(False, f"{type(exc).__name__}: {exc}")
            return None
        self._set_broker_ok(True)
        return waiting

    def _set_broker_ok(self, ok: bool, reason: str = "") -> None:
        if ok and self._broker_ok is False:
            log.info("queue.available", counts=self.spool.counts())
        elif not ok and self._broker_ok is not False:
            log.warning("queue.unavailable", reason=reason, note="jobs wait in the spool until the broker is back")
        self._broker_ok = ok

    def _publish(self, stage: str, job_id: str, *, why: str = "created") -> bool:
        try:
            self.queue.publish(stage, job_id)
        except Exception as exc:  # noqa: BLE001 - the job stays in the spool; the reconciler retries
            log.warning("queue.publish_failed", job_id=job_id, stage=stage, reason=f"{type(exc).__name__}: {exc}")
            self._set_broker_ok(False, f"{type(exc).__name__}: {exc}")
            return False
        self._set_broker_ok(True)
        self._published[(job_id, stage)] = time.time()
        log.debug("queue.published", job_id=job_id, stage=stage, why=why)
        return True

    def reconcile_once(self) -> list[tuple[str, str]]:
        """Publish what the spool says is due but may have no message (the spool is the truth).

        A job waiting for a stage (``ready``/``outgoing``, past its backoff) is re-published when
        it has waited ``reconcile_interval_s`` and either this node never published it since it
        became due (a failed publish, a node restart, a message from a worker that died before
        publishing) or the stage's queue holds no waiting message (so its message is gone). A job
        whose lease expired is re-published the same way: its worker died without the broker
        handing the message on. Duplicates are harmless: a task finds the job not due and acks."""
        waiting = self._declare_queues()
        if waiting is None:
            return []
        now, settle = time.time(), self.reconcile_interval_s
        from cxr_sr_node.queue import queue_for_stage

        republished = []
        for state, stage, expired in (("ready", "process", False), ("outgoing", "send", False),
                                      ("running", "process", True), ("sending", "send", True)):
            for job in self.spool.jobs(state):
                due_since = job.lease_until if expired else max(job.updated, job.not_before)
                if due_since > now - settle:
                    continue  # not due yet, or only just: its message is probably on its way
                last = self._published.get((job.job_id, stage))
                if last is not None and last >= due_since and (waiting[queue_for_stage(stage)] > 0 or last > now - settle):
                    continue  # published since it became due, and it may still be in the queue
                why = "lease_expired" if expired else ("unpublished" if last is None or last < due_since else "queue_empty")
                log.info("job.republished", job_id=job.job_id, stage=stage, state=state, why=why)
                if self._publish(stage, job.job_id, why=why):
                    republished.append((job.job_id, stage))
        live = {j.job_id for s in ("ready", "running", "outgoing", "sending") for j in self.spool.jobs(s)}
        self._published = {k: v for k, v in self._published.items() if k[0] in live}
        return republished

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.send_once():
                    self._stop.wait(0.2)
            except Exception as exc:  # noqa: BLE001
                log.error("sender.error", error=f"{type(exc).__name__}: {exc}")
                self._stop.wait(1.0)

    def send_once(self) -> bool:
        cfg = self.config
        job = self.spool.claim(stage="send", lease_s=cfg.lease_s, max_attempts=cfg.send_retries + 1)
        if job is None:
            return False
        outcome = send_job(self.spool, cfg, job)
        if outcome != "skipped":
            self.metrics.sent(outcome)
        return True
