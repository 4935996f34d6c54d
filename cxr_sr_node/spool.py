"""The spool: folders a person can read, plus a SQLite (WAL) job table beside them.

Layout under the spool root::

    tmp/                                   partial receives (pynetdicom's chunked temp files)
    incoming/<study>/<series>/<sop>.dcm    acknowledged instances of series still arriving
    incoming/<study>/<series>/source.json  who sent the series (calling AE, address)
    jobs/<job>/in/<sop>.dcm                a complete series, waiting for or in processing
    jobs/<job>/out/<sop>.dcm               derived instances, waiting to be sent
    done/<job>/                            finished jobs (kept ``keep_done_days``)
    failed/<job>/ + reason.json            dead letter; ``cxr-sr-node retry JOB`` re-queues
    quarantine/<name>.dcm + .reason.json   instances that could not be parsed
    jobs.sqlite                            job state: ready → running → outgoing → sending → done | failed

Every file is written (or received) elsewhere, fsynced, and renamed into place; directories are
fsynced after renames, so an instance that got status 0x0000 survives ``kill -9`` and power loss.
The database row is the truth about a job's state; ``recover()`` re-aligns folders and rows after
a crash between the two. Nothing here imports torch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("ready", "running", "outgoing", "sending", "done", "failed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    calling_address TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    send_attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, not_before);
"""
MAX_BACKOFF_S = 300.0  # the longest wait between two attempts, however many there are


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def safe_name(uid: str) -> str:
    """A UID as a file name: a conformant UID as it is; otherwise every character that is not a
    digit or '.' replaced and a hash of the whole value appended, so two non-conformant UIDs
    (``1.2.a`` and ``1.2.b``) never share a file (the second would overwrite an instance that had
    already been acknowledged) and no value can name a path outside its folder."""
    value = uid.strip()
    cleaned = "".join(c if c.isdigit() or c == "." else "_" for c in value)
    if cleaned == value and value.strip(".") and len(value) <= 64:
        return value
    return f"{cleaned[:64]}_{hashlib.sha256(value.encode()).hexdigest()[:16]}"


class LeaseLost(RuntimeError):
    """A worker tried to record the outcome of a job it no longer holds (its lease was taken over)."""


class SpoolInUse(RuntimeError):
    """Another node process holds this spool."""


@dataclass(frozen=True)
class Job:
    job_id: str
    state: str
    study_uid: str
    series_uid: str
    calling_ae: str
    calling_address: str
    attempts: int
    send_attempts: int
    lease_until: float
    not_before: float
    created: float
    updated: float
    reason: str
    result: dict[str, Any]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["result"] = json.loads(data["result"] or "{}")
        return cls(**data)


@dataclass(frozen=True)
class IncomingSeries:
    study_uid: str
    series_uid: str
    path: Path

    @property
    def key(self) -> tuple[str, str]:
        return (self.study_uid, self.series_uid)


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for name in ("tmp", "incoming", "jobs", "done", "failed", "quarantine"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "jobs.sqlite"
        self._incoming_lock = threading.Lock()  # SCP threads vs the series scheduler
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    # --- routing: where the node sends (read by queue workers, DESIGN §7) -------------------------

    ROUTING_FILE = "routing.json"

    def free_mb(self) -> int:
        """Free space on the spool's file system, in MiB (what ``min_free_disk_mb`` is compared with)."""
        return shutil.disk_usage(self.root).free // 2**20

    def write_routing(self, routing: dict[str, Any]) -> None:
        """The node's sending settings, written at every start: a worker on another machine sends
        each job where the node that received it would have (its own dest may be missing or stale)."""
        write_atomic(self.root / self.ROUTING_FILE, (json.dumps(routing, indent=1, sort_keys=True) + "\n").encode())

    def read_routing(self) -> dict[str, Any] | None:
        """What :meth:`write_routing` wrote, or None before any node started on this spool."""
        try:
            return json.loads((self.root / self.ROUTING_FILE).read_text())
        except FileNotFoundError:
            return None

    # --- database --------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- receive ---------------------------------------------------------------------------------
    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.root / "incoming" / safe_name(study_uid) / safe_name(series_uid)

    def accept_instance(
        self, received: Path, *, study_uid: str, series_uid: str, sop_uid: str, calling_ae: str, address: str
    ) -> Path:
        """fsync a fully received file and rename it into ``incoming/``; returns its final path.

        Only after this returns may the SCP answer 0x0000."""
        fsync_file(received)
        with self._incoming_lock:
            folder = self.series_dir(study_uid, series_uid)
            new_folder = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            dest = folder / f"{safe_name(sop_uid)}.dcm"
            try:
                os.replace(received, dest)
            except OSError as exc:  # different file system: copy, fsync, then rename
                if exc.errno != 18:  # EXDEV
                    raise
                tmp = folder / f".{dest.name}.tmp"
                shutil.copyfile(received, tmp)
                fsync_file(tmp)
                os.replace(tmp, dest)
            source = folder / "source.json"
            if not source.exists():
                write_atomic(source, json.dumps({"calling_ae": calling_ae, "address": address}).encode())
            fsync_dir(folder)
            if new_folder:
                fsync_dir(folder.parent)
                fsync_dir(folder.parent.parent)
        return dest

    def quarantine(self, received: Path, *, reason: str, calling_ae: str, address: str) -> Path:
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        dest = self.root / "quarantine" / f"{name}.dcm"
        fsync_file(received)
        try:
            os.replace(received, dest)
        except OSError:
            shutil.copyfile(received, dest)
        write_atomic(
            dest.with_suffix(".reason.json"),
            json.dumps({"reason": reason, "calling_ae": calling_ae, "address": address, "time": time.time()}).encode(),
        )
        return dest

    def incoming_series(self) -> list[IncomingSeries]:
        out = []
        for study in sorted((self.root / "incoming").iterdir()):
            if study.is_dir():
                out += [IncomingSeries(study.name, s.name, s) for s in sorted(study.iterdir()) if s.is_dir()]
        return out

    @staticmethod
    def last_arrival(series: IncomingSeries) -> float:
        """Newest file time in a series folder (used after a restart, when no tracker state exists)."""
        times = [p.stat().st_mtime for p in series.path.glob("*.dcm")]
        return max(times, default=series.path.stat().st_mtime)

    # --- jobs ------------------------------------------------------------------------------------
    def job_dir(self, job_id: str, state: str | None = None) -> Path:
        if state is None:
            state = self.get(job_id).state
        base = {"done": "done", "failed": "failed"}.get(state, "jobs")
        return self.root / base / job_id

    def create_job(self, series: IncomingSeries) -> str | None:
        """Move a complete series into a new job folder and record it as ``ready``."""
        job_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        job = self.root / "jobs" / job_id
        with self._incoming_lock:
            if not series.path.is_dir() or not any(series.path.glob("*.dcm")):
                shutil.rmtree(series.path, ignore_errors=True)
                return None
            job.mkdir()
            os.replace(series.path, job / "in")
            fsync_dir(job)
            fsync_dir(series.path.parent)
            try:
                series.path.parent.rmdir()  # the study folder, when it was the last series
            except OSError:
                pass
        self._insert_job(job_id, job)
        return job_id

    def _insert_job(self, job_id: str, job: Path) -> None:
        source = {}
        if (job / "in" / "source.json").is_file():
            source = json.loads((job / "in" / "source.json").read_text())
        study_uid, series_uid = _uids_of(job / "in")
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, state, study_uid, series_uid, calling_ae, calling_address,"
                " created, updated) VALUES (?, 'ready', ?, ?, ?, ?, ?, ?)",
                (job_id, study_uid, series_uid, source.get("calling_ae", ""), source.get("address", ""), now, now),
            )

    def get(self, job_id: str) -> Job:
        row = self._conn().execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id!r} in {self.db_path}")
        return Job.from_row(row)

    def jobs(self, state: str | None = None) -> list[Job]:
        if state is None:
            rows = self._conn().execute("SELECT * FROM jobs ORDER BY created").fetchall()
        else:
            rows = self._conn().execute("SELECT * FROM jobs WHERE state = ? ORDER BY created", (state,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = {s: 0 for s in STATES}
        counts.update({r[0]: r[1] for r in rows})
        counts["incoming_series"] = len(self.incoming_series())
        counts["quarantined"] = len(list((self.root / "quarantine").glob("*.dcm")))
        return counts

    def claim(self, *, stage: str, lease_s: float, max_attempts: int) -> Job | None:
        """Take the oldest job due for ``stage`` ("process" or "send"), or one whose lease expired.

        A job whose worker died is taken again; past ``max_attempts`` it goes to ``failed``."""
        waiting, active, counter = (
            ("ready", "running", "attempts") if stage == "process" else ("outgoing", "sending", "send_attempts")
        )
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE (state = ? AND not_before <= ?) OR (state = ? AND lease_until < ?)"
                " ORDER BY created LIMIT 1",
                (waiting, now, active, now),
            ).fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            if _exhausted(job, stage, max_attempts):
                db.execute(
                    "UPDATE jobs SET state = 'failed', reason = ?, updated = ? WHERE job_id = ?",
                    (job.reason or _lost_reason(job, stage), now, job.job_id),
                )
                failed = True
            else:
                db.execute(
                    f"UPDATE jobs SET state = ?, lease_until = ?, {counter} = {counter} + 1, updated = ?"
                    " WHERE job_id = ?",
                    (active, now + lease_s, now, job.job_id),
                )
                failed = False
        if failed:
            self._move(job.job_id, "failed")
            self._write_reason(job.job_id)
            return self.claim(stage=stage, lease_s=lease_s, max_attempts=max_attempts)
        return self.get(job.job_id)

    def claim_job(
        self, job_id: str, *, stage: str, lease_s: float, max_attempts: int, take_over: bool = False
    ) -> Job | None:
        """Take ``job_id`` for ``stage`` — what :meth:`claim` does for the oldest due job, for one job.

        The job is taken when it waits for ``stage`` and is past its backoff, or when the lease of
        the worker that held it expired; the attempt counter goes up and a new lease starts. A
        job already tried ``max_attempts`` times (in either stage) goes to ``failed`` instead. Returns
        None when there is nothing to take: no such job, done, failed (now or before), held under a
        live lease, or still waiting out a backoff. A queue message is delivered at least once, so
        a duplicate message finds None here and does nothing.

        ``take_over=True`` also takes a job held under a live lease: for a caller that knows the
        holder is gone, e.g. a RabbitMQ redelivery, which happens only after the connection of the
        consumer that had the message closed (its worker died)."""
        waiting, active, counter = (
            ("ready", "running", "attempts") if stage == "process" else ("outgoing", "sending", "send_attempts")
        )
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            job = Job.from_row(row) if row is not None else None
            due = job is not None and (
                (job.state == waiting and job.not_before <= now)
                or (job.state == active and (job.lease_until < now or take_over))
            )
            failed = False
            if not due:
                pass
            elif _exhausted(job, stage, max_attempts):
                db.execute(
                    "UPDATE jobs SET state = 'failed', reason = ?, updated = ? WHERE job_id = ?",
                    (job.reason or _lost_reason(job, stage), now, job_id),
                )
                failed = True
            else:
                db.execute(
                    f"UPDATE jobs SET state = ?, lease_until = ?, {counter} = {counter} + 1, updated = ?"
                    " WHERE job_id = ?",
                    (active, now + lease_s, now, job_id),
                )
        if failed:
            self._move(job_id, "failed")
            self._write_reason(job_id)
        if not due or failed:
            return None
        return self.get(job_id)

    def _set(self, job_id: str, *, fence: tuple[str, str, int] | None = None, **values: Any) -> None:
        """Update a job row. ``fence = (state, counter, attempt)``: only if the job is still in that
        state at that attempt, i.e. the caller still holds its lease; else :class:`LeaseLost`."""
        values["updated"] = time.time()
        if "result" in values:
            values["result"] = json.dumps(values["result"])
        cols = ", ".join(f"{k} = ?" for k in values)
        where, args = "job_id = ?", [job_id]
        if fence is not None:
            where += f" AND state = ? AND {fence[1]} = ?"
            args += [fence[0], fence[2]]
        with self._tx() as db:
            changed = db.execute(f"UPDATE jobs SET {cols} WHERE {where}", (*values.values(), *args)).rowcount
        if fence is not None and changed == 0:
            raise LeaseLost(f"job {job_id} is no longer {fence[0]} at attempt {fence[2]}: another worker took it over")

    @staticmethod
    def _fence(stage: str, attempt: int | None) -> tuple[str, str, int] | None:
        if attempt is None:
            return None
        return ("running", "attempts", attempt) if stage == "process" else ("sending", "send_attempts", attempt)

    def renew_lease(self, job_id: str, *, stage: str, attempt: int, lease_s: float) -> None:
        """Extend the lease of a job this worker holds (after each instance of a long series, so a
        series that takes longer than ``lease_s`` is not taken over while it is being worked on).
        :class:`LeaseLost` if another worker has it now."""
        self._set(job_id, fence=self._fence(stage, attempt), lease_until=time.time() + lease_s)

    def finish_processing(self, job_id: str, result: dict[str, Any], *, has_output: bool,
                          attempt: int | None = None) -> None:
        """Processing succeeded: ``outgoing`` when there is something to send, else ``done``.
        With ``attempt`` (the claimed job's ``attempts``) it is fenced: see :meth:`_set`."""
        write_atomic(self.job_dir(job_id, "running") / "result.json", json.dumps(result, indent=2).encode())
        fence = self._fence("process", attempt)
        if has_output:
            self._set(job_id, fence=fence, state="outgoing", result=result, lease_until=0, not_before=0, reason="")
        else:
            self._set(job_id, fence=fence, state="done", result=result, lease_until=0, reason="")
            self._move(job_id, "done")

    def fail_attempt(self, job_id: str, *, stage: str, reason: str, max_attempts: int, backoff_s: float,
                     attempt: int | None = None) -> str:
        """Record a failed attempt; returns the new state (back to waiting with backoff, or failed)."""
        job = self.get(job_id)
        attempts = job.attempts if stage == "process" else job.send_attempts
        waiting = "ready" if stage == "process" else "outgoing"
        fence = self._fence(stage, attempt)
        if attempts >= max_attempts:
            self._set(job_id, fence=fence, state="failed", reason=reason, lease_until=0)
            self._move(job_id, "failed")
            self._write_reason(job_id)
            return "failed"
        delay = min(MAX_BACKOFF_S, backoff_s * (2 ** (attempts - 1)))
        self._set(job_id, fence=fence, state=waiting, reason=reason, lease_until=0, not_before=time.time() + delay)
        return waiting

    def postpone(self, job_id: str, *, stage: str, attempt: int, reason: str, delay_s: float) -> str:
        """Put a job this worker holds back to waiting for ``delay_s`` without using up its attempt:
        it did not fail, it could not run (the spool's disk is full). Returns the waiting state."""
        waiting = "ready" if stage == "process" else "outgoing"
        fence = self._fence(stage, attempt)
        assert fence is not None
        self._set(job_id, fence=fence, state=waiting, reason=reason, lease_until=0,
                  not_before=time.time() + delay_s, **{fence[1]: attempt - 1})
        return waiting

    def finish_sending(self, job_id: str, result: dict[str, Any], *, attempt: int | None = None) -> None:
        job = self.get(job_id)
        merged = {**job.result, "send": result}
        write_atomic(self.job_dir(job_id, "sending") / "result.json", json.dumps(merged, indent=2).encode())
        self._set(job_id, fence=self._fence("send", attempt), state="done", result=merged, lease_until=0, reason="")
        self._move(job_id, "done")

    def retry(self, job_id: str) -> str:
        """Put a failed job back: to ``outgoing`` if its outputs were made, else to ``ready``."""
        job = self.get(job_id)
        if job.state != "failed":
            raise ValueError(f"job {job_id} is {job.state}, not failed; only failed jobs can be retried")
        src = self.root / "failed" / job_id
        dest = self.root / "jobs" / job_id
        if src.is_dir():
            os.replace(src, dest)
            (dest / "reason.json").unlink(missing_ok=True)  # it would still be there, in done/, after a success
            fsync_dir(dest.parent)
        state = "outgoing" if job.result.get("processed") and (dest / "out").is_dir() else "ready"
        self._set(job_id, state=state, attempts=0, send_attempts=0, not_before=0, lease_until=0)
        return state

    def _move(self, job_id: str, state: str) -> None:
        src = self.root / "jobs" / job_id
        if src.is_dir():
            dest = self.root / state / job_id
            os.replace(src, dest)
            fsync_dir(dest.parent)
            fsync_dir(src.parent)

    def _write_reason(self, job_id: str) -> None:
        job = self.get(job_id)
        path = self.root / "failed" / job_id
        if path.is_dir():
            data = {"job_id": job_id, "reason": job.reason, "attempts": job.attempts,
                    "send_attempts": job.send_attempts, "time": time.time()}
            write_atomic(path / "reason.json", json.dumps(data, indent=2).encode())

    def recover(self) -> dict[str, int]:
        """After a crash: register job folders that have no row, finish interrupted folder moves,
        and clear stale temporary files. Expired leases are taken again by :meth:`claim`."""
        fixed = {"registered": 0, "moved": 0, "tmp_removed": 0}
        known = {j.job_id: j for j in self.jobs()}
        for folder in sorted((self.root / "jobs").iterdir()):
            if not folder.is_dir():
                continue
            job = known.get(folder.name)
            if job is None:
                if (folder / "in").is_dir():
                    self._insert_job(folder.name, folder)
                    fixed["registered"] += 1
            elif job.state in ("done", "failed"):
                self._move(job.job_id, job.state)
                fixed["moved"] += 1
        for tmp in (self.root / "tmp").iterdir():
            tmp.unlink(missing_ok=True) if tmp.is_file() else shutil.rmtree(tmp, ignore_errors=True)
            fixed["tmp_removed"] += 1
        return fixed

    def lock_for_node(self) -> int:
        """Hold the spool for this node process; returns the lock's file descriptor (close it to
        release; the kernel releases it when the process dies, ``kill -9`` included).

        One ``serve`` per spool: a second node would take the first one's jobs and, at its start,
        end their leases (:meth:`expire_leases`). ``status``, ``check`` and ``retry`` do not lock.
        Raises :class:`SpoolInUse` naming the holder's pid.
        """
        path = self.root / "node.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolInUse(
                f"spool {self.root} is in use by another cxr-sr-node serve (pid {holder}); stop that node "
                "first, or give this one its own --spool"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def node_holder(self) -> int | None:
        """The pid of the ``serve`` holding this spool, or None when no node runs on it."""
        path = self.root / "node.lock"
        if not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def expire_leases(self) -> int:
        """End every lease now (jobs running or sending); returns how many.

        For the embedded runner at start: its workers and sender are children and threads of the
        node process, so when the node starts, every lease in the table belongs to a process that
        is gone, and waiting ``lease_s`` (15 min by default) for it would only delay the job. The
        job is then claimed as a lost one: its attempt counts, and ``max_attempts`` still ends a
        job that kills its worker every time. Not for the Celery runner, whose workers outlive the
        node.
        """
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE jobs SET lease_until = 0 WHERE state IN ('running', 'sending') AND lease_until > 0"
            )
            return cursor.rowcount

    def release_lease(self, job_id: str, *, attempt: int) -> bool:
        """End the lease of ``job_id``'s process attempt ``attempt`` now, when that attempt still
        holds it (the node saw the worker that claimed it die). Returns whether it did; the next
        claim then takes the job as a lost one (its attempt counts, like after an expired lease)."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE jobs SET lease_until = 0 WHERE job_id = ? AND state = 'running' AND attempts = ?",
                (job_id, attempt),
            )
            return cursor.rowcount == 1

    def sweep_tmp(self, older_than_s: float) -> int:
        """Delete files in ``tmp/`` untouched for ``older_than_s``; returns how many.

        ``tmp/`` holds files on their way into the spool (written, fsynced, renamed within
        moments) and pynetdicom's chunked receives, which grow while data arrives and are aborted
        after the network timeout. A file idle far longer than both belongs to nobody: an aborted
        transfer the SCP did not clean up (see ``StorageSCP._discard_partial``). At start,
        :meth:`recover` empties ``tmp/`` entirely.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.tmp_dir.iterdir():
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # renamed into place or removed meanwhile
                continue
        return removed

    def purge_done(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        removed = 0
        for job in self.jobs("done"):
            if job.updated < cutoff:
                shutil.rmtree(self.root / "done" / job.job_id, ignore_errors=True)
                with self._tx() as db:
                    db.execute("DELETE FROM jobs WHERE job_id = ?", (job.job_id,))
                removed += 1
        return removed


def _exhausted(job: Job, stage: str, max_attempts: int) -> bool:
    """A job taken back from a lost holder (expired lease) after its last attempt: dead-letter it.
    (A job that failed an attempt in the open went to ``failed`` in :meth:`Spool.fail_attempt`.)"""
    return (job.attempts if stage == "process" else job.send_attempts) >= max_attempts


def _lost_reason(job: Job, stage: str) -> str:
    if stage == "process":
        return f"processing did not finish in {job.attempts} attempts (worker lost)"
    return f"sending did not finish in {job.send_attempts} attempts (sender lost)"


def _uids_of(folder: Path) -> tuple[str, str]:
    """Study and series UIDs of a job folder, from the first instance's header."""
    import pydicom

    for path in sorted(folder.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                 specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
            return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the worker
            continue
    return folder.parent.name, folder.name
