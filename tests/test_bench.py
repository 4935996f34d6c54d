"""``cxr-sr-node bench``: smoke tests with tiny sizes. They check that the benchmarks run end to
end against the real peers and report consistent figures; they never assert on timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cxr_sr_node import bench
from cxr_sr_node.cli import main
from tests.peers import PeerMissing, require_binary

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    for name in ("storescu", "storescp", "echoscu"):
        try:
            require_binary(name, "dcmtk")
        except PeerMissing as exc:
            pytest.skip(str(exc))


def test_make_instances_have_the_asked_size_and_unique_uids(tmp_path):
    import pydicom

    files = bench.make_instances(tmp_path, 3, 0.5)
    headers = [pydicom.dcmread(f) for f in files]
    assert len({h.SOPInstanceUID for h in headers}) == 3
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    h = headers[0]
    assert (h.Modality, h.SOPClassUID, h.PhotometricInterpretation, h.BitsAllocated) == (
        "DX", bench.DX_FOR_PRESENTATION, "MONOCHROME2", 16)
    assert h.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert len(h.PixelData) == h.Rows * h.Columns * 2 == 512 * 512 * 2


def test_bench_receive_cli_reports_every_receiver(tmp_path):
    result = CliRunner().invoke(main, ["bench", "receive", "--count", "3", "--size-mib", "0.5", "--rounds", "1",
                                       "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert set(r["receivers"]) == {rec.key for rec in bench.RECEIVERS}
    for rec in r["receivers"].values():
        (run,) = rec["rounds"]
        assert run["files"] == 3
        assert run["max_send_pdv"] == 131072 - 12  # both sides used the same max PDU
        assert run["transfer_syntax_sent"] == ["Little Endian Explicit -> Little Endian Explicit"]
        assert rec["median_s"] > 0 and rec["mib_per_s"] > 0
    rss = r["receivers"]["node"]["rounds"][0]["rss"]
    assert rss["baseline_mib"] > 0 and rss["sampled_peak_mib"] >= rss["baseline_mib"]
    assert r["node_rss_growth_mib"] == rss["growth_mib"]
    assert r["targets"]["time_ratio"] == r["ratio_node_to"]["dcmtk"]
    assert "storescp (as shipped)" in r["table"] and "target RSS growth" in r["table"]


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return bench._tiny_checkpoint(tmp_path)


def test_pipeline_benchmark_round_trip_with_a_small_image(tmp_path, tiny_checkpoint):
    sources = bench.make_instances(tmp_path / "src", 1, 128 * 128 * 2 / bench.MIB)  # 128x128 DX
    r = bench.pipeline_benchmark(images=2, checkpoint=tiny_checkpoint, sources=sources, series_idle_s=0.2,
                                 work_dir=tmp_path / "work")
    assert r["settings"]["model"] == "bench-tiny"
    assert [p["rows"] for p in r["images"]] == [128, 128]
    for p in r["images"]:
        assert p["round_trip_s"] >= p["send_s"] > 0
        assert p["derive_s"] is not None and p["derive_s"] < p["round_trip_s"]
        assert p["series_wait_s"] >= 0.2 - 0.05  # timestamps come from another process's clock reads
    assert r["model_forward_s"] > 0
    assert r["node_exit_status"] == 0
    assert "round trip" in r["table"]
    # the destination got both derived instances
    assert len(list((tmp_path / "work" / "dest").iterdir())) == 2


@pytest.mark.slow
def test_pipeline_benchmark_default_chest_image(tiny_checkpoint):
    r = bench.pipeline_benchmark(images=1, checkpoint=tiny_checkpoint)
    assert r["images"][0]["rows"] == 1024 and r["images"][0]["derive_s"] is not None
