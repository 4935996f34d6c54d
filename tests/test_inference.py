"""``model.inference``: loading, the Upscaler's contract, tiling equivalence, OOM back-off, memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.arch import CSA, ArchConfig, Generator, ResidualDenseBlock
from model.checkpoint import ModelCard, save_checkpoint
from model.data import load_gray
from model.inference import LoadedGenerator, UpscaleError, Upscaler, load_generator

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr_png" / "nih"
TINY = ArchConfig(num_blocks=1, num_feat=8, num_grow=4, global_skip=True)
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")

def trained_like(attention: str) -> Generator:
    """A 2-block net whose body, attention and last conv all matter, like a trained one: ESRGAN's
    0.1 init scaling of the dense blocks undone, CSA gates sharpened, a residual of ~0.03 std over
    the bicubic skip (random init alone is almost exactly bicubic and would hide tiling seams)."""
    torch.manual_seed(0)
    net = Generator(ArchConfig(attention=attention, num_blocks=2, num_feat=16, num_grow=8, global_skip=True))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ResidualDenseBlock):
                for conv in (m.conv1, m.conv2, m.conv3, m.conv4, m.conv5):
                    conv.weight.mul_(10)
            if isinstance(m, CSA):
                m.fc1.weight.mul_(3)
                m.fc2.weight.mul_(3)
        nn.init.normal_(net.conv_last.weight, std=0.3)
    return net.eval()


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    """An odd-sized (77 x 131) crop of a real chest X-ray, float32 in [0, 1]."""
    files = sorted((NIH / "test").glob("*.png"))
    if not files:
        pytest.skip(f"the shared chest X-ray data is not at {NIH}")
    return np.ascontiguousarray(load_gray(files[0])[300:377, 400:531])


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    net = Generator(TINY)
    nn.init.normal_(net.conv_last.weight, std=0.1)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, net, ModelCard(name="tiny", version="0", arch=TINY), dtype=torch.float32)
    return path


def _direct(net: Generator, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(image)[None, None])[0, 0].clamp(0, 1).numpy()


def test_load_generator_returns_an_eval_model_and_its_card(checkpoint):
    loaded = load_generator(checkpoint, "cpu")
    assert isinstance(loaded, LoadedGenerator)
    assert loaded.device == torch.device("cpu") and loaded.path == checkpoint
    assert not loaded.net.training
    assert not any(p.requires_grad for p in loaded.net.parameters())
    assert loaded.card.name == "tiny" and loaded.card.arch == TINY
    assert loaded.sha256 == loaded.card.sha256 and len(loaded.sha256) == 64


def test_load_generator_rejects_unknown_devices(checkpoint):
    with pytest.raises(ValueError, match="tpu"):
        load_generator(checkpoint, "tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UpscaleError, match="CUDA is not available"):
            load_generator(checkpoint, "cuda")


def test_upscaler_returns_float32_4x_clamped_to_unit_range(checkpoint):
    loaded = load_generator(checkpoint, "cpu")
    with torch.no_grad():
        loaded.net.conv_last.bias.fill_(0.3)  # push bright pixels above 1
    image = np.random.default_rng(0).random((19, 23), dtype=np.float32)
    out = Upscaler(loaded)(image)
    assert out.dtype == np.float32 and out.shape == (76, 92)
    with torch.no_grad():
        raw = loaded.net(torch.from_numpy(image)[None, None])[0, 0].numpy()
    assert raw.max() > 1.05  # the clamp below has something to do
    assert out.min() >= 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, np.clip(raw, 0, 1), atol=1e-6)  # nothing else is done to the output


@pytest.mark.parametrize("attention", ["csa", "none"])
def test_tiled_equals_untiled_on_an_odd_sized_image(chest, attention):
    net = trained_like(attention)
    untiled = Upscaler(net, tile=1024)(chest)
    np.testing.assert_allclose(untiled, _direct(net, chest), atol=1e-6)
    tiled = Upscaler(net, tile=32, overlap=16)(chest)  # 3 x 5 tiles, edge tiles shifted inwards
    assert tiled.shape == (4 * 77, 4 * 131)
    assert np.abs(tiled - untiled).max() < 1e-3
    seams = Upscaler(net, tile=32, overlap=0)(chest)  # no context: the seams show
    assert np.abs(seams - untiled).max() > 1e-2


def test_pooled_attention_depends_on_the_tile(chest):
    """Documented caveat: csa_pooled pools over its input, so tiling changes its output."""
    net = trained_like("csa_pooled")
    untiled = Upscaler(net, tile=1024)(chest)
    tiled = Upscaler(net, tile=32, overlap=16)(chest)
    assert np.abs(tiled - untiled).max() > 1e-3


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((1, 8, 8), np.float32), "2-D"),
        (np.zeros((8, 8), np.float64), "float64"),
        (np.zeros((8, 8), np.uint8), "uint8"),
        (np.zeros((0, 5), np.float32), r"empty \(shape \(0, 5\)\)"),
        (np.where(np.eye(8) > 0, np.nan, 0.5).astype(np.float32), "NaN or infinite"),
        (np.full((8, 8), np.inf, np.float32), "NaN or infinite"),
        (np.linspace(0, 255, 64, dtype=np.float32).reshape(8, 8), r"0 to 255: scale the image first"),
        (np.full((8, 8), -0.2, np.float32), "expected values in"),
    ],
)
def test_bad_images_are_refused_with_a_reason(image, message):
    up = Upscaler(Generator(TINY), tile=64)
    with pytest.raises(ValueError, match=message):
        up(image)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile": 4}, "tile=4"),
        ({"tile": 64, "min_tile": 128}, "min_tile=128"),
        ({"overlap": -1}, "overlap=-1"),
        ({"precision": "bf16"}, "needs a CUDA device"),
        ({"precision": "fp16"}, "needs a CUDA device"),
        ({"precision": "int8"}, "int8"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Upscaler(Generator(TINY), **kwargs)


def test_a_little_outside_the_unit_range_is_accepted():
    image = np.linspace(-0.04, 1.04, 64, dtype=np.float32).reshape(8, 8)  # noise, interpolation overshoot
    assert Upscaler(Generator(TINY), tile=64)(image).shape == (32, 32)


def test_cpu_auto_precision_is_fp32():
    assert Upscaler(Generator(TINY)).dtype is None


class _OomAbove(nn.Module):
    """Wraps a generator; raises CUDA-style OOM when the input patch has more than ``limit`` px."""

    def __init__(self, net: Generator, limit: int) -> None:
        super().__init__()
        self.net, self.limit = net, limit
        self.patches: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.patches.append(tuple(x.shape[-2:]))
        if x.shape[-2] * x.shape[-1] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.net(x)


def _record_tiles(monkeypatch) -> list[int]:
    tiles: list[int] = []
    original = Upscaler._run

    def run(self, image, tile):
        tiles.append(tile)
        return original(self, image, tile)

    monkeypatch.setattr(Upscaler, "_run", run)
    return tiles


def test_oom_halves_the_tile_and_keeps_nothing_from_the_failed_pass(chest, monkeypatch):
    net = trained_like("csa")
    untiled = Upscaler(net, tile=1024)(chest)
    # tile 64, overlap 16 on 77 x 131: the corner patch (77 x 80 px) fits, the next (77 x 83) does
    # not, so the failed pass has already written part of its output when it is abandoned
    wrapper = _OomAbove(net, limit=6200)
    tiles = _record_tiles(monkeypatch)
    out = Upscaler(wrapper, tile=64, overlap=16, min_tile=16)(chest)
    assert tiles == [64, 32]
    assert wrapper.patches[:2] == [(77, 80), (77, 83)]
    assert np.abs(out - untiled).max() < 1e-3


def test_oom_in_run_retries_down_to_the_tile_that_fits(monkeypatch):
    tiles: list[int] = []
    original = Upscaler._run

    def run(self, image, tile):
        tiles.append(tile)
        if tile > 64:
            raise torch.OutOfMemoryError("simulated")
        return original(self, image, tile)

    monkeypatch.setattr(Upscaler, "_run", run)
    net = Generator(TINY).eval()
    image = np.random.default_rng(1).random((40, 50), dtype=np.float32)
    out = Upscaler(net, tile=256, overlap=8)(image)
    assert tiles == [256, 128, 64]
    np.testing.assert_allclose(out, _direct(net, image), atol=1e-5)


def test_a_cudnn_allocation_failure_is_retried_like_an_oom(monkeypatch):
    """cuDNN reports a failed workspace allocation as a plain RuntimeError, not OutOfMemoryError."""
    tiles: list[int] = []
    original = Upscaler._run

    def run(self, image, tile):
        tiles.append(tile)
        if tile > 128:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")
        return original(self, image, tile)

    monkeypatch.setattr(Upscaler, "_run", run)
    net = Generator(TINY).eval()
    image = np.random.default_rng(2).random((30, 20), dtype=np.float32)
    out = Upscaler(net, tile=256, overlap=8)(image)
    assert tiles == [256, 128]
    np.testing.assert_allclose(out, _direct(net, image), atol=1e-5)


def test_oom_below_min_tile_raises_upscale_error_naming_the_tile(monkeypatch):
    tiles = _record_tiles(monkeypatch)
    up = Upscaler(_OomAbove(Generator(TINY), limit=0), tile=256, min_tile=32)
    with pytest.raises(UpscaleError, match="tile 32 px"):
        up(np.zeros((40, 40), np.float32))
    assert tiles == [256, 128, 64, 32]


def test_other_runtime_errors_are_not_retried(monkeypatch):
    calls = []

    def run(self, image, tile):
        calls.append(tile)
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(Upscaler, "_run", run)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Upscaler(Generator(TINY))(np.zeros((8, 8), np.float32))
    assert calls == [256]


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, numpy as np, torch
    from model.arch import ArchConfig, Generator
    from model.inference import Upscaler

    def hwm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    torch.set_num_threads(1)  # the machine may be busy; one thread is what a tile this small needs
    torch.manual_seed(0)
    net = Generator(ArchConfig(num_blocks=1, num_feat=8, num_grow=4, global_skip=True)).eval()
    image = np.random.default_rng(0).random((3000, 3000), dtype=np.float32)
    up = Upscaler(net, tile=128, overlap=16)
    up(image[:200, :200])  # warm up torch's allocator and kernels
    before = hwm_kib()
    out = up(image)
    after = hwm_kib()
    print(json.dumps({"before_kib": before, "after_kib": after, "shape": list(out.shape),
                      "finite": bool(np.isfinite(out).all())}))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_3000px_image_runs_in_bounded_memory():
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [12000, 12000] and result["finite"]
    growth = (result["after_kib"] - result["before_kib"]) * 1024
    output_bytes = 12000 * 12000 * 4
    print(f"VmHWM growth {growth / 2**20:.0f} MiB (output {output_bytes / 2**20:.0f} MiB)")
    # untiled, one 8-channel feature map at 12000² alone would be 4.3 GiB
    assert growth < output_bytes + 512 * 2**20  # measured: output + 26 MiB


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_fp32(checkpoint, chest):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
    cpu = Upscaler(load_generator(checkpoint, "cpu"), tile=32, overlap=16, precision="fp32")(chest)
    gpu_up = Upscaler(load_generator(checkpoint, "cuda"), tile=32, overlap=16, precision="bf16")
    assert gpu_up.dtype == torch.bfloat16
    gpu = gpu_up(chest)
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    diff = np.abs(gpu - cpu)
    assert diff.max() < 0.05 and diff.mean() < 5e-3


@pytest.mark.parametrize(
    ("device", "index", "gpus", "expected"),
    [
        ("auto", 0, 2, "cuda:0"), ("auto", 1, 2, "cuda:1"), ("cuda", 3, 2, "cuda:1"),  # one worker per GPU
        ("auto", 1, 1, "cuda"), ("cuda:1", 0, 2, "cuda:1"),  # one GPU; an explicit GPU is kept
        ("cpu", 1, 2, "cpu"), ("auto", 1, 0, "cpu"), ("cuda", 0, 0, "cuda"),  # (cuda without GPUs fails at load)
    ],
)
def test_each_worker_of_a_node_gets_its_own_gpu(device, index, gpus, expected):
    from model.inference import worker_device

    assert worker_device(device, index, gpus=gpus) == expected
