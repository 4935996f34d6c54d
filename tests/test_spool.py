"""The spool's folder + SQLite state machine, without the network."""

import json
import shutil
import time
from pathlib import Path

import pydicom
import pytest

from cxr_sr_node.spool import Spool

CHEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom" / "chest"


def receive(spool: Spool, tmp_path: Path, src: Path = CHEST / "test1.dcm", calling_ae: str = "MODALITY") -> Path:
    """Simulate a received file: a copy in tmp/, accepted into incoming/."""
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    staged = spool.tmp_dir / f"rx-{time.monotonic_ns()}.dcm"
    shutil.copyfile(src, staged)
    return spool.accept_instance(staged, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                                 sop_uid=ds.SOPInstanceUID, calling_ae=calling_ae, address="127.0.0.1")


def make_job(spool: Spool, tmp_path: Path) -> str:
    receive(spool, tmp_path)
    (series,) = spool.incoming_series()
    return spool.create_job(series)


def test_accept_moves_file_into_incoming_with_source(tmp_path):
    spool = Spool(tmp_path / "spool")
    dest = receive(spool, tmp_path)
    ds = pydicom.dcmread(CHEST / "test1.dcm", stop_before_pixels=True)
    assert dest == spool.series_dir(ds.StudyInstanceUID, ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    assert dest.read_bytes() == (CHEST / "test1.dcm").read_bytes()
    assert json.loads((dest.parent / "source.json").read_text()) == {"calling_ae": "MODALITY", "address": "127.0.0.1"}
    assert list(spool.tmp_dir.iterdir()) == []


def test_job_lifecycle_process_send_done(tmp_path):
    spool = Spool(tmp_path / "spool")
    job_id = make_job(spool, tmp_path)
    assert spool.incoming_series() == []
    job = spool.get(job_id)
    assert job.state == "ready" and job.calling_ae == "MODALITY"
    assert job.series_uid == str(pydicom.dcmread(CHEST / "test1.dcm").SeriesInstanceUID)
    assert (spool.root / "jobs" / job_id / "in").is_dir()

    claimed = spool.claim(stage="process", lease_s=60, max_attempts=3)
    assert claimed.job_id == job_id and claimed.state == "running" and claimed.attempts == 1
    assert spool.claim(stage="process", lease_s=60, max_attempts=3) is None  # leased
    spool.finish_processing(job_id, {"processed": [{"x": 1}], "skipped": []}, has_output=True)
    assert spool.get(job_id).state == "outgoing"

    sending = spool.claim(stage="send", lease_s=60, max_attempts=4)
    assert sending.state == "sending" and sending.send_attempts == 1
    spool.finish_sending(job_id, {"peer": "X", "sent": 1})
    assert spool.get(job_id).state == "done"
    assert (spool.root / "done" / job_id / "in").is_dir()
    assert json.loads((spool.root / "done" / job_id / "result.json").read_text())["send"]["sent"] == 1


def test_nothing_to_send_goes_straight_to_done(tmp_path):
    spool = Spool(tmp_path / "spool")
    job_id = make_job(spool, tmp_path)
    spool.claim(stage="process", lease_s=60, max_attempts=3)
    spool.finish_processing(job_id, {"processed": [], "skipped": [{"rule": "modality"}]}, has_output=False)
    assert spool.get(job_id).state == "done"
    assert spool.claim(stage="send", lease_s=60, max_attempts=3) is None


def test_expired_lease_is_taken_again_then_dead_lettered(tmp_path):
    spool = Spool(tmp_path / "spool")
    job_id = make_job(spool, tmp_path)
    for attempt in (1, 2):
        job = spool.claim(stage="process", lease_s=0.0, max_attempts=2)  # worker "dies" at once
        assert job.job_id == job_id and job.attempts == attempt
        time.sleep(0.01)
    assert spool.claim(stage="process", lease_s=0.0, max_attempts=2) is None
    job = spool.get(job_id)
    assert job.state == "failed" and "2 attempts" in job.reason
    reason = json.loads((spool.root / "failed" / job_id / "reason.json").read_text())
    assert reason["job_id"] == job_id and "worker lost" in reason["reason"]


def test_a_lost_sender_s_job_is_dead_lettered_after_its_last_attempt(tmp_path):
    spool = Spool(tmp_path / "spool")
    job_id = make_job(spool, tmp_path)
    spool.claim(stage="process", lease_s=60, max_attempts=3)
    spool.finish_processing(job_id, {"processed": [{"x": 1}], "skipped": []}, has_output=True)
    for attempt in (1, 2):
        job = spool.claim(stage="send", lease_s=0.0, max_attempts=2)  # the sender "dies" at once
        assert job.job_id == job_id and job.send_attempts == attempt
        time.sleep(0.01)
    assert spool.claim(stage="send", lease_s=0.0, max_attempts=2) is None
    job = spool.get(job_id)
    assert job.state == "failed" and "sending did not finish in 2 attempts" in job.reason
    assert (spool.root / "failed" / job_id / "reason.json").is_file()


def test_an_unreadable_output_file_fails_the_send_attempt_by_name(tmp_path):
    """Not a SendError: before, it escaped send_job and left the job 'sending' under its lease."""
    from cxr_sr_node.config import load_config
    from cxr_sr_node.node import send_job

    spool = Spool(tmp_path / "spool")
    job_id = make_job(spool, tmp_path)
    spool.claim(stage="process", lease_s=60, max_attempts=3)
    out = spool.root / "jobs" / job_id / "out"
    out.mkdir()
    (out / "broken.dcm").write_bytes(b"not DICOM at all")
    spool.finish_processing(job_id, {"processed": [{"x": 1}], "skipped": []}, has_output=True)
    cfg = load_config(environ={}, flags={"spool": spool.root, "dest": "PACS@127.0.0.1:9", "send_retries": 1,
                                         "send_backoff_s": 0.0})
    outcomes = []
    for _ in range(2):
        job = spool.claim(stage="send", lease_s=60, max_attempts=2)
        outcomes.append(send_job(spool, cfg, job))
    assert outcomes == ["retry", "failed"]
    reason = json.loads((spool.root / "failed" / job_id / "reason.json").read_text())["reason"]
    assert "PACS@127.0.0.1:9" in reason and "InvalidDicomError" in reason


def test_a_worker_without_dest_sends_where_the_node_routes(tmp_path):
    """The node's routing in the spool wins over a queue worker's own (missing or stale) dest."""
    from cxr_sr_node.config import load_config
    from cxr_sr_node.node import routed, routing_of, send_job

    spool = Spool(tmp_path / "spool")
    node_cfg = load_config(environ={}, flags={"spool": spool.root, "dest": "PACS@127.0.0.1:9", "ae_title": "NODE1",
                                              "send_retries": 0, "send_backoff_s": 0.0})
    worker_cfg = load_config(environ={}, flags={"spool": spool.root, "send_retries": 0, "send_backoff_s": 0.0})
    assert routed(spool, worker_cfg) is worker_cfg  # no node has started on this spool yet
    spool.write_routing(routing_of(node_cfg))
    assert (routed(spool, worker_cfg).dest, routed(spool, worker_cfg).ae_title) == (node_cfg.dest, "NODE1")
    job_id = make_job(spool, tmp_path)
    spool.claim(stage="process", lease_s=60, max_attempts=3)
    (spool.root / "jobs" / job_id / "out").mkdir()
    shutil.copy(CHEST / "test1.dcm", spool.root / "jobs" / job_id / "out" / "x.dcm")
    spool.finish_processing(job_id, {"processed": [{"x": 1}], "skipped": []}, has_output=True)
    job = spool.claim(stage="send", lease_s=60, max_attempts=1)
    assert send_job(spool, worker_cfg, job) == "failed"  # not "skipped": it tried the node's PACS (nothing there)
    reason = json.loads((spool.root / "failed" / job_id / "reason.json").read_text())["reason"]
    assert "PACS@127.0.0.1:9" in reason


def test_send_failures_back_off_then_fail_and_retry_requeues(tmp_path):
    spool = Spool(tmp_path / "spool")
    job_id = make_job(spool, tmp_path)
    spool.claim(stage="process", lease_s=60, max_attempts=3)
    (spool.root / "jobs" / job_id / "out").mkdir()
    spool.finish_processing(job_id, {"processed": [{"x": 1}], "skipped": []}, has_output=True)

    spool.claim(stage="send", lease_s=60, max_attempts=2)
    state = spool.fail_attempt(job_id, stage="send", reason="PACS: association rejected", max_attempts=2, backoff_s=30)
    assert state == "outgoing"
    assert spool.get(job_id).not_before > time.time() + 20  # backing off
    assert spool.claim(stage="send", lease_s=60, max_attempts=2) is None

    with spool._tx() as db:  # let the backoff pass
        db.execute("UPDATE jobs SET not_before = 0")
    spool.claim(stage="send", lease_s=60, max_attempts=2)
    assert spool.fail_attempt(job_id, stage="send", reason="PACS: 0xA700", max_attempts=2, backoff_s=30) == "failed"
    assert (spool.root / "failed" / job_id / "reason.json").is_file()
    assert spool.get(job_id).reason == "PACS: 0xA700"

    assert spool.retry(job_id) == "outgoing"  # output exists: only sending is repeated
    job = spool.get(job_id)
    assert job.send_attempts == 0 and (spool.root / "jobs" / job_id / "out").is_dir()
    assert not (spool.root / "jobs" / job_id / "reason.json").exists()  # not carried into done/ after a success
    with pytest.raises(ValueError, match="not failed"):
        spool.retry(job_id)


def test_recover_registers_orphan_folders_and_finishes_moves(tmp_path):
    spool = Spool(tmp_path / "spool")
    done_id = make_job(spool, tmp_path)
    spool.claim(stage="process", lease_s=60, max_attempts=3)
    spool.finish_processing(done_id, {"processed": [], "skipped": []}, has_output=False)
    # crash between the row update and the folder move:
    (spool.root / "done" / done_id).rename(spool.root / "jobs" / done_id)
    # crash between moving a series into a job folder and inserting its row:
    receive(spool, tmp_path, CHEST / "test2.dcm")
    (series,) = spool.incoming_series()
    orphan = spool.root / "jobs" / "orphan-job"
    orphan.mkdir()
    series.path.rename(orphan / "in")
    (spool.tmp_dir / "partial.dcm").write_bytes(b"half a file")

    fixed = Spool(spool.root).recover()
    assert fixed == {"registered": 1, "moved": 1, "tmp_removed": 1}
    assert (spool.root / "done" / done_id).is_dir()
    assert spool.get("orphan-job").state == "ready"
    assert spool.get("orphan-job").series_uid == str(pydicom.dcmread(CHEST / "test2.dcm").SeriesInstanceUID)


def test_counts(tmp_path):
    spool = Spool(tmp_path / "spool")
    make_job(spool, tmp_path)
    receive(spool, tmp_path, CHEST / "test2.dcm")
    counts = spool.counts()
    assert counts["ready"] == 1 and counts["incoming_series"] == 1 and counts["failed"] == 0


def test_outcome_of_a_taken_over_job_is_not_recorded(tmp_path):
    """A worker whose lease expired and was taken over cannot overwrite the new holder's state."""
    from cxr_sr_node.spool import LeaseLost

    spool = Spool(tmp_path / "spool")
    job_id = make_job(spool, tmp_path)
    first = spool.claim(stage="process", lease_s=0.0, max_attempts=3)
    time.sleep(0.01)
    second = spool.claim(stage="process", lease_s=60, max_attempts=3)  # took it over
    assert (first.attempts, second.attempts) == (1, 2)
    with pytest.raises(LeaseLost, match="another worker took it over"):
        spool.finish_processing(job_id, {"processed": [], "skipped": []}, has_output=False, attempt=first.attempts)
    with pytest.raises(LeaseLost):
        spool.fail_attempt(job_id, stage="process", reason="x", max_attempts=3, backoff_s=0, attempt=first.attempts)
    assert spool.get(job_id).state == "running"
    spool.finish_processing(job_id, {"processed": [{"x": 1}], "skipped": []}, has_output=True, attempt=second.attempts)
    assert spool.get(job_id).state == "outgoing"


def test_a_series_longer_than_the_lease_keeps_it_and_a_taken_over_job_stops(tmp_path):
    """The lease is renewed before each instance: a long series is not taken over (and run twice)
    while it is being worked on; a worker whose job was taken over stops at its next instance."""
    from cxr_sr_node.config import load_config
    from cxr_sr_node.derive import ModelInfo, NodeInfo
    from cxr_sr_node.spool import LeaseLost
    from cxr_sr_node.worker import Engine, run_claimed
    from tests.dicom_helpers import bicubic_upscale
    from tests.nodes import with_new_uids

    spool = Spool(tmp_path / "spool")
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for i in range(3):
        receive(spool, tmp_path, with_new_uids(CHEST / "CR-MONO1-10-chest.dcm", tmp_path / f"{i}.dcm",
                                               study=study, series=series))
    (incoming,) = spool.incoming_series()
    job_id = spool.create_job(incoming)
    lease_s = 3.0  # each instance takes ~1.8 s (1.4 s here + deriving), the series ~5.5 s
    cfg = load_config(environ={}, flags={"spool": spool.root, "lease_s": lease_s, "max_attempts": 3})
    rivals = []

    def slow(unit):  # the series outlasts the lease; a rival worker tries to take the job meanwhile
        time.sleep(1.4)
        rivals.append(spool.claim(stage="process", lease_s=lease_s, max_attempts=3))
        return bicubic_upscale(unit)

    engine = Engine(upscale=slow, model=ModelInfo(name="t", version="1", sha256="0" * 64),
                    node=NodeInfo(device_uid="1.2.3"), max_output_px=8192, require_body_part=False)
    job = spool.claim(stage="process", lease_s=lease_s, max_attempts=3)
    state, result = run_claimed(job, spool, engine, cfg)
    assert state == "processed" and len(result["processed"]) == 3
    assert rivals == [None, None, None]  # never taken over while its lease was renewed
    assert spool.get(job_id).attempts == 1

    # a worker that stalls past its lease loses the job to a rival, and learns it at its next renewal
    other = make_job(spool, tmp_path)
    held = spool.claim(stage="process", lease_s=0.05, max_attempts=3)
    assert held.job_id == other
    time.sleep(0.1)
    rival = spool.claim(stage="process", lease_s=60, max_attempts=3)
    assert (rival.job_id, rival.attempts) == (other, 2)
    with pytest.raises(LeaseLost):
        spool.renew_lease(other, stage="process", attempt=held.attempts, lease_s=60)


def test_backoff_doubles_but_never_waits_more_than_five_minutes(tmp_path):
    from cxr_sr_node.spool import MAX_BACKOFF_S

    spool = Spool(tmp_path / "spool")
    job_id = make_job(spool, tmp_path)
    for attempt in range(1, 5):
        with spool._tx() as db:
            db.execute("UPDATE jobs SET not_before = 0")
        spool.claim(stage="process", lease_s=60, max_attempts=9)
        spool.fail_attempt(job_id, stage="process", reason="x", max_attempts=9, backoff_s=100, attempt=attempt)
        wait = spool.get(job_id).not_before - time.time()
        assert min(100 * 2 ** (attempt - 1), MAX_BACKOFF_S) - 5 < wait <= min(100 * 2 ** (attempt - 1), MAX_BACKOFF_S)
    assert MAX_BACKOFF_S == 300


def _engine(upscale=None):
    from cxr_sr_node.derive import ModelInfo, NodeInfo
    from cxr_sr_node.worker import Engine
    from tests.dicom_helpers import bicubic_upscale

    return Engine(upscale=upscale or bicubic_upscale, model=ModelInfo(name="t", version="1", sha256="0" * 64),
                  node=NodeInfo(device_uid="1.2.3"), max_output_px=8192, require_body_part=False)


def test_a_full_disk_makes_the_job_wait_without_using_its_attempts(tmp_path):
    """Derived images are ~32x an 8-bit source: below min_free_disk_mb the worker stops before it
    writes (it filled the disk, then spent every attempt and dead-lettered the series)."""
    from cxr_sr_node.config import load_config
    from cxr_sr_node.worker import DISK_WAIT_S, run_claimed

    spool = Spool(tmp_path / "spool")
    job_id = make_job(spool, tmp_path)
    full = load_config(environ={}, flags={"spool": spool.root, "max_attempts": 1, "min_free_disk_mb": 2**40})
    for _ in range(3):  # more often than max_attempts allows failures
        with spool._tx() as db:
            db.execute("UPDATE jobs SET not_before = 0")
        job = spool.claim(stage="process", lease_s=60, max_attempts=1)
        state, result = run_claimed(job, spool, _engine(), full)
        after = spool.get(job_id)
        assert (state, result, after.state, after.attempts) == ("ready", None, "ready", 0)
        assert "below min_free_disk_mb=1099511627776: free space; the job waits" in after.reason
        assert DISK_WAIT_S - 5 < after.not_before - time.time() <= DISK_WAIT_S
        assert not list((spool.root / "jobs" / job_id / "out").glob("*.dcm"))  # nothing written

    roomy = load_config(environ={}, flags={"spool": spool.root, "max_attempts": 1, "min_free_disk_mb": 0})
    with spool._tx() as db:
        db.execute("UPDATE jobs SET not_before = 0")
    state, result = run_claimed(spool.claim(stage="process", lease_s=60, max_attempts=1), spool, _engine(), roomy)
    assert state == "processed" and len(result["processed"]) == 1  # space again: it goes on by itself


def test_outputs_of_an_earlier_model_are_not_sent_with_the_new_ones(tmp_path):
    """A node killed mid-series, restarted with another model (or version): the first run's outputs
    (other UIDs) were left in out/ and sent as a second derived series."""
    from cxr_sr_node.config import load_config
    from cxr_sr_node.worker import run_claimed

    spool = Spool(tmp_path / "spool")
    job_id = make_job(spool, tmp_path)
    out = spool.root / "jobs" / job_id / "out"
    out.mkdir()
    stale = out / "2.25.1234.dcm"  # what a crashed attempt with another model left
    shutil.copyfile(CHEST / "test1.dcm", stale)
    cfg = load_config(environ={}, flags={"spool": spool.root})
    state, result = run_claimed(spool.claim(stage="process", lease_s=60, max_attempts=3), spool, _engine(), cfg)
    assert state == "processed"
    assert sorted(p.name for p in out.glob("*.dcm")) == [result["processed"][0]["file"]]
