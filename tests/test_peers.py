"""Smoke tests of the real-peer fixtures: each talks to a real dcmtk, Orthanc or RabbitMQ process."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt

from tests.peers import (
    TCP_NODELAY_HANDLERS,
    PeerMissing,
    PeerStartError,
    dcmtk_storescp,
    echoscu,
    free_port,
    pynetdicom_storescp,
    require_binary,
    storescu,
    wait_for_port,
    wait_until,
)

CHEST = Path("/work/shared/data/dicom/chest")
TEST1 = CHEST / "test1.dcm"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def test1() -> pydicom.Dataset:
    if not TEST1.exists():
        pytest.skip(f"sample file {TEST1} is missing")
    return pydicom.dcmread(TEST1)


def test_wait_until_names_what_it_waited_for():
    with pytest.raises(TimeoutError, match="the moon"):
        wait_until(lambda: False, 0.05, "the moon")
    assert wait_until(lambda: 42, 1, "an answer") == 42


def test_free_port_and_wait_for_port():
    port = free_port()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        wait_for_port("127.0.0.1", port, 0.2)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        wait_for_port("127.0.0.1", port, 1)


def test_missing_binary_names_the_package():
    with pytest.raises(PeerMissing, match="apt-get install -y dcmtk orthanc rabbitmq-server"):
        require_binary("no-such-peer-binary", "no-such-package")


def test_dcmtk_is_found_behind_pynetdicom_apps_of_the_same_name(tmp_path, monkeypatch):
    """An activated virtual environment puts pynetdicom's Python storescu (other arguments) first on
    PATH; the peers and `cxr-sr-node bench` must still run dcmtk's (the pipeline bench once failed
    with "storescp: error: argument port: invalid int value")."""
    from cxr_sr_node.bench import _binary

    try:
        real = require_binary("storescu", "dcmtk")
    except PeerMissing as exc:
        pytest.skip(str(exc))
    app = tmp_path / "venv-bin" / "storescu"
    app.parent.mkdir()
    app.write_text("#!/usr/bin/env python3\nraise SystemExit(2)\n")
    app.chmod(0o755)
    monkeypatch.setenv("PATH", f"{app.parent}:{tmp_path / 'empty'}:{Path(real).parent}")
    assert shutil.which("storescu") == str(app)
    assert require_binary("storescu", "dcmtk") == real == _binary("storescu")
    version = subprocess.run([real, "--version"], capture_output=True, text=True, timeout=10, check=False)
    assert "dcmtk" in version.stdout.lower()


def test_start_failure_quotes_the_peer_log(tmp_path):
    if not shutil.which("storescp"):
        pytest.skip("storescp not found: apt-get install -y dcmtk orthanc rabbitmq-server")
    with socket.socket() as squatter:  # someone else listens on the port we ask for
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(
            PeerStartError, match=r"(?s)storescp exited.*storescp-\d+\.log.*Address already in use"
        ):
            with dcmtk_storescp(tmp_path / "out", port=port, log_dir=tmp_path):
                pass


def test_echoscu_against_storescp(storescp):
    result = echoscu(
        storescp.host, storescp.port, calling_ae="ECHOSCU", called_ae=storescp.ae, extra_args=["-d"]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # dcmtk read TCP_NODELAY=1 from the environment we gave it
    assert "disabling Nagle algorithm" in result.stdout + result.stderr


def test_pynetdicom_store_to_storescp_keeps_pixels(storescp, test1):
    nodelay_seen = []

    def record_nodelay(event):
        sock = event.assoc.dul.socket.socket
        nodelay_seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(test1.SOPClassUID, test1.file_meta.TransferSyntaxUID)
    handlers = [*TCP_NODELAY_HANDLERS, (evt.EVT_CONN_OPEN, record_nodelay)]
    assoc = ae.associate(storescp.host, storescp.port, ae_title=storescp.ae, evt_handlers=handlers)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(test1)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    assert nodelay_seen == [1]

    (received,) = storescp.wait_for_files(1, deadline_s=10)
    assert received.name.endswith(test1.SOPInstanceUID)
    got = pydicom.dcmread(received)
    assert got.SOPInstanceUID == test1.SOPInstanceUID
    assert got.PixelData == test1.PixelData


def test_storescu_sends_several_files(storescp):
    files = [CHEST / "test1.dcm", CHEST / "test2.dcm"]
    result = storescu(storescp.host, storescp.port, files, calling_ae="STORESCU", called_ae=storescp.ae)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(storescp.wait_for_files(2, deadline_s=10)) == 2


def test_orthanc_upload_and_read_back(orthanc, test1):
    assert orthanc.studies() == []  # reset by the fixture
    assert set(orthanc.get("/plugins")) <= {"explorer.js"}  # built-in entry only: no plugin loaded
    answer = orthanc.upload(TEST1.read_bytes())
    assert answer["Status"] == "Success"

    (series,) = orthanc.find_series(test1.StudyInstanceUID)
    assert series["ID"] == answer["ParentSeries"]
    assert orthanc.studies() == [answer["ParentStudy"]]
    assert [s["ID"] for s in orthanc.series_of_study(answer["ParentStudy"])] == [series["ID"]]
    (instance,) = orthanc.instances_of_series(series["ID"])
    got = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance["ID"])))
    assert got.SOPInstanceUID == test1.SOPInstanceUID
    assert got.PixelData == test1.PixelData


def test_orthanc_echo_and_store_to_pynetdicom_scp(orthanc, test1):
    assert orthanc.studies() == []  # the previous test's upload is gone
    nodelay_seen = []

    def record_nodelay(event):
        sock = event.assoc.dul.socket.socket
        nodelay_seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    with pynetdicom_storescp(ae="CXRSR", evt_handlers=[(evt.EVT_CONN_OPEN, record_nodelay)]) as scp:
        assert not orthanc.echo_modality("CXRSR")  # not registered yet
        orthanc.register_modality("CXRSR", aet=scp.ae, port=scp.port)
        assert orthanc.echo_modality("CXRSR")
        assert scp.echoes == [orthanc.aet]

        uploaded = orthanc.upload(TEST1)
        answer = orthanc.store_to_modality("CXRSR", [uploaded["ParentSeries"]])
        assert answer["FailedInstancesCount"] == 0, answer
        (instance,) = scp.wait_for_instances(1, deadline_s=10)
    assert nodelay_seen and set(nodelay_seen) == {1}  # acceptor sockets too
    assert instance.calling_ae == orthanc.aet
    assert instance.dataset.SOPInstanceUID == test1.SOPInstanceUID
    assert instance.dataset.PixelData == test1.PixelData


def test_storescu_to_orthanc(orthanc):
    result = storescu("127.0.0.1", orthanc.dicom_port, [TEST1], calling_ae="CXRSR", called_ae=orthanc.aet)
    assert result.returncode == 0, result.stdout + result.stderr
    assert orthanc.wait_for_instances(1, deadline_s=10) == 1


def test_orthanc_restart_keeps_ports_and_storage(orthanc):
    orthanc.upload(TEST1)
    orthanc.restart()
    assert orthanc.statistics()["CountInstances"] == 1


def test_rabbitmq_answers_amqp_handshake(rabbitmq):
    payload = rabbitmq.handshake()
    assert payload[4:6] == b"\x00\x09"  # AMQP 0-9 in Connection.Start
    assert b"RabbitMQ" in payload
    assert rabbitmq.amqp_url == f"amqp://guest:guest@127.0.0.1:{rabbitmq.port}//"
