"""The SCP against real dcmtk SCUs: echo, store to disk, allow-list, bad input, statuses."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from cxr_sr_node import statuses
from cxr_sr_node.config import load_config
from cxr_sr_node.scp import SeriesTracker, StorageSCP
from cxr_sr_node.spool import Spool
from tests.peers import echoscu, free_port, storescu, wait_until

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"


pytestmark = pytest.mark.usefixtures("dcmtk")

@contextmanager
def running_scp(tmp_path: Path, **settings) -> Iterator[StorageSCP]:
    cfg = load_config(environ={}, flags={"port": free_port(), "bind_address": "127.0.0.1",
                                         "spool": tmp_path / "spool", "min_free_disk_mb": 1, **settings})
    scp = StorageSCP(cfg, Spool(cfg.spool), SeriesTracker())
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


@contextmanager
def json_log() -> Iterator[io.StringIO]:
    """The node's log as JSON lines in a string for the block (then back to the console)."""
    from cxr_sr_node.logs import configure_logging

    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream)
    try:
        yield stream
    finally:
        configure_logging("info")
        logging.getLogger().handlers[0].flush()


def store_over_one_association(port: int, datasets: list, calling_ae: str = "MODALITY") -> list[int]:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(datasets[0].SOPClassUID, [datasets[0].file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRSR")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def incoming_files(scp: StorageSCP) -> list[Path]:
    return sorted((scp.spool.root / "incoming").rglob("*.dcm"))


def test_echo(tmp_path):
    with running_scp(tmp_path) as scp:
        result = echoscu("127.0.0.1", scp.port, calling_ae="ECHOSCU", called_ae="CXRSR")
    assert result.returncode == 0, result.stderr


def test_store_writes_identical_dataset_before_answering(tmp_path):
    src = DATA / "chest" / "test1.dcm"
    with running_scp(tmp_path) as scp:
        result = storescu("127.0.0.1", scp.port, [src], calling_ae="MODALITY", called_ae="CXRSR")
        assert result.returncode == 0, result.stderr
        (stored,) = incoming_files(scp)  # present as soon as storescu has its answer
    a, b = pydicom.dcmread(src), pydicom.dcmread(stored)
    assert b.SOPInstanceUID == a.SOPInstanceUID and b.PixelData == a.PixelData
    assert b.PatientID == a.PatientID
    assert json.loads((stored.parent / "source.json").read_text())["calling_ae"] == "MODALITY"
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def send_as_is(port: int, path: Path, calling_ae: str = "MODALITY") -> int:
    """C-STORE a file in its own transfer syntax (so compressed data stays compressed)."""
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):  # a bare data set: implicit VR LE
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ts = ds.file_meta.TransferSyntaxUID
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRSR")
    if not assoc.is_established:
        return -1  # no presentation context accepted
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(status.Status)


def test_every_shared_file_is_received_in_its_own_transfer_syntax(tmp_path):
    """Every real file, compressed or not, chest or not, is stored with 0x0000 (what to process
    is decided later, by the worker), including the headerless CR and genFile.dcm with its private
    SOP Class; with accept_any_sop_class off, the private class is refused at negotiation."""
    files = sorted((DATA / "chest").iterdir()) + sorted((DATA / "other").iterdir())
    with running_scp(tmp_path) as scp:
        results = {f.name: send_as_is(scp.port, f) for f in files}
        stored = incoming_files(scp)
    assert results == {f.name: statuses.SUCCESS for f in files}
    # several sample files reuse one SOP Instance UID (test1-6, the MR_small variants): a re-sent
    # instance replaces the earlier copy, as DICOM expects
    unique = {(str(d.StudyInstanceUID), str(d.SeriesInstanceUID), str(d.SOPInstanceUID))
              for d in (pydicom.dcmread(f, force=True, stop_before_pixels=True) for f in files)}
    assert len(stored) == len(unique)
    src = pydicom.dcmread(DATA / "chest" / "RG1_J2KI.dcm")
    (rx,) = [p for p in stored if p.stem == src.SOPInstanceUID]
    rx = pydicom.dcmread(rx)
    assert rx.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID  # JPEG 2000 kept as sent
    assert rx.PixelData == src.PixelData

    with running_scp(tmp_path / "strict", accept_any_sop_class=False) as scp:
        assert send_as_is(scp.port, DATA / "other" / "genFile.dcm") == -1  # no context accepted
        assert send_as_is(scp.port, DATA / "chest" / "test1.dcm") == statuses.SUCCESS


def test_unknown_calling_ae_is_rejected(tmp_path):
    with running_scp(tmp_path, allow=("MODALITY@127.0.0.1",)) as scp:
        bad = storescu("127.0.0.1", scp.port, [DATA / "chest" / "test1.dcm"], calling_ae="STRANGER", called_ae="CXRSR")
        good = storescu("127.0.0.1", scp.port, [DATA / "chest" / "test1.dcm"], calling_ae="MODALITY", called_ae="CXRSR")
        stored = incoming_files(scp)
    assert bad.returncode != 0
    assert "rejected" in (bad.stdout + bad.stderr).lower() and "calling ae" in (bad.stdout + bad.stderr).lower()
    assert good.returncode == 0, good.stderr
    assert len(stored) == 1


def test_wrong_called_ae_is_rejected_with_an_audit_line(tmp_path):
    import io
    import logging

    from cxr_sr_node.logs import configure_logging

    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream)
    try:
        with running_scp(tmp_path) as scp:
            result = echoscu("127.0.0.1", scp.port, calling_ae="ECHOSCU", called_ae="NOTCXRSR")
    finally:
        configure_logging("info")
        logging.getLogger().handlers[0].flush()
    assert result.returncode != 0
    assert "called ae title not recognized" in (result.stdout + result.stderr).lower()
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines() if "association.rejected" in x]
    assert line["calling_ae"] == "ECHOSCU" and line["called_ae"] == "NOTCXRSR"
    assert "'NOTCXRSR' is not this node's 'CXRSR' (ae_title)" in line["reason"]


def test_non_conformant_sop_uids_never_share_a_file(tmp_path):
    """'1.2.3.a' and '1.2.3.b' used to become the same file name: the second, acknowledged too,
    overwrote the first."""
    template = pydicom.dcmread(DATA / "chest" / "test2.dcm")
    with running_scp(tmp_path) as scp:
        ae = AE(ae_title="SLOPPY")
        ae.add_requested_context(template.SOPClassUID, [template.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="CXRSR")
        assert assoc.is_established
        results = []
        for suffix in ("a", "b"):
            ds = pydicom.dcmread(DATA / "chest" / "test2.dcm")
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.55.{suffix}"
            results.append(int(assoc.send_c_store(ds).Status))
        assoc.release()
        stored = incoming_files(scp)
    assert results == [statuses.SUCCESS, statuses.SUCCESS]
    assert len(stored) == 2
    assert sorted(str(pydicom.dcmread(f).SOPInstanceUID)[-1] for f in stored) == ["a", "b"]


def _raw_store(port: int, payload: bytes, sop_class: str, sop_uid: str) -> int:
    """Send bytes as the data set of a C-STORE (a malformed data set, as a broken SCU would)."""
    from pynetdicom import _config

    path = Path(f"/tmp/raw-{sop_uid}.dcm")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    from pydicom.filewriter import write_file_meta_info

    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        f.write(payload)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRSR")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
        return int(status.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        path.unlink()


def test_malformed_dataset_gets_failure_status_is_quarantined_and_scp_keeps_serving(tmp_path):
    sop_class = DigitalXRayImageStorageForPresentation
    # a sequence of undefined length whose "item" is not an Item tag: not parseable
    truncated = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\x12\x34\x56\x78\x10\x00\x00\x00abcd"
    with running_scp(tmp_path) as scp:
        status = _raw_store(scp.port, truncated, sop_class, generate_uid())
        quarantined = sorted((scp.spool.root / "quarantine").glob("*.dcm"))
        # still serving:
        ok = storescu("127.0.0.1", scp.port, [DATA / "chest" / "test2.dcm"], calling_ae="MODALITY", called_ae="CXRSR")
        stored = incoming_files(scp)
    assert status == statuses.CANNOT_UNDERSTAND
    assert len(quarantined) == 1
    reason = json.loads(quarantined[0].with_suffix(".reason.json").read_text())
    assert "cannot be parsed" in reason["reason"] and reason["calling_ae"] == "MODALITY"
    assert ok.returncode == 0 and len(stored) == 1


def test_dataset_without_uids_is_refused_and_quarantined(tmp_path):
    ds = pydicom.Dataset()
    ds.PatientID = "X"
    ds.Modality = "DX"
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)  # no Study/Series/SOP Instance UIDs
    with running_scp(tmp_path) as scp:
        status = _raw_store(scp.port, buf.getvalue(), DigitalXRayImageStorageForPresentation, generate_uid())
        quarantined = sorted((scp.spool.root / "quarantine").glob("*.dcm"))
    assert status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert len(quarantined) == 1
    assert "lacks StudyInstanceUID" in quarantined[0].with_suffix(".reason.json").read_text()


def test_pixel_data_shorter_than_its_header_needs_is_refused_and_quarantined(tmp_path):
    """Half the pixel bytes of a 1024 x 1024 image: refused as malformed before it is acknowledged
    (it would otherwise be stored with 0x0000 and later skipped as undecodable)."""
    ds = pydicom.dcmread(DATA / "chest" / "test1.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    cut = tmp_path / "cut.dcm"
    ds.save_as(cut, enforce_file_format=True)
    with running_scp(tmp_path) as scp:
        status = send_as_is(scp.port, cut)
        fine = send_as_is(scp.port, DATA / "chest" / "test2.dcm")
        quarantined = sorted((scp.spool.root / "quarantine").glob("*.dcm"))
        stored = incoming_files(scp)
    assert status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert fine == statuses.SUCCESS and len(stored) == 1
    assert len(quarantined) == 1
    reason = json.loads(quarantined[0].with_suffix(".reason.json").read_text())["reason"]
    assert "Pixel Data is 524288 bytes" in reason and "need 1048576" in reason


def test_each_association_ends_with_one_audit_line_of_what_it_did(tmp_path):
    """DESIGN §8: who, from where, what, outcome; the store lines carry the association's id, and
    no line carries the patient's name."""


    good = pydicom.dcmread(DATA / "chest" / "test2.dcm")
    good.PatientName = "Auditova^Jana"
    cut = pydicom.dcmread(DATA / "chest" / "test1.dcm")
    cut.SOPInstanceUID = generate_uid()
    cut.PixelData = cut.PixelData[:1000]
    with json_log() as stream, running_scp(tmp_path) as scp:
        results = store_over_one_association(scp.port, [good, cut], calling_ae="AUDITED")
        wait_until(lambda: "association.released" in stream.getvalue(), 10, "the association's end line")
    assert results == [statuses.SUCCESS, statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (end,) = [e for e in lines if e["event"] == "association.released"]
    assert end["calling_ae"] == "AUDITED" and end["address"] == "127.0.0.1"
    assert (end["stored"], end["refused"], end["echoes"]) == (1, 1, 0)
    assert end["statuses"] == {"0x0000": 1, "0xA900": 1}
    assert end["sop_classes"] == [str(good.SOPClassUID)]
    stores = [e for e in lines if e["event"].startswith("store.")]
    assert len(stores) == 2 and {e["assoc_id"] for e in stores} == {end["assoc_id"]}
    assert not any("Auditova" in json.dumps(e) for e in lines)


def test_reject_ineligible_refuses_with_named_status(tmp_path):
    with running_scp(tmp_path, reject_ineligible=True) as scp:
        ct = send_as_is(scp.port, DATA / "other" / "test5.dcm")
        knee = send_as_is(scp.port, DATA / "other" / "RG3_J2KR.dcm")
        chest = send_as_is(scp.port, DATA / "chest" / "test1.dcm")
        stored = incoming_files(scp)
    assert ct == knee == statuses.INELIGIBLE_REFUSED
    assert chest == statuses.SUCCESS and len(stored) == 1


def test_free_disk_floor_rejects_the_association_before_any_data(tmp_path):
    """Below the floor the node takes nothing: a transient rejection (the sender retries later),
    not an instance written in full and then refused."""
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    with running_scp(tmp_path, min_free_disk_mb=free_mb + 10_000_000) as scp:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="CXRSR")
        sent = storescu("127.0.0.1", scp.port, [DATA / "chest" / "test1.dcm"], calling_ae="MODALITY", called_ae="CXRSR")
        stored = incoming_files(scp)
        leftovers = list(scp.spool.tmp_dir.iterdir())
    assert assoc.is_rejected and (assoc.acceptor.primitive.result, assoc.acceptor.primitive.result_source,
                                  assoc.acceptor.primitive.diagnostic) == (0x02, 0x03, 0x01)
    assert sent.returncode != 0 and "Association Rejected" in sent.stderr
    assert stored == [] and leftovers == []


def test_free_disk_floor_refuses_an_instance_when_the_disk_fills_during_an_association(tmp_path):
    """The per-instance check stays for a disk that fills while an association is open."""
    with running_scp(tmp_path) as scp:
        ae = AE(ae_title="MODALITY")
        ds = pydicom.dcmread(DATA / "chest" / "test1.dcm")
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="CXRSR")
        assert assoc.is_established
        free_mb = shutil.disk_usage(tmp_path).free // 2**20
        scp.config = dataclasses.replace(scp.config, min_free_disk_mb=free_mb + 10_000_000)
        status = int(assoc.send_c_store(ds).Status)
        assoc.release()
        stored = incoming_files(scp)
    assert status == statuses.OUT_OF_RESOURCES and stored == []


def test_a_transfer_cut_off_mid_instance_leaves_no_partial_file(tmp_path):
    """storescu killed while sending a large instance: nothing was acknowledged, and the chunk
    file pynetdicom was writing in spool/tmp is removed when the association ends."""
    import signal
    import subprocess

    import numpy as np

    from tests.peers import PeerMissing, peer_env, require_binary

    try:
        storescu = require_binary("storescu", "dcmtk")  # by path: an activated venv has pynetdicom's first
    except PeerMissing as exc:
        pytest.skip(str(exc))

    big = tmp_path / "big.dcm"
    ds = pydicom.dcmread(DATA / "chest" / "test1.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.set_pixel_data(np.zeros((4000, 4000), np.uint16), "MONOCHROME2", 12)  # 32 MB
    ds.save_as(big, enforce_file_format=True)
    with running_scp(tmp_path, max_pdu=4096) as scp:  # small PDUs: the transfer takes a while
        tmp_dir = scp.spool.tmp_dir
        sender = subprocess.Popen([storescu, "-aet", "MODALITY", "-aec", "CXRSR", "127.0.0.1", str(scp.port),
                                   str(big)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=peer_env())
        try:
            wait_until(lambda: any(f.stat().st_size > 2**20 for f in tmp_dir.glob("*.dcm")) or sender.poll() is not None,
                       60, "a partly received instance in spool/tmp")
            assert sender.poll() is None, "the transfer finished before it could be cut off; make it larger"
        finally:
            sender.send_signal(signal.SIGKILL)
            sender.wait(10)
        wait_until(lambda: not any(tmp_dir.iterdir()), 30, "spool/tmp to be empty")
        assert incoming_files(scp) == []
        # and the node still serves
        assert send_as_is(scp.port, DATA / "chest" / "test1.dcm") == statuses.SUCCESS


def test_sweep_tmp_removes_only_files_idle_past_the_limit(tmp_path):
    import os

    spool = Spool(tmp_path / "spool")
    old, fresh = spool.tmp_dir / "old.dcm", spool.tmp_dir / "fresh.dcm"
    old.write_bytes(b"x" * 10)
    fresh.write_bytes(b"y" * 10)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert spool.sweep_tmp(3600) == 1
    assert sorted(p.name for p in spool.tmp_dir.iterdir()) == ["fresh.dcm"]


def test_series_tracker_completes_after_release_and_idle():
    tracker = SeriesTracker()
    key = ("1.2", "1.2.3")
    tracker.arrived(key, assoc_id=1)
    assert not tracker.is_complete(key, idle_s=0.0, max_wait_s=60, fallback_age_s=0)  # association open
    tracker.association_ended(1)
    assert not tracker.is_complete(key, idle_s=0.5, max_wait_s=60, fallback_age_s=0)  # not idle yet
    wait_until(lambda: tracker.is_complete(key, idle_s=0.2, max_wait_s=60, fallback_age_s=0), 5, "idle series")
    tracker.arrived(("1.2", "9"), assoc_id=2)
    time.sleep(0.05)
    assert tracker.is_complete(("1.2", "9"), idle_s=100, max_wait_s=0.01, fallback_age_s=0)  # max wait
    assert tracker.is_complete(("1.2", "unknown"), idle_s=5, max_wait_s=60, fallback_age_s=6)  # after restart


def test_python_warnings_are_json_log_lines():
    """Celery run as root warns on stderr in several lines of text; in a JSON log it is one line."""
    import io
    import logging
    import warnings

    from cxr_sr_node.logs import configure_logging

    stream = io.StringIO()
    try:
        with warnings.catch_warnings():  # pytest records each test's warnings: hand them to logging here
            warnings.simplefilter("always")
            logging.captureWarnings(False)
            configure_logging("info", json=True, stream=stream)
            warnings.warn("You're running the worker with superuser privileges", UserWarning, stacklevel=1)
    finally:
        configure_logging("info")
        logging.getLogger().handlers[0].flush()
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert line["logger"] == "py.warnings" and line["level"] == "warning" and "superuser" in line["event"]


def test_peers_that_stall_mid_pdu_give_their_association_slots_back(tmp_path):
    """Accepted sockets had no read deadline: peers that sent half an A-ASSOCIATE-RQ (or half a
    P-DATA PDU) held their slots of max_associations until they disconnected."""
    import socket

    with running_scp(tmp_path, max_associations=2, network_timeout_s=2.0, acse_timeout_s=2.0) as scp:
        stalled = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(2)]
        try:
            for sock in stalled:  # an A-ASSOCIATE-RQ header announcing 200 bytes, then only 14 of them
                sock.sendall(bytes([0x01, 0x00]) + (200).to_bytes(4, "big") + b"\x00\x01\x00\x00CXRSR     ")
            time.sleep(4.0)  # past the read deadline
            result = echoscu("127.0.0.1", scp.port, calling_ae="ECHOSCU", called_ae="CXRSR")
        finally:
            for sock in stalled:
                sock.close()
    assert result.returncode == 0, result.stdout + result.stderr


def _send_file(port: int, path: Path) -> int:
    """C-STORE a Part 10 file's bytes as they are, the command's UIDs taken from its file meta
    (pynetdicom's chunked send), as a misbehaving or hostile peer may."""
    from pynetdicom import _config as pynetdicom_config

    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRSR")
    assert assoc.is_established
    previous, pynetdicom_config.STORE_SEND_CHUNKED_DATASET = pynetdicom_config.STORE_SEND_CHUNKED_DATASET, True
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()


def test_a_dataset_that_does_not_match_its_command_is_refused_not_overwritten(tmp_path):
    """Two commands (instances X and Y) carrying one dataset UID S were both acknowledged and the
    second overwrote the first in the spool: acknowledged data lost."""
    src = pydicom.dcmread(DATA / "chest" / "test2.dcm")
    sent = []
    for i, label in enumerate(("FIRST", "SECOND")):
        ds = copy.deepcopy(src)
        ds.ImageComments = label
        ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{i}"  # the command's UID
        path = tmp_path / f"{label}.dcm"
        ds.save_as(path, enforce_file_format=False)
        sent.append(path)
    with running_scp(tmp_path) as scp:
        results = [_send_file(scp.port, p) for p in sent]
        stored = incoming_files(scp)
        quarantined = sorted((scp.spool.root / "quarantine").glob("*.reason.json"))
    assert results == [statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS] * 2 and stored == []
    assert len(quarantined) == 2 and "is not the command's AffectedSOPInstanceUID" in quarantined[0].read_text()


def test_pixel_data_declared_longer_than_the_file_is_refused(tmp_path):
    src = pydicom.dcmread(DATA / "chest" / "test2.dcm")
    raw = bytearray((DATA / "chest" / "test2.dcm").read_bytes())
    assert src.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    length_at = raw.rindex(b"\xe0\x7f\x10\x00") + 4  # implicit VR: tag, then a 4-byte length
    raw[length_at:length_at + 4] = (0x7FFFFFF0).to_bytes(4, "little")  # 2 GiB declared, 1 MiB present
    bad = tmp_path / "long.dcm"
    bad.write_bytes(bytes(raw))
    with running_scp(tmp_path) as scp:
        status = _send_file(scp.port, bad)
        stored = incoming_files(scp)
    assert status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS and stored == []


def test_a_deflate_bomb_is_refused_before_it_is_inflated(tmp_path):
    """400 KiB of deflate that inflates to 800 MB grew the receiving process by that much."""
    import zlib

    src = pydicom.dcmread(DATA / "chest" / "test2.dcm")
    src.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    path = tmp_path / "bomb.dcm"
    src.save_as(path, enforce_file_format=True)
    meta_end = 132 + 12 + int.from_bytes(path.read_bytes()[140:144], "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflater.compress(bytes(40 * 2**20)) + deflater.flush()  # 40 MiB of zeros in ~40 KiB
    path.write_bytes(path.read_bytes()[:meta_end] + bomb)
    with running_scp(tmp_path, max_instance_mb=8) as scp:
        status = _send_file(scp.port, path)
        stored = incoming_files(scp)
    assert status == statuses.OUT_OF_RESOURCES and stored == []


def test_a_huge_uid_does_not_make_huge_log_lines(tmp_path):


    ds = pydicom.dcmread(DATA / "chest" / "test2.dcm")
    ds.StudyInstanceUID = "1." * 100_000 + "1"  # 200 KB; pydicom warns that it is not a valid UI
    with json_log() as stream, running_scp(tmp_path) as scp:
        assert store_over_one_association(scp.port, [ds]) == [statuses.SUCCESS]
    lines = stream.getvalue().splitlines()
    assert lines and max(len(line) for line in lines) < 5000
    assert sum("is not a valid" in line or "Invalid value for VR UI" in line for line in lines) <= 1


def test_a_pdu_longer_than_the_node_accepts_closes_the_connection_unread(tmp_path):
    """pynetdicom buffered a whole announced PDU (up to 4 GiB) whatever the advertised maximum."""
    import socket

    with running_scp(tmp_path) as scp:
        with socket.create_connection(("127.0.0.1", scp.port)) as sock:
            sock.sendall(bytes([0x01, 0x00]) + (200 * 2**20).to_bytes(4, "big") + bytes(4096))
            sock.settimeout(10)
            started = time.monotonic()
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
            waited = time.monotonic() - started
        echo = echoscu("127.0.0.1", scp.port, calling_ae="ECHOSCU", called_ae="CXRSR")
    assert closed and waited < 5  # not after the 60 s read deadline: at once
    assert echo.returncode == 0


def test_an_association_over_max_associations_is_rejected_with_a_log_line(tmp_path):
    with json_log() as stream, running_scp(tmp_path, max_associations=1) as scp:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = ae.associate("127.0.0.1", scp.port, ae_title="CXRSR")
        assert held.is_established
        try:
            refused = echoscu("127.0.0.1", scp.port, calling_ae="SECOND", called_ae="CXRSR")
        finally:
            held.release()
        after = echoscu("127.0.0.1", scp.port, calling_ae="SECOND", called_ae="CXRSR")
    assert refused.returncode != 0 and after.returncode == 0, after.stdout + after.stderr
    lines = [json.loads(x) for x in stream.getvalue().splitlines() if "association.rejected" in x]
    assert [(e["calling_ae"], e["reason"]) for e in lines] == [("SECOND", "max_associations=1 already open; retry later")]


def test_a_peer_trickling_a_pdu_is_cut_off(tmp_path):
    """One byte per second kept every read inside the read deadline: the association was held as
    long as the peer liked. A PDU now has to arrive within network_timeout_s (plus its length at
    64 KiB/s)."""
    import socket

    with running_scp(tmp_path, network_timeout_s=2.0, acse_timeout_s=2.0) as scp:
        with socket.create_connection(("127.0.0.1", scp.port)) as sock:
            sock.sendall(bytes([0x01, 0x00]) + (200).to_bytes(4, "big"))
            started, closed = time.monotonic(), False
            while not closed and time.monotonic() - started < 12:
                time.sleep(1.0)
                try:
                    sock.sendall(b"\x00")
                    sock.settimeout(0.01)
                    closed = sock.recv(1) == b""
                except TimeoutError:
                    pass
                except OSError:  # reset / broken pipe: the node closed it
                    closed = True
            held_s = time.monotonic() - started
    assert closed and held_s < 6, held_s


def test_an_instance_over_max_instance_mb_ends_the_association_while_it_arrives(tmp_path):
    big = pydicom.dcmread(DATA / "chest" / "test2.dcm")
    big.Rows = big.Columns = 2048
    big.BitsAllocated, big.BitsStored, big.HighBit = 16, 16, 15
    big.PixelData = bytes(2048 * 2048 * 2)  # 8 MiB
    with json_log() as stream, running_scp(tmp_path, max_instance_mb=1, max_pdu=16384) as scp:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(big.SOPClassUID, [big.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="CXRSR")
        assert assoc.is_established
        status = assoc.send_c_store(big)
        assoc.release()
        wait_until(lambda: not list(scp.spool.tmp_dir.iterdir()), 10, "the partial file to be deleted")
        stored = incoming_files(scp)
    assert "Status" not in status and stored == []  # no status: the association ended mid-instance
    assert "store.too_large" in stream.getvalue()
