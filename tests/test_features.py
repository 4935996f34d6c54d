"""``model train-features`` and the perceptual feature networks of ``build_perceptual``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from model.checkpoint import card_path, sha256_file
from model.cli import model_group
from model.data import load_gray
from model.train import nets
from model.train.features import FORMAT, normalise_layers
from model.train.nets import CXR_FEATURES_CFG, CXR_FEATURES_PATH, build_perceptual, vgg_layers

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr_png" / "nih"

pytestmark = pytest.mark.timeout(60)

needs_data = pytest.mark.skipif(
    not (NIH / "val").is_dir(), reason=f"the shared chest X-ray data is not at {NIH}"
)


def chest_crop(size: int = 64) -> torch.Tensor:
    """(1, 1, size, size) centre crop of a real val-split chest X-ray, gray in [0, 1]."""
    img = load_gray(sorted((NIH / "val").glob("*.png"))[0])
    y, x = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return torch.from_numpy(img[y : y + size, x : x + size].copy())[None, None]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A split folder of 96² 8-bit crops of real NIH images (train 3, val 1, test 1)."""
    root = tmp_path_factory.mktemp("cxr")
    sources = sorted((NIH / "test").glob("*.png"))[:5]
    for split, picks in (("train", sources[:3]), ("val", sources[3:4]), ("test", sources[4:5])):
        (root / split).mkdir()
        for src in picks:
            with Image.open(src) as img:
                img.convert("L").crop((400, 400, 496, 496)).save(root / split / src.name)
    return root


@needs_data
def test_three_iterations_write_a_loadable_file_and_card(tiny_data, tmp_path):
    out = tmp_path / "feats.safetensors"
    result = CliRunner().invoke(
        model_group,
        [
            "train-features",
            "--data",
            str(tiny_data),
            "--iterations",
            "3",
            "--crop",
            "32",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--log",
            str(tmp_path / "log.jsonl"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    state = load_file(str(out))
    reference = vgg_layers(CXR_FEATURES_CFG, 1).state_dict()
    assert state.keys() == reference.keys()
    assert all(state[k].shape == v.shape and state[k].dtype == torch.float32 for k, v in reference.items())
    vgg_layers(CXR_FEATURES_CFG, 1).load_state_dict(state, strict=True)

    card = json.loads(card_path(out).read_text())
    assert card["format"] == FORMAT and card["sha256"] == sha256_file(out)
    assert card["training"]["iterations"] == 3 and card["training"]["train_images"] == 3
    assert card["layer"] == {**card["layer"], "name": "last", "conv": "conv4_2", "index": 17}
    assert np.isfinite(card["metrics"]["val"]["noisy"]["recon_psnr_db"])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "val"


def test_a_crop_that_is_not_a_multiple_of_8_is_refused(tmp_path):
    result = CliRunner().invoke(
        model_group,
        [
            "train-features",
            "--data",
            str(tmp_path),
            "--iterations",
            "1",
            "--crop",
            "36",
            "--out",
            str(tmp_path / "feats.safetensors"),
            "--no-progress",
        ],
    )
    assert result.exit_code != 0 and "crop must be a multiple of 8" in result.output


def test_missing_weights_name_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(nets, "CXR_FEATURES_PATH", tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="cxr-sr-node model train-features"):
        build_perceptual("cxr_features", "last")


def test_normalising_layers_keeps_each_function_up_to_a_scale():
    torch.manual_seed(0)
    feats = vgg_layers(CXR_FEATURES_CFG, 1).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        before = feats(x)
        scales = normalise_layers(feats, x)
        after = feats(x)
    last = [m for m in feats if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        pre_relu = feats[: list(feats).index(last) + 1](x)
    assert len(scales) == 8 and pre_relu.std().item() == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(after, before / scales[-1], rtol=1e-4, atol=1e-6)


def test_shipped_weights_load_strictly_and_match_their_card():
    assert CXR_FEATURES_PATH.is_file(), "run `cxr-sr-node model train-features` to create it"
    state = load_file(str(CXR_FEATURES_PATH))
    vgg_layers(CXR_FEATURES_CFG, 1).load_state_dict(state, strict=True)
    card = json.loads(card_path(CXR_FEATURES_PATH).read_text())
    assert card["sha256"] == sha256_file(CXR_FEATURES_PATH)
    assert card["training"]["iterations"] > 0 and "NIH" in card["licence"]


@needs_data
def test_cxr_features_are_finite_normalised_and_deterministic():
    x = chest_crop(64)
    a, b = build_perceptual("cxr_features", "last"), build_perceptual("cxr_features", "last")
    fa = a(x)
    assert fa.shape == (1, 128, 8, 8) and torch.isfinite(fa).all()
    assert 0.2 < fa.std().item() < 5.0  # unit std on the training crops, per the card
    assert torch.equal(fa, a(x)) and torch.equal(fa, b(x))
    assert build_perceptual("cxr_features", "conv3_2")(x).shape == (1, 128, 16, 16)


@needs_data
def test_random_vgg19_conv5_4_features_neither_vanish_nor_explode():
    feats = build_perceptual("random_vgg19", "conv5_4", seed=0)(chest_crop(64))
    assert feats.shape == (1, 512, 4, 4) and torch.isfinite(feats).all()
    assert 1e-2 < feats.std().item() < 10.0


@needs_data
def test_an_existing_out_file_is_kept_unless_forced(tiny_data, tmp_path):
    """The default --out is the shipped feature network: a retrain must not silently replace it."""
    out = tmp_path / "feats.safetensors"
    out.write_bytes(b"keep me")
    args = ["train-features", "--data", str(tiny_data), "--iterations", "1", "--crop", "32", "--batch-size", "2",
            "--out", str(out), "--log", str(tmp_path / "log.jsonl"), "--no-progress"]
    refused = CliRunner().invoke(model_group, args)
    assert refused.exit_code == 1 and f"{out} exists" in refused.output and "--force" in refused.output
    assert out.read_bytes() == b"keep me" and not (tmp_path / "log.jsonl").exists()
    forced = CliRunner().invoke(model_group, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    vgg_layers(CXR_FEATURES_CFG, 1).load_state_dict(load_file(str(out)), strict=True)


def test_the_default_out_is_the_shipped_file_and_is_not_replaced(tmp_path):
    before = CXR_FEATURES_PATH.read_bytes()
    result = CliRunner().invoke(model_group, ["train-features", "--data", str(tmp_path), "--iterations", "1",
                                              "--no-progress", "--log", str(tmp_path / "log.jsonl")])
    assert result.exit_code == 1 and "shipped feature network" in result.output
    assert CXR_FEATURES_PATH.read_bytes() == before
