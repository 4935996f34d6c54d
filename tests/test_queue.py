"""The celery runner (DESIGN §7) against a real RabbitMQ and real dcmtk peers; no mocks.

The node runs in-process with ``runner = "celery"`` (SCP, scheduler, reconciler; no worker, no
sender); workers are ``cxr-sr-node worker`` subprocesses with a tiny real checkpoint on CPU. Every
test gets its own RabbitMQ vhost, so no test sees another's queues or messages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from cxr_sr_node import __version__
from cxr_sr_node.config import ConfigError, NodeConfig, load_config
from cxr_sr_node.derive import derived_uid
from model.checkpoint import read_card
from tests.dicom_helpers import CHEST_DIR
from tests.nodes import make_tiny_checkpoint, node_config, running_node, wait_for_jobs_done, with_new_uids
from tests.peers import PeerMissing, require_binary, storescu, wait_until

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def add_vhost(rabbitmq, vhost: str) -> str:
    for args in (("add_vhost", vhost), ("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")):
        result = rabbitmq.rabbitmqctl(*args)
        assert result.returncode == 0, result.stdout + result.stderr
    return f"amqp://guest:guest@{rabbitmq.host}:{rabbitmq.port}/{vhost}"


@pytest.fixture
def broker_url(rabbitmq) -> str:
    """A fresh vhost on the session's broker: this test's queues and messages only."""
    return add_vhost(rabbitmq, f"test-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def dcmtk(storescp):
    try:
        require_binary("storescu", "dcmtk")
    except PeerMissing as exc:
        pytest.skip(str(exc))
    return storescp


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    log_path: Path

    def events(self, name: str | None = None) -> list[dict]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in events if name is None or e.get("event") == name]

    def wait_for(self, name: str, deadline_s: float, **fields) -> dict:
        def found():
            exited = self.proc.poll() is not None  # read before the log: an exit cannot race the read
            hits = [e for e in self.events(name) if all(e.get(k) == v for k, v in fields.items())]
            if not hits and exited:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            return hits[-1] if hits else None

        try:
            return wait_until(found, deadline_s, f"{name} {fields} in {self.log_path}", interval_s=0.1)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


@contextmanager
def celery_worker(cfg: NodeConfig, log_path: Path, queues: str = "gpu,send") -> Iterator[WorkerProcess]:
    """``cxr-sr-node worker`` with the node's settings, one CPU thread (the machine is shared)."""
    cmd = [sys.executable, "-m", "cxr_sr_node.cli", "worker", "--queues", queues, "--spool", str(cfg.spool),
           "--device", "cpu", "--checkpoint", str(cfg.checkpoint), "--broker-url", cfg.broker_url]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CXRSR_LOG_JSON": "true",
           "CXRSR_DEST": str(cfg.dest or ""), "CXRSR_TILE": str(cfg.tile), "CXRSR_LEASE_S": str(cfg.lease_s),
           "CXRSR_SEND_BACKOFF_S": str(cfg.send_backoff_s), "CXRSR_DEVICE_UID": cfg.device_uid}
    proc = subprocess.Popen(cmd, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    worker = WorkerProcess(proc, log_path)
    try:
        yield worker
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def series_of(src: Path, folder: Path, n: int) -> list[Path]:
    """``n`` copies of ``src`` as one new series (new Study/Series/SOP Instance UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    return [with_new_uids(src, folder / f"{i:02d}.dcm", study=study, series=series, InstanceNumber=i + 1)
            for i in range(n)]


def expected_outputs(files: list[Path], checkpoint: Path) -> set[str]:
    sha = read_card(checkpoint).sha256
    return {derived_uid("sop", str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), sha, __version__)
            for f in files}


def received_uids(storescp) -> list[str]:
    return [p.name.split(".", 1)[1] for p in storescp.files()]


# --- 1. end to end -------------------------------------------------------------------------------

def test_celery_runner_end_to_end(tmp_path, dcmtk, tiny_checkpoint, broker_url):
    """storescu -> node (runner=celery) -> RabbitMQ -> worker (gpu,send) -> storescp."""
    storescp = dcmtk
    src = with_new_uids(CHEST_DIR / "CR-MONO1-10-chest.dcm", tmp_path / "in.dcm")
    cfg = node_config(tmp_path, tiny_checkpoint, dest=f"{storescp.ae}@127.0.0.1:{storescp.port}",
                      runner="celery", broker_url=broker_url)
    with running_node(cfg) as node, celery_worker(cfg, tmp_path / "worker.log") as worker:
        assert node._workers == [] and [t.name for t in node._threads] == ["scheduler"]
        sent = storescu("127.0.0.1", cfg.port, [src], calling_ae="MODALITY", called_ae="CXRSR")
        assert sent.returncode == 0, sent.stderr
        (job,) = wait_for_jobs_done(node, 1, deadline_s=120)
        assert job.state == "done", job.reason
        assert (job.attempts, job.send_attempts) == (1, 1)
        storescp.wait_for_files(1, 30)
        assert worker.wait_for("send.finished", 10, job_id=job.job_id)["sent"] == 1
        assert worker.events("job.finished")[0]["job_id"] == job.job_id
        health_ok, health = node.health()
        assert health_ok and health["runner"] == "celery" and health["broker_ok"] is True
        assert "cxrsr_broker_up 1.0" in node.metrics.render().decode()
    assert received_uids(storescp) == sorted(expected_outputs([src], tiny_checkpoint))
    out = pydicom.dcmread(storescp.files()[0])
    source = pydicom.dcmread(src)
    assert (out.Rows, out.Columns) == (4 * source.Rows, 4 * source.Columns)
    assert out.StudyInstanceUID == source.StudyInstanceUID
    assert (cfg.spool / "done" / job.job_id / "out").is_dir()


# --- 2. at least once: a worker killed mid-job ---------------------------------------------------

def test_gpu_worker_killed_mid_job_the_job_finishes_once(tmp_path, dcmtk, tiny_checkpoint, broker_url):
    """SIGKILL the worker after its first output of a 3-image job: RabbitMQ redelivers the
    unacked message, the next worker takes the job over (attempt 2), keeps the output already
    written, and the destination gets each derived instance once, under its deterministic UID."""
    storescp = dcmtk
    files = series_of(CHEST_DIR / "test2.dcm", tmp_path / "send", 3)  # 1024² each: seconds per image
    cfg = node_config(tmp_path, tiny_checkpoint, dest=f"{storescp.ae}@127.0.0.1:{storescp.port}",
                      runner="celery", broker_url=broker_url)
    with running_node(cfg) as node:
        with celery_worker(cfg, tmp_path / "worker-a.log") as first:
            assert storescu("127.0.0.1", cfg.port, files, calling_ae="MODALITY", called_ae="CXRSR").returncode == 0
            started = first.wait_for("job.started", 120)
            first.wait_for("instance.derived", 60)
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
        job = node.spool.get(started["job_id"])
        assert job.state == "running" and job.attempts == 1, "the kill must land while the job runs"
        kept = {p.name: p.stat().st_ino for p in (cfg.spool / "jobs" / job.job_id / "out").glob("*.dcm")}
        assert 1 <= len(kept) < len(files)

        with celery_worker(cfg, tmp_path / "worker-b.log") as second:
            (job,) = wait_for_jobs_done(node, 1, deadline_s=120)
            assert job.state == "done", job.reason
            resumed = second.wait_for("job.started", 10, job_id=job.job_id)
            assert resumed["attempt"] == 2
            storescp.wait_for_files(len(files), 30)
            second.wait_for("send.finished", 10, job_id=job.job_id)
    assert (job.attempts, job.send_attempts) == (2, 1)
    # outputs written before the kill were kept, not derived again (a rewrite would be a new inode)
    done = {p.name: p.stat().st_ino for p in (cfg.spool / "done" / job.job_id / "out").glob("*.dcm")}
    assert len(done) == len(files) and all(done[name] == ino for name, ino in kept.items())
    uids = received_uids(storescp)
    assert sorted(uids) == sorted(expected_outputs(files, tiny_checkpoint))  # one distinct SOP per source
    assert storescp.receptions() >= len(files)


# --- SIGTERM finishes the current job; the send queue has its own torch-free worker --------------

def test_sigterm_finishes_the_job_and_a_send_worker_delivers_it_without_torch(tmp_path, dcmtk, tiny_checkpoint,
                                                                              broker_url):
    storescp = dcmtk
    files = series_of(CHEST_DIR / "test2.dcm", tmp_path / "send", 2)
    cfg = node_config(tmp_path, tiny_checkpoint, dest=f"{storescp.ae}@127.0.0.1:{storescp.port}",
                      runner="celery", broker_url=broker_url)
    with running_node(cfg) as node:
        with celery_worker(cfg, tmp_path / "gpu.log", queues="gpu") as gpu:
            assert storescu("127.0.0.1", cfg.port, files, calling_ae="MODALITY", called_ae="CXRSR").returncode == 0
            started = gpu.wait_for("job.started", 120)
            gpu.proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown: the job in hand is finished
            assert gpu.proc.wait(120) == 0, gpu.log_tail()
        job = node.spool.get(started["job_id"])
        assert job.state == "outgoing" and job.attempts == 1, job
        assert gpu.events("job.finished")[0]["processed"] == len(files)
        # a send worker started without dest (or with a stale one) sends where the node would: the
        # node writes its routing into the spool (a worker skipped the send and called the job done)
        with celery_worker(dataclasses.replace(cfg, dest=None), tmp_path / "send.log", queues="send") as sender:
            assert sender.wait_for("send.finished", 60, job_id=job.job_id)["peer"] == str(cfg.dest)
            storescp.wait_for_files(len(files), 30)
        assert node.spool.get(job.job_id).state == "done"
    assert sender.proc.returncode == 0
    assert sender.wait_for("worker.stopped", 5)["torch_loaded"] is False
    assert gpu.wait_for("worker.stopped", 5)["torch_loaded"] is True
    assert sorted(received_uids(storescp)) == sorted(expected_outputs(files, tiny_checkpoint))


# --- 3. duplicate delivery -----------------------------------------------------------------------

def test_duplicate_messages_for_a_finished_job_do_nothing(tmp_path, dcmtk, tiny_checkpoint, broker_url):
    from cxr_sr_node.queue import Publisher

    storescp = dcmtk
    src = with_new_uids(CHEST_DIR / "CR-MONO1-10-chest.dcm", tmp_path / "in.dcm")
    cfg = node_config(tmp_path, tiny_checkpoint, dest=f"{storescp.ae}@127.0.0.1:{storescp.port}",
                      runner="celery", broker_url=broker_url)
    with running_node(cfg) as node, celery_worker(cfg, tmp_path / "worker.log") as worker:
        assert storescu("127.0.0.1", cfg.port, [src], calling_ae="MODALITY", called_ae="CXRSR").returncode == 0
        (job,) = wait_for_jobs_done(node, 1, deadline_s=120)
        assert job.state == "done", job.reason
        storescp.wait_for_files(1, 30)
        before = storescp.receptions()

        publisher = Publisher(cfg)  # what a broker redelivery or a reconciler duplicate looks like
        try:
            publisher.publish("process", job.job_id)
            publisher.publish("send", job.job_id)
        finally:
            publisher.close()
        worker.wait_for("task.duplicate", 30, job_id=job.job_id, task="process")
        worker.wait_for("task.duplicate", 30, job_id=job.job_id, task="send")
        after = node.spool.get(job.job_id)
    assert after.state == "done" and (after.attempts, after.send_attempts) == (1, 1)
    assert after.updated == job.updated
    assert storescp.receptions() == before == 1
    assert len(worker.events("job.started")) == 1 and len(worker.events("send.finished")) == 1


# --- the deploy's Orthanc auto-routing, with the real Orthanc ------------------------------------

def test_orthanc_autoroute_script_routes_cr_and_never_our_output(tmp_path, tiny_checkpoint, broker_url):
    """deploy/orthanc/autoroute.lua in a real Orthanc: a stable CR series goes to CXRSR, comes back
    derived through the celery runner, and the derived series is not routed again; a CT is not routed."""
    from tests.dicom_helpers import OTHER_DIR
    from tests.peers import free_port, orthanc_server

    try:
        require_binary("Orthanc", "orthanc")
    except PeerMissing as exc:
        pytest.skip(str(exc))
    port = free_port()
    lua = {"LuaScripts": [str(ROOT / "deploy" / "orthanc" / "autoroute.lua")], "StableAge": 1}
    with orthanc_server(tmp_path / "orthanc", node_port=port, extra_config=lua) as orthanc:
        cfg = node_config(tmp_path, tiny_checkpoint, port=port, runner="celery", broker_url=broker_url,
                          dest=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", allow=(orthanc.aet,))
        with running_node(cfg) as node, celery_worker(cfg, tmp_path / "worker.log"):
            orthanc.upload(with_new_uids(OTHER_DIR / "CT_small.dcm", tmp_path / "ct.dcm"))
            src = with_new_uids(CHEST_DIR / "CR-MONO1-10-chest.dcm", tmp_path / "cr.dcm")
            uploaded = orthanc.upload(src)
            (job,) = wait_for_jobs_done(node, 1, deadline_s=120)
            assert job.state == "done" and job.calling_ae == orthanc.aet, job.reason
            study_uid = str(pydicom.dcmread(src, force=True).StudyInstanceUID)
            series = wait_until(lambda: (found := orthanc.find_series(study_uid)) and len(found) == 2 and found,
                                30, "the derived series in Orthanc's study")
            derived = [x for x in series if "SR x4 (CSAEGAN)" in x["MainDicomTags"].get("SeriesDescription", "")]
            assert len(derived) == 1 and derived[0]["ParentStudy"] == uploaded["ParentStudy"]
            wait_until(lambda: f"not routing series {derived[0]['ID']}" in orthanc.log_path.read_text(errors="replace"),
                       30, "Orthanc's Lua to decline our own output")
            assert [j.job_id for j in node.spool.jobs()] == [job.job_id]  # neither the CT nor the loop


# --- the spool is the truth: what the broker never got or lost is published again -------------

def stage_instance(spool, name: str = "CR-MONO1-10-chest.dcm") -> None:
    """An acknowledged instance in incoming/, as the SCP leaves it."""
    ds = pydicom.dcmread(CHEST_DIR / name, force=True)
    staged = spool.tmp_dir / f"{uuid.uuid4().hex}.dcm"
    staged.write_bytes((CHEST_DIR / name).read_bytes())
    spool.accept_instance(staged, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                          sop_uid=ds.SOPInstanceUID, calling_ae="MODALITY", address="127.0.0.1")


def test_reconciler_publishes_jobs_the_broker_never_got_or_lost(tmp_path, tiny_checkpoint, rabbitmq):
    """No worker runs. The broker refuses the node at first (its vhost does not exist yet): the
    job waits in the spool and the node keeps receiving. Once the broker accepts, the reconciler
    publishes it; when the broker then loses the message (purged), it publishes it again."""
    from cxr_sr_node.queue import GPU_QUEUE, Publisher
    from cxr_sr_node.spool import Spool

    vhost = f"late-{uuid.uuid4().hex[:8]}"
    url = f"amqp://guest:guest@{rabbitmq.host}:{rabbitmq.port}/{vhost}"
    cfg = node_config(tmp_path, tiny_checkpoint, runner="celery", broker_url=url)
    spool = Spool(cfg.spool)
    stage_instance(spool)
    with running_node(cfg) as node:
        node.reconcile_interval_s = 1.0
        (job,) = wait_until(lambda: spool.jobs("ready"), 30, "the job to be created")
        assert node.health()[1]["broker_ok"] is False
        add_vhost(rabbitmq, vhost)  # the broker is back
        probe = Publisher(cfg)
        try:
            wait_until(lambda: probe.declare()[GPU_QUEUE] == 1, 30, "the job's process message")
            assert node.health()[1]["broker_ok"] is True
            with probe.app.connection_for_write() as conn:  # the broker loses it
                assert conn.default_channel.queue_purge(GPU_QUEUE) == 1
            wait_until(lambda: probe.declare()[GPU_QUEUE] == 1, 30, "the message to be published again")
        finally:
            probe.close()
    assert spool.get(job.job_id).state == "ready"


def test_failing_job_is_retried_then_dead_lettered(tmp_path, tiny_checkpoint, broker_url):
    """process_job raises on every attempt: each failure is recorded, re-published after its
    backoff (a Celery countdown), and after max_attempts the job is in failed/ and its message in
    the dead-letter queue. A message for a job no spool knows goes there too."""
    from cxr_sr_node.queue import DEAD_QUEUE, Publisher
    from cxr_sr_node.spool import Spool

    cfg = node_config(tmp_path, tiny_checkpoint, runner="celery", broker_url=broker_url, max_attempts=3)
    spool = Spool(cfg.spool)
    stage_instance(spool)
    with running_node(cfg):
        (job,) = wait_until(lambda: spool.jobs("ready"), 30, "the job to be created")
        (cfg.spool / "jobs" / job.job_id / "out").write_bytes(b"")  # out/ cannot be made: every attempt fails
        probe = Publisher(cfg)
        try:
            probe.publish("process", "20000101T000000-00000000")
            with celery_worker(cfg, tmp_path / "worker.log", queues="gpu") as worker:
                worker.wait_for("task.rejected", 60, job_id="20000101T000000-00000000")
                wait_until(lambda: spool.get(job.job_id).state == "failed", 60, "the job to be dead-lettered")
                wait_until(lambda: probe.declare()[DEAD_QUEUE] == 2, 10, "two messages in the dead-letter queue")
                failures = worker.events("job.failed")
            failed = spool.get(job.job_id)
            assert failed.attempts == 3 and "FileExistsError" in failed.reason
            assert json.loads((cfg.spool / "failed" / job.job_id / "reason.json").read_text())["reason"] == failed.reason
            # `retry` publishes at once in queue mode (before, the node's reconcile pass, up to a minute later)
            retried = subprocess.run(
                [sys.executable, "-m", "cxr_sr_node.cli", "retry", job.job_id, "--spool", str(cfg.spool)],
                capture_output=True, text=True, cwd=ROOT, timeout=60,
                env={**os.environ, "CXRSR_RUNNER": "celery", "CXRSR_BROKER_URL": broker_url})
            assert retried.returncode == 0, retried.stdout + retried.stderr
            assert retried.stdout.strip() == f"{job.job_id}: re-queued as ready (published to the queue)"
            assert probe.declare()["gpu"] == 1
        finally:
            probe.close()
    assert [f["state"] for f in failures] == ["ready", "ready", "failed"]
    assert spool.get(job.job_id).state == "ready"  # re-queued by `retry`


# --- 4. configuration and the spool's claim_job (no broker needed) -------------------------------

@pytest.mark.parametrize(
    ("environ", "flags", "message"),
    [
        ({"CXRSR_RUNNER": "gpu"}, {}, "runner (from environment): expected embedded or celery, got 'gpu'"),
        ({}, {"runner": "Celery"}, "runner (from command line): expected embedded or celery, got 'Celery'"),
        ({}, {"broker_url": "redis://user:secret@cache:6379/0"},
         "broker_url (from command line): expected an amqp:// or amqps:// URL"),
    ],
)
def test_runner_and_broker_url_are_validated(environ, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_config(environ=environ, flags=flags)
    assert "\n" not in str(info.value) and "secret" not in str(info.value)


def test_check_in_queue_mode_reports_the_broker_and_its_queues(tmp_path, broker_url):
    env = {**os.environ, "CXRSR_RUNNER": "celery", "CXRSR_BROKER_URL": broker_url, "CXRSR_MIN_FREE_DISK_MB": "1"}
    from cxr_sr_node.spool import Spool

    Spool(tmp_path / "spool")  # status needs an existing spool
    result = subprocess.run([sys.executable, "-m", "cxr_sr_node.cli", "check", "--no-model", "--no-dest", "--spool",
                             str(tmp_path / "spool")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   broker: amqp://***@127.0.0.1" in result.stdout and "messages waiting gpu 0, send 0, dead 0" in result.stdout
    status = subprocess.run([sys.executable, "-m", "cxr_sr_node.cli", "status", "--spool", str(tmp_path / "spool")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "broker ok: amqp://***@127.0.0.1" in status.stdout and "messages waiting gpu 0" in status.stdout


@pytest.mark.parametrize("change", ["user", "vhost"])
def test_a_worker_the_broker_refuses_exits_with_one_line(tmp_path, broker_url, change):
    """Wrong credentials or vhost are configuration errors: not an endless 'queue.unavailable' loop."""
    url = (broker_url.replace("guest:guest@", "bad:s3cret@") if change == "user"
           else broker_url.rsplit("/", 1)[0] + "/no-such-vhost")
    from cxr_sr_node.spool import Spool

    Spool(tmp_path / "spool")
    result = subprocess.run([sys.executable, "-m", "cxr_sr_node.cli", "worker", "--queues", "send", "--spool",
                             str(tmp_path / "spool"), "--broker-url", url], capture_output=True, text=True,
                            env={**os.environ, "CXRSR_LOG_JSON": "true"}, cwd=ROOT, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: broker amqp://***@127.0.0.1")
    assert "refused this worker" in result.stderr and "s3cret" not in result.stdout + result.stderr


def test_runner_defaults_and_sources(tmp_path):
    assert (load_config(environ={}).runner, load_config(environ={}).broker_url) == (
        "embedded", "amqp://guest:guest@127.0.0.1:5672//")
    toml = tmp_path / "n.toml"
    toml.write_text('runner = "celery"\nbroker_url = "amqp://cxr:pw@rabbitmq:5672/cxr"\n')
    cfg = load_config(toml_path=toml, environ={"CXRSR_BROKER_URL": "amqps://cxr:pw@mq.example:5671/cxr"})
    assert cfg.runner == "celery" and cfg.broker_url == "amqps://cxr:pw@mq.example:5671/cxr"


def test_worker_command_refuses_unknown_queues():
    result = subprocess.run([sys.executable, "-m", "cxr_sr_node.cli", "worker", "--queues", "gpu,cpu"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and "expected gpu, send or gpu,send" in result.stderr


def test_claim_job_takes_one_job_like_claim_takes_the_oldest(tmp_path):
    from cxr_sr_node.spool import Spool

    spool = Spool(tmp_path / "spool")
    ids = []
    for name in ("CR-MONO1-10-chest.dcm", "test1.dcm"):
        ds = pydicom.dcmread(CHEST_DIR / name, force=True)
        staged = spool.tmp_dir / name
        staged.write_bytes((CHEST_DIR / name).read_bytes())
        spool.accept_instance(staged, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                              sop_uid=ds.SOPInstanceUID, calling_ae="MODALITY", address="127.0.0.1")
        (series,) = spool.incoming_series()
        ids.append(spool.create_job(series))
    older, newer = ids
    assert spool.claim_job("no-such-job", stage="process", lease_s=60, max_attempts=3) is None
    job = spool.claim_job(newer, stage="process", lease_s=60, max_attempts=3)  # not the oldest: that one
    assert job.job_id == newer and job.state == "running" and job.attempts == 1
    assert spool.get(older).state == "ready"
    assert spool.claim_job(newer, stage="process", lease_s=60, max_attempts=3) is None  # live lease
    assert spool.claim_job(newer, stage="send", lease_s=60, max_attempts=3) is None  # wrong stage
    taken = spool.claim_job(newer, stage="process", lease_s=60, max_attempts=3, take_over=True)
    assert taken.attempts == 2  # a redelivery: the holder is gone
    spool.finish_processing(newer, {"processed": [{"x": 1}], "skipped": []}, has_output=True)
    assert spool.claim_job(newer, stage="process", lease_s=60, max_attempts=3) is None  # outgoing: not ours
    assert spool.claim_job(newer, stage="send", lease_s=60, max_attempts=4).state == "sending"
    spool.finish_sending(newer, {"peer": "X", "sent": 1})
    for stage in ("process", "send"):  # a duplicate for a finished job
        assert spool.claim_job(newer, stage=stage, lease_s=60, max_attempts=3, take_over=True) is None
    assert spool.get(newer).state == "done"

    # backoff is honoured; an expired lease is taken; past max_attempts the job is dead-lettered
    spool.claim_job(older, stage="process", lease_s=60, max_attempts=2)
    assert spool.fail_attempt(older, stage="process", reason="boom", max_attempts=2, backoff_s=30) == "ready"
    assert spool.claim_job(older, stage="process", lease_s=60, max_attempts=2) is None  # backing off
    spool._set(older, not_before=0)
    assert spool.claim_job(older, stage="process", lease_s=0.05, max_attempts=2).attempts == 2
    wait_until(lambda: spool.get(older).lease_until < time.time(), 5, "the lease to expire")
    assert spool.claim_job(older, stage="process", lease_s=60, max_attempts=2) is None
    failed = spool.get(older)
    assert failed.state == "failed" and failed.reason == "boom"
    assert (spool.root / "failed" / older / "reason.json").is_file()


def test_send_worker_side_never_imports_torch(tmp_path):
    """What a ``--queues send`` worker imports (the app, the tasks, node.send_job) stays torch-free."""
    script = f"""
import sys
from pathlib import Path
from cxr_sr_node.config import load_config
from cxr_sr_node.queue import make_app, run_worker
from cxr_sr_node.node import send_job
cfg = load_config(environ={{}}, flags={{"spool": Path({str(tmp_path)!r}) / "spool", "runner": "celery"}})
app = make_app(cfg)
assert sorted(app.tasks.keys() & {{"cxr_sr_node.process", "cxr_sr_node.send"}}) == ["cxr_sr_node.process", "cxr_sr_node.send"]
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH" if loaded else "NO-TORCH")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NO-TORCH" in result.stdout

