"""DICOM TLS on the SCP, against dcmtk's storescu with and without client certificates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cxr_sr_node.config import ConfigError, load_config
from tests.dicom_helpers import CHEST_DIR
from tests.peers import PeerMissing, require_binary, storescu
from tests.test_scp import incoming_files, running_scp


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    try:
        require_binary("storescu", "dcmtk")
        require_binary("openssl", "openssl")
    except PeerMissing as exc:
        pytest.skip(str(exc))
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=test-ca", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)
    return d


def test_tls_scp_accepts_tls_and_refuses_plain_tcp(tmp_path, pki):
    with running_scp(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key") as scp:
        tls = storescu("127.0.0.1", scp.port, [CHEST_DIR / "test1.dcm"], calling_ae="MODALITY", called_ae="CXRSR",
                       extra_args=("+tla", "+cf", str(pki / "ca.pem")))
        plain = storescu("127.0.0.1", scp.port, [CHEST_DIR / "test2.dcm"], calling_ae="MODALITY", called_ae="CXRSR",
                         timeout_s=30)
        stored = incoming_files(scp)
    assert tls.returncode == 0, tls.stdout + tls.stderr
    assert plain.returncode != 0
    assert [p.stem for p in stored] == ["1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888"]


def test_tls_with_ca_requires_a_client_certificate(tmp_path, pki):
    with running_scp(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_ca=pki / "ca.pem") as scp:
        anonymous = storescu("127.0.0.1", scp.port, [CHEST_DIR / "test2.dcm"], calling_ae="MODALITY",
                             called_ae="CXRSR", extra_args=("+tla", "+cf", str(pki / "ca.pem")))
        with_cert = storescu("127.0.0.1", scp.port, [CHEST_DIR / "test1.dcm"], calling_ae="MODALITY",
                             called_ae="CXRSR",
                             extra_args=("+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf",
                                         str(pki / "ca.pem")))
        stored = incoming_files(scp)
    assert anonymous.returncode != 0
    assert with_cert.returncode == 0, with_cert.stdout + with_cert.stderr
    assert len(stored) == 1


def test_tls_settings_are_checked(tmp_path, pki):
    with pytest.raises(ConfigError, match="tls_cert and tls_key: set both"):
        load_config(environ={}, flags={"tls_cert": pki / "server.pem"})
    with pytest.raises(ConfigError, match=r"tls_key \(from command line\): file .* does not exist"):
        load_config(environ={}, flags={"tls_cert": pki / "server.pem", "tls_key": tmp_path / "nope.key"})


def test_check_loads_the_tls_files_and_serve_names_them(tmp_path, pki):
    """A certificate file that is not PEM passed `check` (the systemd start check) and then made
    `serve` fail with '[SSL] PEM lib' without naming a setting."""
    from cxr_sr_node.health import run_checks
    from cxr_sr_node.node import Node, StartError
    from tests.peers import free_port

    good = load_config(environ={}, flags={"tls_cert": pki / "server.pem", "tls_key": pki / "server.key",
                                          "tls_ca": pki / "ca.pem", "spool": tmp_path / "spool"})
    checks = {name: (ok, detail) for name, ok, detail in run_checks(good, load_model=False, echo_dest=False)}
    assert checks["tls"] == (True, f"certificate {pki / 'server.pem'} loaded, client certificates required")
    garbage = tmp_path / "bad.pem"
    garbage.write_text("not a certificate\n")
    bad = load_config(environ={}, flags={"tls_cert": garbage, "tls_key": garbage, "spool": tmp_path / "spool",
                                         "port": free_port(), "bind_address": "127.0.0.1", "workers": 0,
                                         "min_free_disk_mb": 1})
    ok, detail = {n: (o, d) for n, o, d in run_checks(bad, load_model=False, echo_dest=False)}["tls"]
    assert not ok and f"tls_cert {garbage}" in detail and "cannot be loaded" in detail
    node = Node(bad)
    with pytest.raises(StartError, match=r"tls_cert / tls_key / tls_ca .*bad.pem.* cannot be loaded"):
        node.start()
    assert node._lock_fd is None  # stopped again: the spool is free for the next start
    import tempfile

    assert tempfile.gettempdir() != str(node.spool.tmp_dir)  # the failed start left the process's temp dir alone


def test_a_silent_connection_does_not_block_tls_handshakes(tmp_path, pki):
    """pynetdicom made the TLS handshake in its accept loop, without a deadline: one connection that
    sent nothing froze every later one for as long as it stayed open."""
    import socket

    with running_scp(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key") as scp:
        with socket.create_connection(("127.0.0.1", scp.port)) as silent:
            tls = storescu("127.0.0.1", scp.port, [CHEST_DIR / "test1.dcm"], calling_ae="MODALITY",
                           called_ae="CXRSR", extra_args=("+tla", "+cf", str(pki / "ca.pem")), timeout_s=30)
            assert silent.fileno() != -1  # still open while the TLS store went through
        stored = incoming_files(scp)
    assert tls.returncode == 0, tls.stdout + tls.stderr
    assert len(stored) == 1
