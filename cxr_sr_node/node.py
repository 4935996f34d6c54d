"""The embedded runner behind ``serve``: SCP threads, a series scheduler, worker processes, a sender.

Nothing here needs a server besides the node itself. Workers are child processes started with
'spawn' (the parent never imports torch); each loads the model once. The sender runs in the parent
so network retries never hold a GPU. SIGTERM / Ctrl-C stop the SCP first, let workers finish
their current job, and leave everything unfinished in the spool for the next start.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

from cxr_sr_node.config import NodeConfig, Peer
from cxr_sr_node.logs import get_logger
from cxr_sr_node.metrics import Metrics, start_http
from cxr_sr_node.scp import SeriesTracker, StorageSCP
from cxr_sr_node.send import SendError, send_files
from cxr_sr_node.spool import Spool
from cxr_sr_node.worker import worker_main

log = get_logger("cxr_sr_node.node")


def destination(config: NodeConfig, calling_ae: str) -> Peer | None:
    """Back to the caller when return_to_sender is on and the caller is a known peer, else dest."""
    if config.return_to_sender and calling_ae in config.peers:
        return config.peers[calling_ae]
    return config.dest


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.tracker = SeriesTracker()
        self.metrics = Metrics(self.spool)
        self.scp = StorageSCP(config, self.spool, self.tracker, on_store=self.metrics.stored)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers: list[mp.Process] = []
        self._http = None

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self, *, wait_for_workers_s: float = 300.0) -> None:
        fixed = self.spool.recover()
        log.info("spool.recovered", root=str(self.spool.root), **fixed, **self.spool.counts())
        ctx = mp.get_context("spawn")
        events = []
        for _ in range(self.config.workers):
            ready = ctx.Event()
            proc = ctx.Process(target=worker_main, args=(self.config, ready), daemon=False, name="cxr-sr-worker")
            proc.start()
            self._workers.append(proc)
            events.append((proc, ready))
        deadline = time.monotonic() + wait_for_workers_s
        for proc, ready in events:
            while not ready.wait(0.2):
                if not proc.is_alive():
                    self.stop()
                    raise RuntimeError(f"worker process exited with code {proc.exitcode} while loading the model; see the log above")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"worker did not load the model within {wait_for_workers_s} s")
        self.scp.start()
        for target, name in ((self._schedule_loop, "scheduler"), (self._send_loop, "sender")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.config.http_port:
            self._http = start_http(self.config.bind_address, self.config.http_port, self.metrics, self.health)
        log.info("node.started", ae_title=self.config.ae_title, port=self.scp.port,
                 dest=str(self.config.dest) if self.config.dest else None, workers=len(self._workers),
                 spool=str(Path(self.config.spool).resolve()))

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
        log.info("node.stopped")

    def health(self) -> tuple[bool, dict]:
        alive = sum(p.is_alive() for p in self._workers)
        ok = self.scp.server is not None and alive == len(self._workers)
        return ok, {"scp": self.scp.server is not None, "workers_alive": alive, "workers": len(self._workers),
                    **self.spool.counts()}

    def serve_forever(self) -> None:
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        try:
            while not self._stop.wait(1.0):
                dead = [p for p in self._workers if not p.is_alive()]
                if dead:
                    log.error("worker.died", exitcodes=[p.exitcode for p in dead])
                    self._restart_workers(dead)
        finally:
            self.stop()

    def _restart_workers(self, dead: list[mp.Process]) -> None:
        ctx = mp.get_context("spawn")
        for proc in dead:
            self._workers.remove(proc)
            new = ctx.Process(target=worker_main, args=(self.config, None), name="cxr-sr-worker")
            new.start()
            self._workers.append(new)

    # --- loops -----------------------------------------------------------------------------------
    def _schedule_loop(self) -> None:
        last_purge = 0.0
        while not self._stop.wait(0.2):
            try:
                self.schedule_once()
                if time.monotonic() - last_purge > 3600:
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
        return created

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
        files = sorted((self.spool.job_dir(job.job_id, "sending") / "out").glob("*.dcm"))
        peer = destination(cfg, job.calling_ae)
        if peer is None:
            self.spool.finish_sending(job.job_id, {"peer": None, "sent": 0, "note": "no destination configured; output kept in done/"})
            log.info("send.skipped", job_id=job.job_id, reason="no destination configured", files=len(files))
            return True
        started = time.perf_counter()
        try:
            result = send_files(peer, files, calling_ae=cfg.ae_title, timeout_s=cfg.dimse_timeout_s, max_pdu=cfg.max_pdu)
        except (SendError, OSError) as exc:
            state = self.spool.fail_attempt(job.job_id, stage="send", reason=str(exc),
                                            max_attempts=cfg.send_retries + 1, backoff_s=cfg.send_backoff_s)
            self.metrics.sent("failed" if state == "failed" else "retry")
            log.warning("send.failed", job_id=job.job_id, peer=str(peer), reason=str(exc), attempt=job.send_attempts, state=state)
            return True
        self.spool.finish_sending(job.job_id, {"peer": result.peer, "sent": result.sent, "statuses": result.statuses})
        self.metrics.sent("ok")
        log.info("send.finished", job_id=job.job_id, peer=result.peer, sent=result.sent,
                 elapsed_s=round(time.perf_counter() - started, 3))
        return True
