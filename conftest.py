"""Shared fixtures: real peers from ``tests/peers.py`` (no torch import here).

- ``storescp``: function-scoped dcmtk storescp writing into ``tmp_path / "storescp"``.
- ``orthanc``: one Orthanc process per test module (stopping Orthanc takes ~3.5 s), reset before
  every test: no patients, only the configured modalities, empty change/export logs. No modality is
  configured; register the node under test with ``orthanc.register_modality("CXRSR", aet=..., port=...)``.
- ``rabbitmq``: one broker per session (it takes ~5-10 s to start); tests use their own queues.

A missing binary skips the test with the ``apt-get install`` line that fixes it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers import (
    OrthancServer,
    PeerMissing,
    RabbitMQServer,
    StoreSCP,
    dcmtk_storescp,
    orthanc_server,
    rabbitmq_server,
    require_binary,
)


def _require(name: str, package: str) -> None:
    try:
        require_binary(name, package)
    except PeerMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture
def dcmtk() -> None:
    """Skip unless dcmtk's command-line tools are installed."""
    _require("storescu", "dcmtk")


@pytest.fixture
def storescp(tmp_path) -> Iterator[StoreSCP]:
    _require("storescp", "dcmtk")
    with dcmtk_storescp(tmp_path / "storescp", log_dir=tmp_path) as scp:
        yield scp


@pytest.fixture(scope="module")
def _orthanc_process(tmp_path_factory) -> Iterator[OrthancServer]:
    _require("Orthanc", "orthanc")
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def orthanc(_orthanc_process: OrthancServer) -> OrthancServer:
    _orthanc_process.reset()
    return _orthanc_process


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory) -> Iterator[RabbitMQServer]:
    _require("rabbitmq-server", "rabbitmq-server")
    with rabbitmq_server(tmp_path_factory.mktemp("rabbitmq")) as server:
        yield server


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny nets gain nothing from threads, and on a busy 2-core machine OpenMP threads contend
    (seconds instead of milliseconds); results do not depend on it. torch is imported only here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
