"""``model info`` and ``model bench``: parameter and MAC counts, timings against bicubic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from model import inference
from model.arch import PAPER, ArchConfig, Generator, count_parameters
from model.checkpoint import ModelCard, save_checkpoint
from model.cli import model_group

TINY = ArchConfig(num_blocks=1, num_feat=8, num_grow=4, global_skip=True)
CPU_CONFIG = Path(__file__).resolve().parents[1] / "model" / "configs" / "cpu.toml"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, Generator(TINY), ModelCard(name="tiny", version="0", arch=TINY, licence="test"))
    return path


def invoke(*args: str):
    return CliRunner().invoke(model_group, list(args))


def test_info_paper_arch_counts_the_papers_parameters():
    result = invoke("info", "--arch", "paper", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["parameters"] == 16_746_902
    assert info["macs_64_to_256"] > 0
    assert info["arch"] == PAPER.to_dict() and info["name"] == "paper"
    text = invoke("info", "--arch", "paper")
    assert "16,746,902" in text.stdout and "36.91 GFLOPs" in text.stdout


def test_info_checkpoint_prints_its_card(tiny):
    info = json.loads(invoke("info", "--checkpoint", str(tiny), "--json").stdout)
    assert info["name"] == "tiny" and info["licence"] == "test" and len(info["sha256"]) == 64
    assert info["parameters"] == count_parameters(Generator(TINY))
    assert info["macs_64_to_256"] > 0 and info["weights_sha256_matches"] is True
    assert info["checkpoint"] == str(tiny)
    assert info["arch_mismatch"] is None
    text = invoke("info", "--checkpoint", str(tiny)).stdout
    assert "matches the weights" in text and f"{info['parameters']:,}" in text and "WARNING" not in text


def test_info_warns_when_the_card_describes_other_weights(tiny):
    card = json.loads(tiny.with_suffix(".json").read_text())
    card["arch"]["num_feat"] = 16  # the card now claims a wider network than the file holds
    tiny.with_suffix(".json").write_text(json.dumps(card))
    info = json.loads(invoke("info", "--checkpoint", str(tiny), "--json").stdout)
    assert info["arch_mismatch"] == (
        "tensor body.0.rdb1.conv1.weight: the card's architecture wants (4, 16, 3, 3), the file has (4, 8, 3, 3)"
    )
    assert "WARNING      the weights are not this architecture" in invoke("info", "--checkpoint", str(tiny)).stdout


def test_info_reads_the_arch_table_of_a_training_config():
    from model.train.config import load_config

    info = json.loads(invoke("info", "--arch", str(CPU_CONFIG), "--json").stdout)
    arch = load_config(CPU_CONFIG).arch
    assert info["arch"] == arch.to_dict()
    assert info["parameters"] == count_parameters(Generator(arch))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--arch", "paper", "--checkpoint", "x.safetensors"), "either --checkpoint or --arch, not both"),
        (("--arch", "big"), "--arch must be 'paper' or a training config .toml file, got 'big'"),
        (("--arch", "missing.toml"), "does not exist"),
        (("--checkpoint", "missing.safetensors"), "checkpoint missing.safetensors does not exist"),
    ],
)
def test_info_errors_name_what_was_wrong(args, message):
    result = invoke("info", *args)
    assert result.exit_code == 1 and message in result.output


def test_info_and_bench_without_default_checkpoint_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "DEFAULT_CHECKPOINT", tmp_path / "cxr-sr-cpu.safetensors")
    for command in ("info", "bench"):
        result = invoke(command)
        assert result.exit_code == 1
        assert "the default checkpoint" in result.output and "does not exist yet" in result.output


def test_bench_times_model_and_bicubic(tiny):
    result = invoke("bench", "--checkpoint", str(tiny), "--sizes", "16", "--repeats", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 16 | 64 |")]
    assert [r.split("|")[3].strip() for r in rows] == ["bicubic", "tiny"]
    assert all(float(r.split("|")[6]) > 0 for r in rows)
    assert "ratio_vs_bicubic" in result.stdout and "0.016 s per 256×256" in result.stdout
    assert f"torch threads: {torch.get_num_threads()}" in result.stdout

    data = json.loads(
        invoke("bench", "--checkpoint", str(tiny), "--sizes", "8,16", "--repeats", "2", "--json").stdout
    )
    assert [(r["lr_px"], r["method"]) for r in data["rows"]] == [
        (8, "bicubic"), (8, "tiny"), (16, "bicubic"), (16, "tiny")
    ]
    for row in data["rows"]:
        assert row["s_per_image"] > 0 and row["runs"] == 2 and row["peak_mem_mib"] >= 0
        assert row["precision"] == "fp32" and row["sr_px"] == 4 * row["lr_px"]
    assert data["rows"][0]["ratio_vs_bicubic"] == 1.0
    assert data["threads"] == torch.get_num_threads() and data["model"]["parameters"] > 0


@pytest.mark.parametrize("sizes", ["0", "a,b", ""])
def test_bench_rejects_bad_sizes(tiny, sizes):
    result = invoke("bench", "--checkpoint", str(tiny), "--sizes", sizes)
    assert result.exit_code == 2 and "--sizes" in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_cuda_adds_half_precision_rows(tiny):
    data = json.loads(invoke("bench", "--checkpoint", str(tiny), "--sizes", "64", "--device", "cuda", "--json").stdout)
    precisions = [r["precision"] for r in data["rows"] if r["method"] == "tiny"]
    assert precisions[0] == "fp32" and "fp16" in precisions
    assert data["memory"] == "cuda_max_memory_allocated"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_bench_peak_memory_of_a_size_measured_after_a_larger_one_is_not_zero():
    """glibc keeps freed pages for reuse: without giving them back, 64² after 256² read 0.0 MiB."""
    cpu = Path(__file__).resolve().parents[1] / "model" / "weights" / "cxr-sr-cpu.safetensors"
    out = invoke("bench", "--checkpoint", str(cpu), "--sizes", "256,64", "--repeats", "1", "--device", "cpu",
                 "--threads", "1", "--json")
    assert out.exit_code == 0, out.output
    peak = {r["lr_px"]: r["peak_mem_mib"] for r in json.loads(out.stdout)["rows"] if r["method"] != "bicubic"}
    assert peak[256] > 100 and peak[64] > 5, peak  # alone, 64² → 256² measured ~22 MiB
