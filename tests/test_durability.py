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


def test_kill_9_during_receive_loses_no_acknowledged_instance(tmp_path, storescp):
    try:
        require_binary("storescu", "dcmtk")
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
    sender = subprocess.Popen(["storescu", "-v", "-aet", "MODALITY", "-aec", "CXRSR", "127.0.0.1", str(port),
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
    from cxr_sr_node.spool import Spool

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    spool = Spool(tmp_path / "spool")
    src = CHEST_DIR / "CR-MONO1-10-chest.dcm"
    ds = pydicom.dcmread(src, force=True)
    staged = spool.tmp_dir / "x.dcm"
    staged.write_bytes(src.read_bytes())
    spool.accept_instance(staged, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                          sop_uid=ds.SOPInstanceUID, calling_ae="MODALITY", address="127.0.0.1")
    (series,) = spool.incoming_series()
    job_id = spool.create_job(series)
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
