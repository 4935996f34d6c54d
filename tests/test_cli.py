"""The operator commands: check, status, serve's config errors, /healthz and /metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.nodes import make_tiny_checkpoint, node_config, running_node
from tests.peers import free_port

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "cxr_sr_node.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "CXRSR_MIN_FREE_DISK_MB": "1", **(env or {})}, timeout=300)


def test_check_passes_with_model_and_reachable_dest(tmp_path, storescp):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    result = cli("check", "--spool", str(tmp_path / "spool"), "--checkpoint", str(ckpt), "--device", "cpu",
                 "--dest", f"{storescp.ae}@127.0.0.1:{storescp.port}")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["ok", "ok", "ok", "ok"]
    assert any(line.startswith("ok   model: test-tiny") for line in lines)
    assert any("C-ECHO to" in line and "0x0000" in line for line in lines)


def test_check_fails_on_unreachable_dest_and_bad_spool(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = cli("check", "--no-model", "--spool", str(blocker / "spool"), "--dest", f"PACS@127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "FAIL spool:" in result.stdout and "not writable" in result.stdout
    assert "FAIL dest: C-ECHO to PACS@127.0.0.1" in result.stdout and "cannot connect (Connection refused)" in result.stdout


def test_the_start_up_check_passes_while_the_pacs_is_down(tmp_path):
    """systemd's ExecStartPre runs `check --no-model --no-dest`: the node must start and receive
    while its destination is unreachable (sending is retried); `--device cuda:N` parses."""
    dest = f"PACS@127.0.0.1:{free_port()}"
    result = cli("check", "--no-model", "--no-dest", "--spool", str(tmp_path / "spool"), "--dest", dest,
                 "--device", "cuda:1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dest" not in {line.split()[1].rstrip(":") for line in result.stdout.splitlines()}
    unit = (ROOT / "deploy" / "systemd" / "cxr-sr-node.service").read_text()
    assert "check --no-model --no-dest" in unit


def test_check_fails_on_a_broken_checkpoint(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    result = cli("check", "--spool", str(tmp_path / "spool"), "--checkpoint", str(ckpt))
    assert result.returncode == 1
    assert "FAIL model:" in result.stdout and "sha256" in result.stdout


def test_bad_config_value_is_one_line_naming_the_key(tmp_path):
    result = cli("serve", "--spool", str(tmp_path / "s"), env={"CXRSR_SERIES_IDLE_S": "soon"})
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: series_idle_s (from environment): expected float, got 'soon'"


def test_status_counts_json(tmp_path):
    from cxr_sr_node.spool import Spool

    Spool(tmp_path / "spool")  # as a node's first start leaves it
    result = cli("status", "--spool", str(tmp_path / "spool"), "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["counts"]["ready"] == 0 and data["failed"] == [] and data["node_pid"] is None
    done = cli("retry", "--all-failed", "--spool", str(tmp_path / "spool"))
    assert done.returncode == 0 and "no failed jobs to re-queue" in done.stdout  # nothing to do is no error


def test_status_says_a_running_job_of_a_stopped_node_is_not_running(tmp_path):
    from tests.test_durability import _spool_with_one_job

    spool, _ = _spool_with_one_job(tmp_path)
    spool.claim(stage="process", lease_s=900, max_attempts=3)  # then the node died
    text = cli("status", "--spool", str(spool.root)).stdout
    assert "no node running on it" in text
    assert "running          1  (left by a node that stopped; taken again at its next start)" in text


def test_status_and_retry_do_not_create_a_mistyped_spool(tmp_path):
    for args in (["status"], ["retry", "--all-failed"]):
        result = cli(*args, "--spool", str(tmp_path / "spoool"))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"no spool at {tmp_path / 'spoool'} (no jobs.sqlite there)" in result.stderr
    assert not (tmp_path / "spoool").exists()


def test_healthz_and_metrics(tmp_path, storescp):
    from tests.dicom_helpers import CHEST_DIR
    from tests.peers import storescu

    ckpt = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    http = free_port()
    cfg = node_config(tmp_path, ckpt, http_port=http, dest=f"{storescp.ae}@127.0.0.1:{storescp.port}")
    with running_node(cfg):
        assert storescu("127.0.0.1", cfg.port, [CHEST_DIR / "CR-MONO1-10-chest.dcm"], calling_ae="M",
                        called_ae="CXRSR").returncode == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=10) as resp:
            health = json.loads(resp.read())
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        head = urllib.request.Request(f"http://127.0.0.1:{http}/healthz", method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as resp:  # probes that ask with HEAD (curl -I)
            assert resp.status == 200 and resp.read() == b"" and int(resp.headers["Content-Length"]) > 0
        status = json.loads(cli("status", "--spool", str(cfg.spool), "--json").stdout)
    assert status["node_pid"] == os.getpid()  # the node runs in this process
    assert json.loads(cli("status", "--spool", str(cfg.spool), "--json").stdout)["node_pid"] is None  # stopped
    assert health["ok"] is True and health["workers_alive"] == 1
    assert 'cxrsr_store_total{status="0x0000"} 1.0' in metrics
    assert 'cxrsr_jobs{state="done"}' in metrics


def test_serve_names_a_spool_it_cannot_create(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = cli("serve", "--spool", str(blocker / "spool"), "--port", str(free_port()), "--workers", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"spool {blocker / 'spool'} cannot be created or opened" in result.stderr
    assert "choose another spool" in result.stderr


def test_check_does_not_create_a_missing_spool(tmp_path):
    """A mistyped or unmounted spool must not pass as a healthy, freshly created one."""
    typo = tmp_path / "typo" / "spool"
    result = cli("check", "--no-model", "--no-dest", "--spool", str(typo))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok   spool: {typo} does not exist yet: serve creates it" in result.stdout
    assert not (tmp_path / "typo").exists()


def test_check_in_queue_mode_fails_when_the_broker_is_down(tmp_path):
    url = f"amqp://guest:s3cret@127.0.0.1:{free_port()}//"
    result = cli("check", "--no-model", "--no-dest", "--spool", str(tmp_path / "spool"),
                 env={"CXRSR_RUNNER": "celery", "CXRSR_BROKER_URL": url})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL broker: amqp://***@127.0.0.1" in result.stdout and "start RabbitMQ" in result.stdout
    assert "s3cret" not in result.stdout + result.stderr


def test_healthz_is_503_while_the_disk_floor_refuses_every_association(tmp_path):
    """/healthz said ok while the node refused every association for lack of disk."""
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    http = free_port()
    cfg = node_config(tmp_path, ckpt, http_port=http, workers=0, min_free_disk_mb=2**40)
    with running_node(cfg):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=10)
            raise AssertionError("expected HTTP 503")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
            health = json.loads(exc.read())
    assert health["ok"] is False and health["disk_ok"] is False and health["free_disk_mb"] < 2**40
