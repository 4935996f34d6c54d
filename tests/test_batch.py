"""``cxr-sr-node batch`` over the shared DICOM folder: summary, layout, resumability, exit code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from cxr_sr_node.batch import run_batch
from cxr_sr_node.config import load_config
from tests.dicom_helpers import DICOM_DIR
from tests.nodes import make_tiny_checkpoint

pytestmark = pytest.mark.timeout(900)

# test1.dcm and the Covid file carry the same Study/Series/SOP UIDs: the second one maps to the
# output the first one wrote in the same run, so it is reported as a duplicate (not read; on a
# later run both count as "already done": deterministic UIDs).
EXPECTED_SKIPPED = {"body_part": 5, "modality": 13, "position": 1}  # genFile.dcm has no Modality


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def summary(stdout: str) -> dict[str, int]:
    """The printed summary table as {row: count}."""
    rows = {}
    for line in stdout.splitlines():
        name, _, count = line.rpartition(" ")
        if count.isdigit():
            rows[name.strip()] = int(count)
    return rows


def test_batch_over_shared_dicom_then_resume(tmp_path, checkpoint):
    cfg = load_config(environ={}, flags={"checkpoint": checkpoint, "device": "cpu", "tile": 256})
    out = tmp_path / "out"
    first = run_batch(DICOM_DIR, out, cfg, recursive=True, progress=False)
    assert first.processed == 5 and first.already_done == 0 and len(first.duplicates) == 1
    assert dict(first.skipped) == EXPECTED_SKIPPED
    assert first.failed == []
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 5
    for path in files:
        ds = pydicom.dcmread(path)
        study_dir, series_dir = path.parent.parent.name, path.parent.name
        assert (study_dir, series_dir, path.stem) == (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]

    again = run_batch(DICOM_DIR, out, cfg, recursive=True, progress=False)  # resumable: nothing redone
    assert again.processed == 0 and again.already_done == 6
    assert sorted(out.rglob("*.dcm")) == files


def test_batch_cli_prints_summary_and_exit_code(tmp_path, checkpoint):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(DICOM_DIR / "chest" / "CR-MONO1-10-chest.dcm", src / "sub" / "a.dcm")
    shutil.copy(DICOM_DIR / "other" / "CT_small.dcm", src / "b.dcm")
    (src / "notes.txt").write_text("not DICOM")
    env = {**os.environ, "CXRSR_CHECKPOINT": str(checkpoint), "CXRSR_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "cxr_sr_node.cli", "batch", str(src), str(tmp_path / "out"), "--no-progress"]
    flat = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert flat.returncode == 0, flat.stderr
    assert summary(flat.stdout) == {"processed": 0, "already done": 0, "skipped: modality": 1,
                                    "skipped: not_dicom": 1, "failed": 0}
    deep = subprocess.run([*cmd, "--recursive"], capture_output=True, text=True, env=env)
    assert deep.returncode == 0, deep.stderr
    assert summary(deep.stdout)["processed"] == 1 and len(list((tmp_path / "out").rglob("*.dcm"))) == 1

    # genFile.dcm relabelled as a chest CR: eligible by header, but its pixels do not decode
    broken = pydicom.dcmread(DICOM_DIR / "other" / "genFile.dcm", force=True)
    broken.Modality, broken.BodyPartExamined = "CR", "CHEST"
    broken.SamplesPerPixel, broken.PhotometricInterpretation = 1, "MONOCHROME2"
    broken.save_as(src / "broken.dcm")
    failed = subprocess.run([*cmd, "--recursive"], capture_output=True, text=True, env=env)
    assert failed.returncode == 1
    assert summary(failed.stdout)["failed"] == 1 and summary(failed.stdout)["already done"] == 1
    assert "broken.dcm" in failed.stderr and "cannot be decoded" in failed.stderr

    # a chest CR without StudyInstanceUID (nowhere to file it) fails by name; the rest still runs
    no_study = pydicom.dcmread(DICOM_DIR / "chest" / "CR-MONO1-10-chest.dcm", force=True)
    del no_study.StudyInstanceUID
    no_study.SOPInstanceUID = pydicom.uid.generate_uid()
    no_study.save_as(src / "no_study.dcm")
    shutil.copy(DICOM_DIR / "chest" / "CR-MONO1-10-chest.dcm", src / "again.dcm")
    missing = subprocess.run([*cmd, "--recursive"], capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    rows = summary(missing.stdout)
    assert rows["failed"] == 2 and rows["already done"] == 2  # broken + no_study; a.dcm and its copy
    assert "no_study.dcm" in missing.stderr and "has no StudyInstanceUID" in missing.stderr
    # file names (exports are often named after the patient) are in the printed summary, never in a log line
    log_lines = [json.loads(line) for line in missing.stderr.splitlines() if line.startswith("{")]
    failures = [line for line in log_lines if line["event"] == "instance.failed"]
    assert len(failures) == 2 and all(isinstance(line["input"], int) for line in failures)
    assert {line["sop_instance_uid"] for line in failures} == {str(broken.SOPInstanceUID), str(no_study.SOPInstanceUID)}
    assert not [line for line in log_lines for name in ("broken.dcm", "no_study.dcm", "again.dcm") if name in json.dumps(line)]


def _chest_series(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = pydicom.dcmread(DICOM_DIR / "chest" / "CR-MONO1-10-chest.dcm", force=True)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        paths.append(folder / f"{i:03d}.dcm")
        ds.save_as(paths[-1])
    return paths


def test_batch_refuses_an_output_folder_it_cannot_write_before_running_the_model(tmp_path, checkpoint):
    src = tmp_path / "in"
    _chest_series(src, 1)
    (tmp_path / "afile").write_text("x")
    env = {**os.environ, "CXRSR_CHECKPOINT": str(checkpoint), "CXRSR_DEVICE": "cpu"}
    result = subprocess.run([sys.executable, "-m", "cxr_sr_node.cli", "batch", str(src), str(tmp_path / "afile" / "out"),
                             "--no-progress"], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"Error: OUT_DIR {tmp_path / 'afile' / 'out'} cannot be created or written")
    assert "processed" not in result.stdout  # refused before the first file


def test_batch_with_a_bad_checkpoint_or_no_cuda_is_one_line(tmp_path):
    src = tmp_path / "in"
    _chest_series(src, 1)
    bad = tmp_path / "bad.safetensors"
    bad.write_text("junk")
    for flags in (["--checkpoint", str(bad)], ["--device", "cuda:7"]):
        result = subprocess.run([sys.executable, "-m", "cxr_sr_node.cli", "batch", str(src), str(tmp_path / "out"),
                                 "--no-progress", *flags], capture_output=True, text=True)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("Error: cannot load the model: ") and len(result.stderr.splitlines()) == 1


def test_a_damaged_copy_sharing_a_sop_uid_is_reported_not_counted_done(tmp_path, checkpoint):
    """Order-independent: before, the damaged copy after the good one counted as 'already done'."""
    src = tmp_path / "in"
    (good,) = _chest_series(src / "a", 1)
    (src / "z").mkdir()
    (src / "z" / "damaged.dcm").write_bytes(good.read_bytes()[:100_000])
    cfg = load_config(environ={}, flags={"checkpoint": checkpoint, "device": "cpu", "tile": 256})
    result = run_batch(src, tmp_path / "out", cfg, recursive=True, progress=False)
    assert (result.processed, result.already_done, result.failed) == (1, 0, [])
    assert result.duplicates == [(str(src / "z" / "damaged.dcm"), str(good))]


def test_batch_without_recursive_says_which_folders_it_left_out(tmp_path, checkpoint):
    src = tmp_path / "in"
    _chest_series(src / "sub", 1)
    env = {**os.environ, "CXRSR_CHECKPOINT": str(checkpoint), "CXRSR_DEVICE": "cpu"}
    result = subprocess.run([sys.executable, "-m", "cxr_sr_node.cli", "batch", str(src), str(tmp_path / "out"),
                             "--no-progress"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and summary(result.stdout)["processed"] == 0
    assert "1 sub-folder(s) of IN_DIR not searched (--recursive" in result.stderr


def test_ctrl_c_prints_what_was_done_and_exits_130(tmp_path, checkpoint):
    src = tmp_path / "in"
    _chest_series(src, 40)
    out = tmp_path / "out"
    env = {**os.environ, "CXRSR_CHECKPOINT": str(checkpoint), "CXRSR_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cxr_sr_node.cli", "batch", str(src), str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(out.rglob("*.dcm")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    done = summary(stdout)["processed"]
    assert 1 <= done < 40 and len(list(out.rglob("*.dcm"))) == done  # each written file counted, none partial
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_batch_requires_existing_input(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cxr_sr_node.cli", "batch", str(tmp_path / "nope"), str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "does not exist" in result.stderr
