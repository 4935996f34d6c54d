"""The node end to end against real peers: dcmtk storescu/storescp and Orthanc.

The node runs in-process (SCP threads, scheduler, sender) with one spawned worker process that
loads a tiny real checkpoint, exactly as ``serve`` runs it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_voi_lut

from cxr_sr_node import __version__
from cxr_sr_node.derive import ModelInfo, NodeInfo, derive, derived_uid
from cxr_sr_node.eligibility import SERIES_MARKER
from model.checkpoint import read_card
from tests.dicom_helpers import CHEST_DIR, OTHER_DIR, bicubic_upscale, require_data
from tests.nodes import make_tiny_checkpoint, node_config, running_node, wait_for_jobs_done, with_new_uids
from tests.peers import storescu, wait_until

require_data()  # the module lists the shared chest files when it is collected

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("dcmtk")]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def derived_file(storescp, source: pydicom.Dataset, checkpoint: Path) -> Path:
    sop = derived_uid("sop", str(source.SOPInstanceUID), read_card(checkpoint).sha256, __version__)
    (path,) = [p for p in storescp.files() if p.name.endswith(sop)]
    return path


def torch_bicubic(unit: np.ndarray) -> np.ndarray:
    """The network's own skip path: torch bicubic (a = -0.75), clipped."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(unit)[None, None]
    return F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)[0, 0].clamp(0, 1).numpy()


def display(ds: pydicom.Dataset) -> np.ndarray:
    """What a viewer shows: modality LUT + VOI, MONOCHROME1 inverted, scaled to [0, 1]."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.pixels import apply_modality_lut

    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):  # a bare data set (no File Meta)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    arr = (arr - arr.min()) / max(np.ptp(arr), 1e-9)
    return 1.0 - arr if ds.PhotometricInterpretation == "MONOCHROME1" else arr


def test_storescu_to_node_to_storescp(tmp_path, storescp, tiny_checkpoint):
    src = with_new_uids(CHEST_DIR / "test2.dcm", tmp_path / "in.dcm", PatientName="Doe^Jane",
                        PatientBirthDate="19500102", PixelSpacing=[0.143, 0.143])
    cfg = node_config(tmp_path, tiny_checkpoint, dest=f"{storescp.ae}@127.0.0.1:{storescp.port}",
                      allow=("MODALITY@127.0.0.1",))
    with running_node(cfg) as node:
        sent = storescu("127.0.0.1", cfg.port, [src], calling_ae="MODALITY", called_ae="CXRSR")
        assert sent.returncode == 0, sent.stderr
        (job,) = wait_for_jobs_done(node, 1)
        assert job.state == "done", job.reason
        storescp.wait_for_files(1, 30)
    source = pydicom.dcmread(src)
    out = pydicom.dcmread(derived_file(storescp, source, tiny_checkpoint))

    # pixels: 4x, and not a bicubic copy of the input (the tiny model is bicubic + a residual)
    assert (out.Rows, out.Columns) == (4 * source.Rows, 4 * source.Columns)
    for upscale in (bicubic_upscale, torch_bicubic):
        copy = derive(source, upscale, model=ModelInfo(name="b", version="0", sha256="0" * 64),
                      node=NodeInfo(device_uid="1.2.3")).pixel_array.astype(np.float64)
        diff = np.abs(out.pixel_array.astype(np.float64) - copy)
        assert diff.mean() > 1.0, f"output is a {upscale.__name__} copy (mean difference {diff.mean():.2f})"
        assert np.corrcoef(out.pixel_array.ravel()[::97], copy.ravel()[::97])[0, 1] > 0.95

    # provenance (DESIGN §5)
    card = read_card(tiny_checkpoint)
    assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    assert out.StudyInstanceUID == source.StudyInstanceUID
    assert out.SeriesInstanceUID == derived_uid("series", source.SeriesInstanceUID, card.sha256, __version__)
    assert out.PatientID == source.PatientID and out.PatientName == "Doe^Jane"
    assert list(out.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert out.ConversionType == "WSD"
    assert SERIES_MARKER in out.SeriesDescription and "not for primary diagnosis" in out.SeriesDescription
    assert card.sha256[:12] in out.DerivationDescription
    (code,) = out.DerivationCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113085", "DCM")
    (ref,) = out.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert out.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    roles = {item.PurposeOfReferenceCodeSequence[0].CodeValue: item for item in out.ContributingEquipmentSequence}
    assert set(roles) == {"109101", "109102"}
    assert roles["109102"].DeviceUID == cfg.device_uid
    assert any(card.name in str(v) for v in roles["109102"].SoftwareVersions)
    assert [float(v) for v in out.PixelSpacing] == pytest.approx([0.143 / 4, 0.143 / 4])
    assert out.BurnedInAnnotation == "NO"
    assert out.PhotometricInterpretation == "MONOCHROME2" and out.BitsStored == source.BitsStored
    dump = subprocess.run(["dcmdump", "+E", str(derived_file(storescp, source, tiny_checkpoint))],
                          capture_output=True, text=True)
    assert dump.returncode == 0 and "E:" not in dump.stderr and "W:" not in dump.stderr


def test_orthanc_sends_a_study_and_gets_the_derived_series_back(tmp_path, orthanc, tiny_checkpoint):
    """Orthanc is the sender; return_to_sender routes the result back to it (it is a known peer)."""
    src = with_new_uids(CHEST_DIR / "test3.dcm", tmp_path / "in.dcm")
    source = pydicom.dcmread(src)
    cfg = node_config(tmp_path, tiny_checkpoint, return_to_sender=True,
                      peers=(f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",), allow=(orthanc.aet,))
    orthanc.register_modality("CXRSR", aet="CXRSR", port=cfg.port)
    uploaded = orthanc.upload(src)
    with running_node(cfg) as node:
        orthanc.store_to_modality("CXRSR", [uploaded["ParentStudy"]])
        (job,) = wait_for_jobs_done(node, 1)
        assert job.state == "done", job.reason
        assert job.calling_ae == orthanc.aet
    series = wait_until(lambda: (s := orthanc.find_series(source.StudyInstanceUID)) and len(s) == 2 and s,
                        30, "the derived series in Orthanc's study")
    derived = [s for s in series if SERIES_MARKER in s["MainDicomTags"].get("SeriesDescription", "")]
    assert len(derived) == 1 and derived[0]["ParentStudy"] == uploaded["ParentStudy"]
    (instance,) = orthanc.instances_of_series(derived[0]["ID"])
    out = pydicom.dcmread(__import__("io").BytesIO(orthanc.instance_file(instance["ID"])))
    assert (out.Rows, out.Columns) == (4096, 4096)
    assert out.StudyInstanceUID == source.StudyInstanceUID


CHEST_FILES = sorted(p.name for p in CHEST_DIR.iterdir())
EXPECTED_SKIP = {
    "test4.dcm": "body_part", "test5.dcm": "modality", "test6.dcm": "position", "RG3_J2KR.dcm": "body_part",
    "RG3_J2KI.dcm": "body_part", "CR-ModalitySequenceLUT.dcm": "body_part", "6154": "body_part",
    "CT_small.dcm": "modality", "MR_small.dcm": "modality", "MR_small_RLE.dcm": "modality",
    "MR_small_bigendian.dcm": "modality", "MR_small_implicit.dcm": "modality", "JPEG2000.dcm": "modality",
    "JPGExtended.dcm": "modality", "JPEG-LL.dcm": "modality", "emri_small_jpeg_ls_lossless.dcm": "modality",
    "image_dfl.dcm": "modality", "test-SR.dcm": "modality", "genFile.dcm": "modality",
}


def send_as_is(port: int, path: Path) -> int:
    from tests.test_scp import send_as_is as send

    return send(port, path)


def test_every_shared_file_gives_output_or_the_predicted_skip(tmp_path, storescp, tiny_checkpoint):
    """Each file of ../shared/data/dicom, sent on its own: chest files come back derived (the
    MONOCHROME1 ones displaying the right way round), the others are skipped with the reason the
    data README predicts (genFile.dcm, with its private SOP Class and no Modality, included)."""
    cfg = node_config(tmp_path, tiny_checkpoint, dest=f"{storescp.ae}@127.0.0.1:{storescp.port}")
    outcomes = {}
    with running_node(cfg) as node:
        for n, name in enumerate(CHEST_FILES + sorted(EXPECTED_SKIP), start=1):
            path = (CHEST_DIR if name in CHEST_FILES else OTHER_DIR) / name
            assert send_as_is(cfg.port, path) == 0, name
            jobs = wait_for_jobs_done(node, n, deadline_s=600)
            job = max(jobs, key=lambda j: j.updated)
            assert job.state == "done", f"{name}: {job.reason}"
            outcomes[name] = job.result
    for name in CHEST_FILES:
        assert len(outcomes[name]["processed"]) == 1 and not outcomes[name]["skipped"], name
    for name, rule in EXPECTED_SKIP.items():
        assert [s["rule"] for s in outcomes[name]["skipped"]] == [rule], name
        assert not outcomes[name]["processed"], name

    for name in ("RG1_J2KI.dcm", "CR-MONO1-10-chest.dcm"):  # MONOCHROME1 sources
        source = pydicom.dcmread(CHEST_DIR / name, force=True)
        out = pydicom.dcmread(derived_file(storescp, source, tiny_checkpoint))
        assert source.PhotometricInterpretation == "MONOCHROME1" and out.PhotometricInterpretation == "MONOCHROME2"
        assert "WindowCenter" in out or "VOILUTSequence" in out
        shown_src, shown_out = display(source), display(out)
        # lungs dark: the lung fields (left and right of centre) are darker than the mediastinum
        h, w = shown_out.shape
        lungs = np.r_[shown_out[h * 3 // 10:h * 6 // 10, w // 6:w * 2 // 6].ravel(),
                      shown_out[h * 3 // 10:h * 6 // 10, w * 4 // 6:w * 5 // 6].ravel()]
        mediastinum = shown_out[h * 3 // 10:h * 6 // 10, w * 9 // 20:w * 11 // 20]
        assert lungs.mean() < mediastinum.mean(), name
        # and it shows the same picture as the source does in a viewer
        small = shown_out[::4, ::4][: shown_src.shape[0], : shown_src.shape[1]]
        if small.shape == shown_src.shape:
            assert np.corrcoef(small.ravel(), shown_src.ravel())[0, 1] > 0.9, name


def test_our_own_output_sent_back_is_accepted_and_skipped(tmp_path, storescp, tiny_checkpoint):
    src = with_new_uids(CHEST_DIR / "CR-MONO1-10-chest.dcm", tmp_path / "in.dcm")
    cfg = node_config(tmp_path, tiny_checkpoint, dest=f"{storescp.ae}@127.0.0.1:{storescp.port}")
    with running_node(cfg) as node:
        assert storescu("127.0.0.1", cfg.port, [src], calling_ae="MODALITY", called_ae="CXRSR").returncode == 0
        wait_for_jobs_done(node, 1)
        (ours,) = storescp.wait_for_files(1, 30)
        assert storescu("127.0.0.1", cfg.port, [ours], calling_ae="ORTHANC", called_ae="CXRSR").returncode == 0
        jobs = wait_for_jobs_done(node, 2)
    loop = max(jobs, key=lambda j: j.updated)
    assert [s["rule"] for s in loop.result["skipped"]] == ["own_output"]
    assert storescp.receptions() == 1  # nothing was sent back round the loop


def test_logs_carry_uids_but_no_patient_data(tmp_path, storescp, tiny_checkpoint, capfd):
    src = with_new_uids(CHEST_DIR / "CR-MONO1-10-chest.dcm", tmp_path / "in.dcm", PatientName="Zyxwv^Qutsr",
                        PatientID="PID-998877", PatientBirthDate="19420317")
    cfg = node_config(tmp_path, tiny_checkpoint, dest=f"{storescp.ae}@127.0.0.1:{storescp.port}", log_json=True)
    from cxr_sr_node.logs import configure_logging

    configure_logging("debug", json=True)
    with running_node(cfg) as node:
        assert storescu("127.0.0.1", cfg.port, [src], calling_ae="MODALITY", called_ae="CXRSR").returncode == 0
        wait_for_jobs_done(node, 1)
        storescp.wait_for_files(1, 30)
    configure_logging("info")
    captured = capfd.readouterr()
    text = captured.out + captured.err
    source = pydicom.dcmread(src)
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    names = {e.get("event") for e in events}
    assert {"store.received", "job.created", "job.finished", "send.finished", "instance.derived"} <= names
    assert str(source.SOPInstanceUID) in text
    for phi in ("Zyxwv", "Qutsr", "PID-998877", "19420317"):
        assert phi not in text


def test_unreachable_destination_fails_with_reason_then_retry_delivers(tmp_path, tiny_checkpoint):
    from tests.peers import dcmtk_storescp, free_port

    dest_port = free_port()  # nothing listens here yet
    src = with_new_uids(CHEST_DIR / "CR-MONO1-10-chest.dcm", tmp_path / "in.dcm")
    cfg = node_config(tmp_path, tiny_checkpoint, dest=f"LATEPACS@127.0.0.1:{dest_port}", send_retries=2,
                      send_backoff_s=0.1)
    with running_node(cfg) as node:
        assert storescu("127.0.0.1", cfg.port, [src], calling_ae="MODALITY", called_ae="CXRSR").returncode == 0
        (job,) = wait_for_jobs_done(node, 1)
        assert job.state == "failed" and job.send_attempts == 3
        assert "LATEPACS@127.0.0.1" in job.reason and "cannot connect (Connection refused); check that the peer runs and listens on" in job.reason
        # the job table says 'failed' first (it is the truth); the folder move and reason.json follow
        reason_file = wait_until(lambda: (p := cfg.spool / "failed" / job.job_id / "reason.json").is_file() and p,
                                 10, "reason.json beside the failed job")
        reason = json.loads(reason_file.read_text())
        assert reason["reason"] == job.reason
        assert len(list((cfg.spool / "failed" / job.job_id / "out").glob("*.dcm"))) == 1

        with dcmtk_storescp(tmp_path / "late", ae="LATEPACS", port=dest_port, log_dir=tmp_path) as late:
            retry = subprocess.run([__import__("sys").executable, "-m", "cxr_sr_node.cli", "retry", job.job_id,
                                    "--spool", str(cfg.spool)], capture_output=True, text=True)
            assert retry.returncode == 0 and "re-queued as outgoing" in retry.stdout, retry.stderr
            (received,) = late.wait_for_files(1, 60)
            wait_until(lambda: node.spool.get(job.job_id).state == "done", 30, "the retried job to be done")
    assert pydicom.dcmread(received).StudyInstanceUID == pydicom.dcmread(src).StudyInstanceUID
