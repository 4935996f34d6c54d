"""Child processes on loopback ports: free ports, polling with a deadline, and a process in its own
session whose failures quote its log. Shared by ``cxr-sr-node bench`` and the test suite's real
peers (``tests/peers.py``); standard library only."""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

HOST = "127.0.0.1"

T = TypeVar("T")


def find_executable(name: str, *, native: bool = False) -> str | None:
    """The first executable called ``name`` on PATH, then in /usr/sbin and /usr/bin (where a
    non-login root PATH may not look); with ``native``, only compiled (non-``#!``) ones.

    ``native`` is for dcmtk's tools: pynetdicom installs Python apps with the same names (storescu,
    storescp, echoscu, ...) into a virtual environment's bin/, which is first on PATH once the
    environment is activated, and they take other arguments. dcmtk's are ELF binaries.
    """
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/usr/bin"]:
        path = Path(folder or ".") / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        if not native:
            return str(path)
        try:
            with path.open("rb") as f:
                if f.read(2) != b"#!":
                    return str(path)
        except OSError:
            continue
    return None


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the kernel picks it)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all sockets stay bound until every port is chosen."""
    if n < 1:
        raise ValueError(f"n must be >= 1, found {n}")
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def port_accepts(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], T], deadline_s: float, what: str, *, interval_s: float = 0.1) -> T:
    """Poll ``predicate`` until it returns a truthy value, which is returned.

    Polls start at 10 ms and back off to ``interval_s``. Exceptions from ``predicate`` propagate.
    Raises :class:`TimeoutError` naming ``what`` once ``deadline_s`` has passed.
    """
    if deadline_s <= 0:
        raise ValueError(f"deadline_s must be > 0, found {deadline_s}")
    start = time.monotonic()
    end = start + deadline_s
    delay = min(0.01, interval_s)
    while True:
        result = predicate()
        if result:
            return result
        now = time.monotonic()
        if now >= end:
            raise TimeoutError(
                f"timed out after {now - start:.1f} s (deadline {deadline_s:g} s) waiting for {what}"
            )
        time.sleep(min(delay, end - now))
        delay = min(delay * 2, interval_s)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class Process:
    """A process in its own session, stdout+stderr appended to ``log_path``.

    ``stop`` sends SIGTERM to the whole process group, or to the leader alone with
    ``term_leader_only`` (a leader that stops its own children, like the node); SIGKILL follows
    after the deadline, and whatever is left in the group is killed.
    """

    error_type: ClassVar[type[Exception]] = RuntimeError
    tail_lines: ClassVar[int] = 30
    stop_deadline_s: ClassVar[float] = 15.0  # SIGTERM grace before SIGKILL when ``stop`` is given none

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    cwd: Path | None = None
    user: str | None = None
    term_leader_only: bool = False
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {self.name}: {shlex.join(self.argv)}\n".encode())
            log.flush()
            kwargs: dict[str, Any] = {}
            if self.user is not None:
                kwargs.update(user=self.user, group=pwd.getpwnam(self.user).pw_gid, extra_groups=[])
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                cwd=self.cwd, start_new_session=True, **kwargs,
            )

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise self.error_type(f"{self.name} was not started")
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int | None = None) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-(lines or self.tail_lines):])

    def error(self, what: str) -> Exception:
        state = "still running" if self.alive else f"exit status {self.popen.returncode if self.popen else None}"
        return self.error_type(
            f"{self.name} {what} ({state}); last {self.tail_lines} lines of {self.log_path}:\n{self.log_tail()}"
        )

    def wait_ready(self, predicate: Callable[[], Any], deadline_s: float, what: str) -> None:
        """Wait for ``predicate``; fail at once with the log if the process exits meanwhile."""

        def ready() -> bool:
            if not self.alive:
                raise self.error(f"exited while waiting for {what}")
            return bool(predicate())

        try:
            wait_until(ready, deadline_s, f"{self.name}: {what}")
        except TimeoutError as exc:
            raise self.error(str(exc)) from exc

    def stop(self, deadline_s: float | None = None) -> int | None:
        """SIGTERM (see the class), SIGKILL the group after ``deadline_s`` (default
        ``stop_deadline_s``); returns the exit status."""
        if self.popen is None:
            return None
        if deadline_s is None:
            deadline_s = self.stop_deadline_s
        pgid = self.popen.pid  # start_new_session: the leader's pid is the group id
        if self.popen.poll() is None:
            if self.term_leader_only:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(signal.SIGTERM)
            else:
                signal_group(pgid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                signal_group(pgid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        signal_group(pgid, signal.SIGKILL)  # anything left in the group after the leader exited
        return self.popen.returncode
