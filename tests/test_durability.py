"""Nothing acknowledged is lost: kill -9 the node mid-transfer, restart it, and every instance that
got 0x0000 comes out the other end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from cxr_sr_node.derive import derived_uid
from model.checkpoint import read_card
from tests.dicom_helpers import CHEST_DIR
from tests.nodes import make_tiny_checkpoint
from tests.peers import PeerMissing, free_port, peer_env, port_accepts, require_binary, wait_until

pytestmark = pytest.mark.timeout(600)


def start_node(spool: Path, port: int, *extra: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cxr_sr_node.cli", "serve", "--ae", "CXRSR", "--port", str(port), "--bind", "127.0.0.1",
           "--spool", str(spool), "--series-idle-s", "0.5", *extra]
    env = {**os.environ, "CXRSR_MIN_FREE_DISK_MB": "1", "CXRSR_SEND_BACKOFF_S": "0.2"}
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    wait_until(lambda: port_accepts("127.0.0.1", port) or proc.poll() is not None, 120, "the node's port")
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc


def _spool_with_one_job(tmp_path: Path):
    """A spool holding one ready job: the chest CR, received from MODALITY."""
    from cxr_sr_node.spool import Spool

    spool = Spool(tmp_path / "spool")
    src = CHEST_DIR / "CR-MONO1-10-chest.dcm"
    ds = pydicom.dcmread(src, force=True)
    staged = spool.tmp_dir / "x.dcm"
    staged.write_bytes(src.read_bytes())
    spool.accept_instance(staged, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                          sop_uid=ds.SOPInstanceUID, calling_ae="MODALITY", address="127.0.0.1")
    (series,) = spool.incoming_series()
    return spool, spool.create_job(series)


def test_kill_9_during_receive_loses_no_acknowledged_instance(tmp_path, storescp):
    try:
        storescu = require_binary("storescu", "dcmtk")  # by path: an activated venv has pynetdicom's first
    except PeerMissing as exc:
        pytest.skip(str(exc))
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    src = pydicom.dcmread(CHEST_DIR / "CR-MONO1-10-chest.dcm", force=True)
    files = []
    study, series = generate_uid(), generate_uid()
    for i in range(40):
        src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID = study, series, generate_uid()
        src.InstanceNumber = i + 1
        path = tmp_path / "send" / f"{i:03d}.dcm"
        path.parent.mkdir(exist_ok=True)
        src.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
        files.append(path)
    spool, port, log = tmp_path / "spool", free_port(), tmp_path / "node.log"

    # receive only (no worker), so the kill lands in the receive path
    node = start_node(spool, port, "--workers", "0", log=log)
    sender = subprocess.Popen([storescu, "-v", "-aet", "MODALITY", "-aec", "CXRSR", "127.0.0.1", str(port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=peer_env())
    wait_until(lambda: len(list((spool / "incoming").rglob("*.dcm"))) >= 10, 60, "10 instances in the spool")
    node.send_signal(signal.SIGKILL)
    node.wait(10)
    output, _ = sender.communicate(timeout=60)
    acknowledged = re.findall(r"Received Store Response \(Success\)", output)
    assert 10 <= len(acknowledged) < len(files), output[-2000:]
    # storescu sends the files in order: the first N acknowledged are files[:N]
    acked_uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files[: len(acknowledged)]]

    # restart with a worker and a destination: every acknowledged instance must come out
    node = start_node(spool, port, "--workers", "1", "--checkpoint", str(checkpoint), "--device", "cpu",
                      "--dest", f"{storescp.ae}@127.0.0.1:{storescp.port}", log=log)
    try:
        sha = read_card(checkpoint).sha256
        from cxr_sr_node import __version__

        wanted = {derived_uid("sop", uid, sha, __version__) for uid in acked_uids}
        wait_until(lambda: wanted <= {p.name.split(".", 1)[1] for p in storescp.files()}, 300,
                   f"{len(wanted)} derived instances at storescp")
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
    assert node.returncode == 0, log.read_text()[-3000:]
    assert list((spool / "tmp").iterdir()) == []


def test_sigterm_finishes_and_restart_resumes_unfinished_jobs(tmp_path, storescp):
    """A job left 'running' by a dead worker (expired lease) is taken again after a restart."""
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    spool, job_id = _spool_with_one_job(tmp_path)
    spool.claim(stage="process", lease_s=0.5, max_attempts=3)  # a worker took it, then died
    time.sleep(0.6)
    port, log = free_port(), tmp_path / "node.log"
    node = start_node(spool.root, port, "--workers", "1", "--checkpoint", str(checkpoint), "--device", "cpu",
                      "--dest", f"{storescp.ae}@127.0.0.1:{storescp.port}", log=log)
    try:
        storescp.wait_for_files(1, 300)
        wait_until(lambda: spool.get(job_id).state == "done", 60, "the resumed job to finish")
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
    assert spool.get(job_id).attempts == 2


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with open(task / "children") as f:
            found.update(int(c) for c in f.read().split())
    return found


def _is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except FileNotFoundError:
        return False
    return b"multiprocessing.spawn" in cmdline and b"resource_tracker" not in cmdline


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_one_node_per_spool_and_kill_9_takes_the_worker_along(tmp_path):
    """A second serve on a spool in use is refused by name; a kill -9 of the node does not leave
    its worker running (re-parented to init, holding the model) beside the next node's."""
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    spool, log = tmp_path / "spool", tmp_path / "node.log"
    args = ("--workers", "1", "--checkpoint", str(checkpoint), "--device", "cpu")
    node = start_node(spool, free_port(), *args, log=log)
    try:
        workers = wait_until(lambda: {p for p in _children(node.pid) if _is_worker(p)} or None, 60, "the worker")
        second = subprocess.run(
            [sys.executable, "-m", "cxr_sr_node.cli", "serve", "--port", str(free_port()), "--bind", "127.0.0.1",
             "--spool", str(spool), *args], capture_output=True, text=True, timeout=120,
            cwd=Path(__file__).resolve().parents[1])
        assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"in use by another cxr-sr-node serve (pid {node.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        wait_until(lambda: not any(_alive(p) for p in workers), 20, "the worker to exit with its node")
        assert "worker.node_gone" in log.read_text()
        node = start_node(spool, free_port(), *args, log=log)  # the kernel released the lock
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
    assert node.returncode == 0, log.read_text()[-3000:]


def test_a_restart_takes_a_dead_workers_job_at_once_not_after_its_lease(tmp_path):
    """A job left 'running' under a 15-minute lease by a node that died is done right after a restart."""
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    spool, job_id = _spool_with_one_job(tmp_path)
    spool.claim(stage="process", lease_s=900, max_attempts=3)  # the node died with this lease held
    log = tmp_path / "node.log"
    node = start_node(spool.root, free_port(), "--workers", "1", "--checkpoint", str(checkpoint), "--device", "cpu",
                      log=log)
    try:
        wait_until(lambda: spool.get(job_id).state == "done", 90, "the job to be taken again and finished")
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
    assert spool.get(job_id).attempts == 2
    assert '"leases_expired": 1' in log.read_text() or "leases_expired=1" in log.read_text()


@pytest.mark.parametrize("busy", ["port", "http_port"])
def test_serve_exits_naming_the_port_when_it_cannot_listen(tmp_path, busy):
    """A failed start after the workers were spawned used to print the error and then never exit
    (the non-daemon workers kept the process alive; with the HTTP port taken it even received)."""
    import socket

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    port = taken if busy == "port" else free_port()
    http = free_port() if busy == "port" else taken
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cxr_sr_node.cli", "serve", "--port", str(port), "--bind", "127.0.0.1",
             "--http-port", str(http), "--spool", str(tmp_path / "spool"), "--workers", "1",
             "--checkpoint", str(checkpoint), "--device", "cpu"],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, "CXRSR_MIN_FREE_DISK_MB": "1"})
    finally:
        holder.close()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{busy} {taken} on 127.0.0.1 is already in use" in proc.stderr and f"choose another {busy}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "worker.started" in proc.stderr and "worker.stopped" in proc.stderr  # started, then stopped


def test_a_worker_killed_mid_job_releases_the_job_at_once(tmp_path):
    """kill -9 of a worker: the node replaces it and the job it held is taken again now, not after
    its 15-minute lease."""
    from tests.nodes import node_config, running_node

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    config = node_config(tmp_path, checkpoint, workers=1, lease_s=900)
    with running_node(config) as node:
        worker = node._workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        # what the worker had done before it died: claimed a job and said so in its slot
        spool, job_id = _spool_with_one_job(tmp_path)
        job = spool.claim(stage="process", lease_s=900, max_attempts=3)
        assert job.job_id == job_id and job.attempts == 1
        node._slots[0].value = f"{job_id}:1".encode()
        assert node.check_workers() == [0]
        assert node._workers[0].pid != worker.pid and node._workers[0].is_alive()
        wait_until(lambda: spool.get(job_id).state == "done", 90, "the released job to be taken and finished")
    assert spool.get(job_id).attempts == 2
    # a stale slot (the attempt already ended) releases nothing
    assert not spool.release_lease(job_id, attempt=1)


def test_sigterm_stops_the_node_while_it_receives(tmp_path):
    """SIGTERM during a transfer stops the node (the handler used to call Event.set(), which can
    deadlock when the signal lands while the main thread holds that Event's lock)."""
    try:
        storescu = require_binary("storescu", "dcmtk")
    except PeerMissing as exc:
        pytest.skip(str(exc))
    log = tmp_path / "node.log"
    files = tmp_path / "in"
    files.mkdir()
    src = CHEST_DIR / "CR-MONO1-10-chest.dcm"
    for i in range(20):
        ds = pydicom.dcmread(src, force=True)
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(files / f"{i}.dcm")
    for _ in range(5):  # bounded: five stops, each during a transfer
        port = free_port()
        node = start_node(tmp_path / "spool", port, "--workers", "0", log=log)
        sender = subprocess.Popen([storescu, "-aec", "CXRSR", "127.0.0.1", str(port), *map(str, files.iterdir())],
                                  env=peer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        node.send_signal(signal.SIGTERM)
        try:
            assert node.wait(30) == 0, log.read_text()[-3000:]
        finally:
            node.kill()
            sender.kill()
            sender.wait()
