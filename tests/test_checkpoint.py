"""``model.checkpoint``: round trips, the card, and refusals that name the file and the key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.arch import ArchConfig, Generator
from model.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    ModelCard,
    card_path,
    load_checkpoint,
    read_card,
    save_checkpoint,
    update_card,
)
from model.degrade import Degradation

TINY = ArchConfig(num_blocks=1, num_feat=8, num_grow=4)
META = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")

def _net(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(TINY).eval()


def _card() -> ModelCard:
    return ModelCard(name="tiny", version="0.0.1", arch=TINY, licence="test", metrics={"val_psnr_db": 30.0})


@pytest.fixture
def saved(tmp_path) -> tuple[Path, Generator]:
    net = _net()
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, net, _card(), dtype=torch.float32)
    return path, net


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_hand_made(path: Path, tensors: dict[str, torch.Tensor], *, metadata: dict | None = META) -> None:
    """Weights written by hand plus a card that is valid for them (right sha256)."""
    save_file(tensors, str(path), metadata=metadata)
    data = _card().to_dict()
    data["sha256"] = _sha(path)
    card_path(path).write_text(json.dumps(data))


def test_fp32_round_trip_is_exact(saved):
    path, net = saved
    loaded, card = load_checkpoint(path)
    x = torch.rand(1, 1, 9, 11)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert card.dtype == "float32" and card.arch == TINY and not loaded.training


def test_fp16_round_trip_is_within_fp16_precision(tmp_path):
    net = _net()
    path = tmp_path / "half.safetensors"
    card = save_checkpoint(path, net, _card())  # default storage: float16
    assert card.dtype == "float16"
    loaded, _ = load_checkpoint(path)
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.half().float()), key
    x = torch.rand(1, 1, 9, 11)
    with torch.no_grad():
        a, b = loaded(x), net(x)
    assert torch.allclose(a, b, atol=2e-3, rtol=2e-3)
    assert path.stat().st_size < 0.6 * sum(v.numel() * 4 for v in net.state_dict().values())


def test_card_json_describes_the_weights(saved):
    path, net = saved
    data = json.loads(card_path(path).read_text())
    assert data["format"] == FORMAT == "cxr-sr-node/generator"
    assert data["format_version"] == FORMAT_VERSION
    assert data["sha256"] == _sha(path)
    assert data["arch"] == TINY.to_dict()
    assert data["metrics"] == {"val_psnr_db": 30.0} and data["name"] == "tiny"
    assert read_card(path).sha256 == data["sha256"]


def test_save_refuses_a_path_that_is_not_safetensors(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_checkpoint(tmp_path / "x.pt", _net(), _card())


def _rewrite_card(path: Path, **changes) -> None:
    cp = card_path(path)
    data = json.loads(cp.read_text())
    data.update(changes)
    cp.write_text(json.dumps(data))


def test_unknown_format_version_is_refused(saved):
    path, _ = saved
    _rewrite_card(path, format_version=99)
    with pytest.raises(CheckpointError, match="format_version 99") as err:
        load_checkpoint(path)
    assert "tiny.json" in str(err.value)


def test_wrong_format_is_refused(saved):
    path, _ = saved
    _rewrite_card(path, format="someone-else/model")
    with pytest.raises(CheckpointError, match="'format'.*someone-else/model") as err:
        load_checkpoint(path)
    assert "tiny.json" in str(err.value)


def test_card_missing_a_key_is_refused(saved):
    path, _ = saved
    cp = card_path(path)
    data = json.loads(cp.read_text())
    del data["arch"]
    cp.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="'arch'"):
        load_checkpoint(path)


def test_sha256_mismatch_is_refused(saved):
    path, _ = saved
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last weight
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    loaded, _ = load_checkpoint(path, verify_sha256=False)  # still readable when asked not to check
    assert isinstance(loaded, Generator)


def test_missing_tensor_is_refused(tmp_path):
    state = {k: v.contiguous() for k, v in _net().state_dict().items()}
    del state["conv_first.bias"]
    path = tmp_path / "tiny.safetensors"
    _write_hand_made(path, state)
    with pytest.raises(CheckpointError, match="missing tensor 'conv_first.bias'") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_unexpected_tensor_is_refused(tmp_path):
    state = {k: v.contiguous() for k, v in _net().state_dict().items()}
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "tiny.safetensors"
    _write_hand_made(path, state)
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra.weight'") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_misshaped_tensor_is_refused(tmp_path):
    state = {k: v.contiguous() for k, v in _net().state_dict().items()}
    state["conv_last.weight"] = torch.zeros(1, 8, 5, 5)
    path = tmp_path / "tiny.safetensors"
    _write_hand_made(path, state)
    with pytest.raises(CheckpointError, match=r"'conv_last.weight' has shape \(1, 8, 5, 5\)") as err:
        load_checkpoint(path)
    assert "(1, 8, 3, 3)" in str(err.value) and str(path) in str(err.value)


def test_weights_without_format_metadata_are_refused(tmp_path):
    state = {k: v.contiguous() for k, v in _net().state_dict().items()}
    path = tmp_path / "tiny.safetensors"
    _write_hand_made(path, state, metadata=None)
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(path)


def test_missing_card_is_refused(saved):
    path, _ = saved
    card_path(path).unlink()
    with pytest.raises(CheckpointError, match="tiny.json is missing") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_missing_weights_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_non_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    data = _card().to_dict()
    data["sha256"] = _sha(path)
    card_path(path).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_card_that_is_not_json_is_refused(saved):
    path, _ = saved
    card_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_card_that_is_json_but_not_an_object_is_refused(saved):
    path, _ = saved
    card_path(path).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must be a JSON object, not a list"):
        load_checkpoint(path)


def test_update_card_keeps_weights_untouched(saved):
    path, net = saved
    before = path.read_bytes()
    card = update_card(path, metrics={"val_psnr_db": 41.5}, notes="evaluated")
    assert path.read_bytes() == before
    assert card.metrics == {"val_psnr_db": 41.5} and card.notes == "evaluated"
    loaded, card2 = load_checkpoint(path)  # sha256 still matches
    assert card2.metrics == {"val_psnr_db": 41.5} and card2.sha256 == _sha(path)
    x = torch.rand(1, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


WEIGHTS = Path(__file__).resolve().parents[1] / "model" / "weights"
SHIPPED = sorted(p for p in WEIGHTS.glob("cxr-sr-*.safetensors"))


def test_the_node_default_checkpoint_is_shipped():
    from model.inference import DEFAULT_CHECKPOINT

    assert Path(DEFAULT_CHECKPOINT).resolve() in [p.resolve() for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_generator_loads_strictly_and_stays_small(path):
    """Every committed generator: fp16, under 40 MiB (each version stays in the git history), its
    sha256 matches the card, strict loading passes, and the card says what it was trained on."""
    assert path.stat().st_size < 40 * 2**20
    net, card = load_checkpoint(path)
    assert card.sha256 == _sha(path) and card.dtype == "float16"
    assert card.iterations > 0 and card.training["train_images"] > 0
    assert card.degradation["name"] in ("paper", "lowdose", "mixed") and "NIH" in card.licence
    assert Degradation.named(**card.degradation)  # a setting the code can still rebuild
    assert sum(p.numel() for p in net.parameters()) == card.training["parameters"]
    assert "val" in card.metrics


def test_the_same_weights_give_the_same_file_in_every_process(tmp_path):
    # safetensors orders its header's metadata by a per-process hash map: the sha256 (quoted by
    # cards and by derived DICOM UIDs) changed between two exports of the same weights
    import os
    import subprocess
    import sys

    script = (
        "import sys, torch; from model.arch import ArchConfig, Generator; "
        "from model.checkpoint import ModelCard, save_checkpoint; torch.manual_seed(0); "
        "a = ArchConfig(num_blocks=1, num_feat=8, num_grow=4); "
        "save_checkpoint(sys.argv[1], Generator(a), ModelCard(name='x', version='1', arch=a))"
    )
    repo = Path(__file__).resolve().parents[1]
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], cwd=repo, check=True, timeout=120)
    assert len({p.read_bytes() for p in paths}) == 1
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in paths)  # not safetensors' 0600
    load_checkpoint(paths[0])


def test_a_training_state_given_as_checkpoint_points_to_export(tmp_path):
    state = tmp_path / "run" / "state.pt"
    state.parent.mkdir()
    state.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"is a training state, not a checkpoint: .*model export .*--which state"):
        load_checkpoint(state)
