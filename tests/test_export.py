"""``model export``: a training run (best, last or state.pt) or a checkpoint becomes a shippable one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from model.checkpoint import load_checkpoint, read_card
from model.cli import model_group
from model.export import ExportError, export_checkpoint
from model.inference import Upscaler, load_generator
from model.train.config import load_config
from model.train.loop import train
from tests.test_train import data_root, write_config  # noqa: F401 - data_root is a fixture

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "model" / "weights" / "cxr-sr-cpu-none.safetensors"

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny run to its end: best.safetensors, last.safetensors and state.pt."""
    tmp = tmp_path_factory.mktemp("finished")
    train(load_config(write_config(tmp / "t.toml", data_root, tmp / "run")), progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def stopped(data_root, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny run stopped by its time limit before any validation: only state.pt."""
    tmp = tmp_path_factory.mktemp("stopped")
    cfg = load_config(
        write_config(tmp / "t.toml", data_root, tmp / "run", psnr={"iterations": 50}),
        {"val_every": 1000, "save_every": 1000},
    )
    train(cfg, max_minutes=1e-9, progress=False)
    run = tmp / "run"
    assert not (run / "best.safetensors").exists() and not (run / "last.safetensors").exists()
    return run


def test_a_run_folder_exports_its_best_checkpoint_bit_for_bit(finished, tmp_path):
    done = export_checkpoint(finished, tmp_path / "cxr-sr-tiny.safetensors", version="1.0.0")
    assert done.source == finished / "best.safetensors"
    card = read_card(done.path)
    best = read_card(finished / "best.safetensors")
    assert (card.name, card.version, card.dtype) == ("cxr-sr-tiny", "1.0.0", "float16")
    assert card.iterations == best.iterations and card.metrics == best.metrics and card.arch == best.arch
    assert "exported from best.safetensors" in card.notes
    ours, theirs = load_file(str(done.path)), load_file(str(finished / "best.safetensors"))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # what the node loads: strict load, sha256 checked, and it upscales
    up = Upscaler(load_generator(done.path, "cpu"), precision="fp32")
    assert up(np.full((8, 8), 0.5, np.float32)).shape == (32, 32)


def test_which_picks_last_and_a_folder_out_takes_the_name(finished, tmp_path):
    done = export_checkpoint(finished, tmp_path, which="last", name="tiny-last")
    assert done.path == tmp_path / "tiny-last.safetensors" and done.source == finished / "last.safetensors"
    assert read_card(done.path).version == "0.0.1"  # the config's version when none is given


def test_a_stopped_run_exports_the_ema_weights_of_its_state(stopped, tmp_path):
    done = export_checkpoint(stopped, tmp_path)  # auto: no best, no last → state.pt
    assert done.path == tmp_path / "tiny-test.safetensors" and done.source == stopped / "state.pt"
    state = torch.load(stopped / "state.pt", map_location="cpu", weights_only=True)
    weights = load_file(str(done.path))
    assert set(weights) == set(state["ema"])
    assert all(torch.equal(weights[k], state["ema"][k].to(torch.float16)) for k in weights)
    card = read_card(done.path)
    assert card.iterations == state["iteration"] == 1
    assert "without a validation" in card.notes and "model eval" in card.notes
    assert card.training["psnr_stage"]["iterations"] == 50 and card.degradation["name"] == "paper"
    assert card.arch.num_feat == 8
    card_text = (tmp_path / "tiny-test.json").read_text()
    assert "Infinity" not in card_text  # no validation yet: null, and the card stays JSON
    assert json.loads(card_text)["metrics"]["best_val_psnr_db_before_export"] is None
    load_checkpoint(done.path)
    with pytest.raises(ExportError, match="not reached a validation.*--which state exports"):
        export_checkpoint(stopped, tmp_path / "b.safetensors", which="best")


def test_re_export_changes_dtype_and_version_and_keeps_the_metrics(tmp_path):
    done = export_checkpoint(SHIPPED, tmp_path / "cpu-none-fp32.safetensors", dtype="fp32", version="1.0.1")
    card, source = read_card(done.path), read_card(SHIPPED)
    assert card.dtype == "float32" and card.version == "1.0.1" and card.metrics == source.metrics
    ours, theirs = load_file(str(done.path)), load_file(str(SHIPPED))
    assert all(ours[k].dtype == torch.float32 and torch.equal(ours[k], theirs[k].float()) for k in ours)
    assert done.size_bytes == (tmp_path / "cpu-none-fp32.safetensors").stat().st_size


def test_a_tampered_checkpoint_is_not_exported(tmp_path):
    src = tmp_path / "src.safetensors"
    shutil.copy(SHIPPED, src)
    shutil.copy(SHIPPED.with_suffix(".json"), src.with_suffix(".json"))
    data = bytearray(src.read_bytes())
    data[-3] ^= 0xFF
    src.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256") as err:
        export_checkpoint(src, tmp_path / "out.safetensors")
    assert str(src) in str(err.value)
    assert not (tmp_path / "out.safetensors").exists()


class _NotData:  # a pickled object that would need code to come back
    pass


def test_a_state_file_with_code_in_it_is_refused_without_running_it(tmp_path):
    bad = tmp_path / "state.pt"
    torch.save({"config": {}, "ema": {}, "iteration": 0, "elapsed_s": 0.0, "x": _NotData()}, bad)
    with pytest.raises(ExportError, match="not a readable training state"):
        export_checkpoint(bad, tmp_path / "out.safetensors")


def test_cli_export_refuses_what_it_cannot_do_by_name(finished, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cxr-sr-tiny.safetensors"
    first = runner.invoke(model_group, ["export", str(finished), str(out), "--version", "1.0.0", "--json"])
    assert first.exit_code == 0, first.output
    info = json.loads(first.output)
    assert info["name"] == "cxr-sr-tiny" and info["sha256"] == read_card(out).sha256
    assert info["over_ship_limit"] is False

    again = runner.invoke(model_group, ["export", str(finished), str(out)])
    assert again.exit_code == 1 and "exists" in again.output and "--force" in again.output
    forced = runner.invoke(model_group, ["export", str(finished), str(out), "--force", "--version", "1.0.1"])
    assert forced.exit_code == 0 and read_card(out).version == "1.0.1"

    bad_version = runner.invoke(model_group, ["export", str(finished), str(tmp_path / "x.safetensors"),
                                              "--version", "1.0\\2"])
    assert bad_version.exit_code == 1 and "version" in bad_version.output
    assert not (tmp_path / "x.safetensors").exists()

    empty = tmp_path / "not-a-run"
    empty.mkdir()
    nothing = runner.invoke(model_group, ["export", str(empty), str(tmp_path / "y.safetensors")])
    assert nothing.exit_code == 1 and "best.safetensors or last.safetensors or state.pt" in nothing.output
    missing = runner.invoke(model_group, ["export", str(tmp_path / "nope"), str(tmp_path / "z.safetensors")])
    assert missing.exit_code == 1 and "nope" in missing.output and "Traceback" not in missing.output
    same = runner.invoke(model_group, ["export", str(out), str(out), "--force"])
    assert same.exit_code == 1 and "source itself" in same.output
