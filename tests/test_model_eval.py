"""``model eval``: the evaluation run, its files, the SSIM pin and LPIPS, on small real chest crops."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy.ndimage import gaussian_filter

from model import inference
from model.arch import ArchConfig, Generator
from model.checkpoint import ModelCard, save_checkpoint
from model.cli import model_group
from model.data import load_gray
from model.degrade import Degradation
from model.eval.lpips import AlexFeatures, GrayLpips, LpipsError
from model.eval.metrics import ssim
from model.eval.report import SEPARATOR_PX
from model.eval.run import evaluate, method_names

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr_png" / "nih"
TINY = ArchConfig(num_blocks=1, num_feat=8, num_grow=4, global_skip=True)
CROP = 256  # HR side of the test images: real chest X-ray crops, fast to score

pytestmark = pytest.mark.timeout(120)

if not (NIH / "test").is_dir():
    pytest.skip(f"the shared chest X-ray data is not at {NIH}", allow_module_level=True)


def tiny_checkpoint(path: Path, *, name: str = "tiny", residual: float = 0.0) -> Path:
    """A 1-block generator with a global bicubic skip; ``residual=0`` makes it exactly bicubic."""
    torch.manual_seed(0)
    net = Generator(TINY)
    if residual:
        torch.nn.init.constant_(net.conv_last.bias, residual)
    save_checkpoint(path, net, ModelCard(name=name, version="0", arch=TINY))
    return path


def _centre(img: np.ndarray, size: int) -> np.ndarray:
    y, x = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[y : y + size, x : x + size]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A split folder (train/val/test) of 256² centre crops of real NIH test images, 8-bit PNG."""
    root = tmp_path_factory.mktemp("cxr")
    sources = sorted((NIH / "test").glob("*.png"))[:3]
    for split in ("train", "val", "test"):
        (root / split).mkdir()
    for src in sources:
        with Image.open(src) as img:
            Image.fromarray(_centre(np.asarray(img.convert("L")), CROP)).save(root / "test" / src.name)
    Image.fromarray(np.zeros((CROP, CROP), np.uint8)).save(root / "train" / "00000001_000.png")
    return root


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory) -> tuple[Path, Path]:
    """Random-weight stand-ins with the real files' layouts (torchvision AlexNet; lpips alex.pth)."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(1)
    backbone = {**AlexFeatures().state_dict(), "classifier.1.weight": torch.zeros(4096, 9216)}
    torch.save(backbone, folder / "alexnet.pth")
    linear = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(linear, folder / "alex.pth")
    return folder / "alexnet.pth", folder / "alex.pth"


def test_zero_residual_checkpoint_equals_bicubic_and_files_have_their_shape(data, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "eval"
    metrics = evaluate([ckpt], data, out=out, tile=32, overlap=4)

    assert set(metrics) == {"degradation", "degradation_settings", "images", "split", "data", "methods"}
    assert (metrics["degradation"], metrics["images"], metrics["split"]) == ("paper", 3, "test")
    assert metrics["degradation_settings"] == {**asdict(Degradation()), "name": "paper"}
    assert metrics["data"] == str(data.resolve())
    assert list(metrics["methods"]) == ["bicubic", "tiny"]
    bicubic, tiny = metrics["methods"]["bicubic"], metrics["methods"]["tiny"]
    assert set(bicubic) == {"psnr_db", "ssim", "lpips", "hf_ratio", "s_per_image"}
    assert set(tiny) == set(bicubic) | {"checkpoint", "sha256", "parameters"}
    assert tiny["checkpoint"] == str(ckpt.resolve()) and len(tiny["sha256"]) == 64
    assert tiny["parameters"] == sum(p.numel() for p in Generator(TINY).parameters())
    assert tiny["psnr_db"] == pytest.approx(bicubic["psnr_db"], abs=1e-6)
    assert tiny["ssim"] == pytest.approx(bicubic["ssim"], abs=1e-9)
    assert 25 < bicubic["psnr_db"] < 60 and 0.5 < bicubic["ssim"] < 1
    assert bicubic["lpips"] is None and tiny["lpips"] is None  # no LPIPS files: null, not a number
    assert bicubic["s_per_image"] > 0 and tiny["s_per_image"] > 0

    assert json.loads((out / "metrics.json").read_text()) == metrics
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "method", "psnr_db", "ssim", "lpips", "hf_ratio", "s"]
    assert len(rows) == 3 * 2 and {r["method"] for r in rows} == {"bicubic", "tiny"}
    assert all(r["lpips"] == "" for r in rows)
    for name in {r["image"] for r in rows}:
        a, b = (float(r["psnr_db"]) for r in rows if r["image"] == name)
        assert a == pytest.approx(b, abs=1e-6)

    crops = sorted((out / "crops").glob("*.png"))
    assert [c.name for c in crops] == sorted({r["image"] for r in rows})
    with Image.open(crops[0]) as img:  # LR | bicubic | tiny | HR
        assert img.mode == "L" and img.size == (4 * 128 + 3 * SEPARATOR_PX, 128)
        panel = np.asarray(img)
    assert (panel[:, 128 : 128 + SEPARATOR_PX] == 255).all()
    assert np.array_equal(panel[:, 130:258], panel[:, 260:388])  # zero residual: SR crop == bicubic crop

    report = (out / "report.md").read_text()
    assert "| method | PSNR (dB) | ΔPSNR (dB) | SSIM | ΔSSIM | LPIPS |" in report
    assert "| tiny |" in report and "LPIPS: not computed" in report


def test_cli_eval_names_checkpoints_that_share_a_card_name(data, tmp_path):
    a = tiny_checkpoint(tmp_path / "a.safetensors")
    b = tiny_checkpoint(tmp_path / "b.safetensors", residual=0.02)  # a constant offset: worse PSNR
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(a), "--checkpoint", str(b), "--data", str(data), "--limit", "1",
            "--out", str(out), "--crops", "1", "--no-progress", "--tile", "64"]
    result = CliRunner().invoke(model_group, args)
    assert result.exit_code == 0, result.output
    assert "| tiny (a) |" in result.stdout and "| tiny (b) |" in result.stdout
    methods = json.loads((out / "metrics.json").read_text())["methods"]
    assert list(methods) == ["bicubic", "tiny (a)", "tiny (b)"]
    assert methods["tiny (b)"]["psnr_db"] < methods["tiny (a)"]["psnr_db"] - 1
    with Image.open(next((out / "crops").glob("*.png"))) as img:
        assert img.size == (5 * 128 + 4 * SEPARATOR_PX, 128)


def test_method_names_fall_back_to_folders_when_stems_match():
    cards = [(Path("/r/a/best.safetensors"), "m"), (Path("/r/b/best.safetensors"), "m"),
             (Path("/r/c.safetensors"), "other"), (Path("/r/bicubic.safetensors"), "bicubic")]
    assert method_names(cards) == ["m (a/best)", "m (b/best)", "other", "bicubic (bicubic)"]


def test_eval_without_default_checkpoint_says_so(data, tmp_path, monkeypatch):
    missing = tmp_path / "weights" / "cxr-sr-cpu.safetensors"
    monkeypatch.setattr(inference, "DEFAULT_CHECKPOINT", missing)
    result = CliRunner().invoke(model_group, ["eval", "--data", str(data), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "default checkpoint" in result.output and str(missing) in result.output
    assert "does not exist" in result.output and "--checkpoint" in result.output
    assert not (tmp_path / "o").exists()


def test_lowdose_degradation_scores_bicubic_lower_than_paper(data, tmp_path):
    flat = tmp_path / "flat"  # a folder without split subfolders: every image is evaluated
    flat.mkdir()
    for src in sorted((data / "test").glob("*.png"))[:2]:
        (flat / src.name).write_bytes(src.read_bytes())
    paper = evaluate([], flat, degradation="paper")
    lowdose = evaluate([], flat, degradation="lowdose")
    assert paper["split"] == "all" and paper["images"] == 2 and list(paper["methods"]) == ["bicubic"]
    assert lowdose["degradation"] == "lowdose"
    assert lowdose["methods"]["bicubic"]["psnr_db"] < paper["methods"]["bicubic"]["psnr_db"] - 1
    again = evaluate([], flat, degradation="lowdose")  # seeded per image: the same noise every run
    assert again["methods"]["bicubic"]["psnr_db"] == lowdose["methods"]["bicubic"]["psnr_db"]


def test_cli_eval_at_a_chosen_dose(data, tmp_path):
    """--dose-scale sets the low-dose setting: fewer photons, more noise, lower bicubic scores; the
    setting is printed and kept in metrics.json; a dose for the noise-free degradation is refused."""
    scores = {}
    for dose in ("500", "20000"):
        out = tmp_path / dose
        args = ["eval", "--bicubic-only", "--data", str(data), "--degradation", "lowdose", "--dose-scale", dose,
                "--limit", "2", "--out", str(out), "--crops", "0", "--no-progress"]
        result = CliRunner().invoke(model_group, args)
        assert result.exit_code == 0, result.output
        assert f"degradation lowdose (dose scale {dose}, read noise 0.004)" in result.stdout
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["degradation_settings"]["dose_scale"] == float(dose)
        assert f"dose scale {dose}" in (out / "report.md").read_text()
        scores[dose] = metrics["methods"]["bicubic"]["psnr_db"]
    assert scores["500"] < scores["20000"] - 3
    mixed = CliRunner().invoke(model_group, ["eval", "--bicubic-only", "--data", str(data), "--degradation", "mixed",
                                             "--limit", "2", "--out", str(tmp_path / "m"), "--crops", "0", "--no-progress"])
    assert mixed.exit_code == 0, mixed.output
    assert "degradation mixed (dose scale 1000 to 100000, read noise up to 0.006)" in mixed.stdout
    refused = CliRunner().invoke(model_group, ["eval", "--bicubic-only", "--data", str(data), "--dose-scale", "500",
                                               "--out", str(tmp_path / "p"), "--no-progress"])
    assert refused.exit_code == 1 and "not to paper" in refused.output
    assert not (tmp_path / "p").exists()


def test_ssim_agrees_with_pytorch_msssim_on_a_chest_crop():
    from pytorch_msssim import ssim as torch_ssim

    hr = _centre(load_gray(sorted((NIH / "test").glob("*.png"))[0]), 256).astype(np.float64)
    blurred = gaussian_filter(hr, 1.5)
    border = 4  # metrics.ssim crops 4 px; pytorch-msssim averages over the valid 11×11 positions,
    ours = ssim(blurred, hr, border=border)  # as skimage does, so the same pixels count
    a, b = (torch.from_numpy(x[border:-border, border:-border]).float()[None, None] for x in (blurred, hr))
    reference = float(torch_ssim(a, b, data_range=1.0, win_size=11, win_sigma=1.5, K=(0.01, 0.03)))
    assert 0.5 < ours < 0.99
    assert ours == pytest.approx(reference, abs=1e-4)
    assert ssim(hr, hr) == pytest.approx(1.0, abs=1e-12)


def test_lpips_from_files(lpips_files, data, tmp_path):
    metric = GrayLpips(backbone=lpips_files[0], linear=lpips_files[1])
    hr = load_gray(sorted((data / "test").glob("*.png"))[0])
    assert metric(hr, hr) == 0.0
    d = metric(gaussian_filter(hr, 2.0), hr)
    assert math.isfinite(d) and d > 0

    metrics = evaluate([], data, limit=1, lpips_files=lpips_files, out=tmp_path / "o", crops=0)
    assert math.isfinite(metrics["methods"]["bicubic"]["lpips"]) and metrics["methods"]["bicubic"]["lpips"] > 0
    assert "LPIPS: AlexNet v0.1" in (tmp_path / "o" / "report.md").read_text()

    with pytest.raises(LpipsError, match="lacks tensor 'features.0.weight'"):
        GrayLpips(backbone=lpips_files[1], linear=lpips_files[1])
    with pytest.raises(LpipsError, match="lacks tensor 'lin0.model.1.weight'"):
        GrayLpips(backbone=lpips_files[0], linear=lpips_files[0])
    with pytest.raises(LpipsError, match="does not exist"):
        GrayLpips(backbone=tmp_path / "nope.pth", linear=lpips_files[1])


def test_cli_lpips_options_go_together(data, lpips_files, tmp_path):
    args = ["eval", "--bicubic-only", "--data", str(data), "--lpips-backbone", str(lpips_files[0])]
    result = CliRunner().invoke(model_group, args)
    assert result.exit_code == 2 and "--lpips-backbone and --lpips-linear go together" in result.output


def test_band_limit_keeps_the_band_and_removes_the_rest():
    from model.eval.headroom import band_limit

    y, x = np.mgrid[0:64, 0:64]
    low = np.cos(2 * np.pi * 4 * x / 64)  # 4 cycles: 0.0625 cycles/px, inside a quarter band
    high = np.cos(2 * np.pi * 24 * y / 64)  # 0.375 cycles/px: outside a quarter band, inside the full one
    img = (low + high).astype(np.float32)
    np.testing.assert_allclose(band_limit(img, 1 / 4), low, atol=1e-5)
    np.testing.assert_allclose(band_limit(img, 1.0), img, atol=1e-5)
    with pytest.raises(ValueError, match="fraction"):
        band_limit(img, 0)


def test_headroom_bicubic_row_equals_eval_and_oracles_are_ordered(data, tmp_path):
    result = json.loads(CliRunner().invoke(model_group, ["headroom", "--data", str(data), "--json"],
                                           catch_exceptions=False).output)
    m = result["methods"]
    assert result["images"] == 3 and m["bicubic"]["delta_ssim"] == 0
    evaluated = evaluate([], data, out=tmp_path / "e", crops=0, progress=False)["methods"]["bicubic"]
    assert m["bicubic"]["psnr_db"] == pytest.approx(evaluated["psnr_db"], abs=1e-3)
    assert m["bicubic"]["ssim"] == pytest.approx(evaluated["ssim"], abs=1e-4)
    # less blur is closer to HR; keeping half the band beats keeping the LR quarter
    assert m["blur_sigma_0.5"]["ssim"] > m["blur_sigma_0.7"]["ssim"] > m["blur_sigma_1"]["ssim"]
    assert m["lowpass_half_band"]["psnr_db"] > m["lowpass_lr_band"]["psnr_db"]


def test_ssim_map_and_local_std_are_what_ssim_averages():
    from model.eval.metrics import local_std, ssim_map

    rng = np.random.default_rng(3)
    hr = rng.random((64, 80)).astype(np.float32)
    sr = np.clip(hr + rng.normal(0, 0.05, hr.shape), 0, 1).astype(np.float32)
    local = ssim_map(sr, hr)
    assert local.shape == (64 - 8 - 10, 80 - 8 - 10)  # 4 px border, then the 11-px window's rim
    assert float(local.mean()) == pytest.approx(ssim(sr, hr), abs=1e-12)
    flat = np.full((64, 80), 0.5, np.float32)
    flat[:, 40:] = 0.7  # a step: no texture far from it, std 0.1 across it
    std = local_std(flat)
    assert std.shape == local.shape
    assert std[:, :10].max() < 1e-6 and std[:, 28:34].max() == pytest.approx(0.1, abs=0.005)


def test_headroom_scores_a_checkpoint_and_splits_ssim_by_texture(data, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors", name="tiny", residual=0.02)
    out = CliRunner().invoke(model_group, ["headroom", "--data", str(data), "--checkpoint", str(ckpt), "--json"],
                             catch_exceptions=False).output
    result = json.loads(out)
    m, texture = result["methods"], result["texture"]
    assert list(m)[-1] == "tiny"
    evaluated = evaluate([ckpt], data, out=None, crops=0, progress=False, precision="fp32")["methods"]["tiny"]
    assert m["tiny"]["ssim"] == pytest.approx(evaluated["ssim"], abs=1e-4)
    assert m["tiny"]["delta_ssim"] < 0  # a constant offset of 0.02 costs SSIM
    assert texture["bins"] == ["0-1", "1-2", "2-4", "4-8", ">=8"]
    assert sum(texture["pixel_share"]) == pytest.approx(1, abs=1e-3)
    for name, row in texture["methods"].items():  # each row adds up to the method's ΔSSIM
        assert sum(row["delta_ssim_share"]) == pytest.approx(m[name]["delta_ssim"], abs=2e-4), name
    assert texture["methods"]["bicubic"]["delta_ssim_share"] == [0] * 5
    # the oracles win most of their SSIM where HR has texture, not where it is flat
    blur = texture["methods"]["blur_sigma_1"]["delta_ssim_share"]
    assert max(blur) > 0 and blur[0] <= max(blur) / 10
    text = CliRunner().invoke(model_group, ["headroom", "--data", str(data), "--checkpoint", str(ckpt)]).output
    assert "Where SSIM is won" in text and "| tiny |" in text and "| pixel share |" in text


def test_eval_keeps_same_named_images_of_two_folders_apart_and_drops_stale_crops(data, tmp_path):
    flat = tmp_path / "sites"
    for site, src in zip(("siteA", "siteB"), sorted((data / "test").glob("*.png")), strict=False):
        (flat / site).mkdir(parents=True)
        (flat / site / "img.png").write_bytes(src.read_bytes())
    out = tmp_path / "eval"
    (out / "crops").mkdir(parents=True)
    (out / "crops" / "from-an-earlier-run.png").write_bytes(b"x")
    result = CliRunner().invoke(model_group, ["eval", "--bicubic-only", "--data", str(flat), "--out", str(out),
                                              "--no-progress"])
    assert result.exit_code == 0, result.output
    with open(out / "per_image.csv", newline="") as f:
        assert [r["image"] for r in csv.DictReader(f)] == ["siteA/img.png", "siteB/img.png"]
    assert sorted(p.name for p in (out / "crops").iterdir()) == ["siteA__img.png", "siteB__img.png"]
    result = CliRunner().invoke(model_group, ["eval", "--bicubic-only", "--data", str(flat), "--out", str(out),
                                              "--crops", "0", "--no-progress"])
    assert result.exit_code == 0 and "crops/" not in result.output
    assert not list((out / "crops").iterdir())


def test_eval_survives_an_image_it_reconstructs_exactly_and_names_bad_ones(data, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(folder / "constant.png")  # bicubic is exact
    (folder / "chest.png").write_bytes(sorted((data / "test").glob("*.png"))[0].read_bytes())
    out = tmp_path / "eval"
    result = CliRunner().invoke(model_group, ["eval", "--bicubic-only", "--data", str(folder), "--out", str(out),
                                              "--no-progress"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())  # valid JSON: no Infinity
    assert metrics["methods"]["bicubic"]["psnr_db"] is None and metrics["methods"]["bicubic"]["ssim"] > 0.9
    assert "| bicubic | — |" in (out / "report.md").read_text()
    headroom = CliRunner().invoke(model_group, ["headroom", "--data", str(folder), "--json"])
    assert headroom.exit_code == 0 and json.loads(headroom.output)["methods"]["bicubic"]["psnr_db"] is None
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(folder / "tiny.png")
    result = CliRunner().invoke(model_group, ["eval", "--bicubic-only", "--data", str(folder), "--out", str(out)])
    assert result.exit_code == 1 and "tiny.png is 3x3 px: too small" in result.output
    assert "Traceback" not in result.output


def test_eval_refuses_a_data_folder_with_only_some_split_folders(data, tmp_path):
    partial = tmp_path / "partial"
    for split in ("train", "val"):
        (partial / split).mkdir(parents=True)
        (partial / split / "a.png").write_bytes(sorted((data / "test").glob("*.png"))[0].read_bytes())
    result = CliRunner().invoke(model_group, ["eval", "--bicubic-only", "--data", str(partial),
                                              "--out", str(tmp_path / "e")])
    assert result.exit_code == 1 and "has train/, val/ but no test/" in result.output
