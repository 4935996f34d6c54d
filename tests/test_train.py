"""``model.train``: a tiny two-stage run on CPU, its files, resume, the GAN stage, config and CLI."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from model.checkpoint import load_checkpoint, read_card
from model.cli import model_group
from model.degrade import Degradation
from model.train.config import load_config
from model.train.loop import Trainer, train

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr_png" / "nih"
REPO = Path(__file__).resolve().parents[1]
CROP = 256

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """train/val/test folders of 256² centre crops of real NIH images (3 / 2 / 2), 8-bit PNG."""
    if not (NIH / "train").is_dir():
        pytest.skip(f"shared chest X-ray data not at {NIH}")
    root = tmp_path_factory.mktemp("cxr")
    for split, count in (("train", 3), ("val", 2), ("test", 2)):
        (root / split).mkdir()
        for src in sorted((NIH / split).glob("*.png"))[:count]:
            with Image.open(src) as img:
                w, h = img.size
                left, top = (w - CROP) // 2, (h - CROP) // 2
                img.convert("L").crop((left, top, left + CROP, top + CROP)).save(root / split / src.name)
    return root


def write_config(path: Path, data_root: Path, out_dir: Path, *, psnr: dict | None = None, gan: dict | None = None,
                 extra: str = "", device: str = "cpu", log_every: int = 1) -> Path:
    def table(name: str, values: dict) -> str:
        return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())

    text = (
        f'name = "tiny-test"\nversion = "0.0.1"\nout_dir = {json.dumps(str(out_dir))}\n'
        f'seed = 0\ndevice = "{device}"\nval_every = 1\nsave_every = 1\nlog_every = {log_every}\n'
        + extra
        + table("arch", {"attention": "csa", "num_blocks": 1, "num_feat": 8, "num_grow": 4, "global_skip": True})
        + table("data", {"root": str(data_root), "hr_crop": 64, "batch_size": 2})
        + table("psnr", {"iterations": 2, "lr": 2e-4} | (psnr or {}))
        + (table("gan", gan) if gan else "")
    )
    path.write_text(text)
    return path


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def loss_lines(log: list[dict]) -> list[dict]:
    return [r for r in log if "loss" in r]


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory) -> Path:
    """Two PSNR iterations straight through."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    cfg = load_config(write_config(tmp / "tiny.toml", data_root, out))
    result = train(cfg, progress=False)
    assert result == out / "last.safetensors"
    return out


def test_two_iterations_write_state_log_and_checkpoints(finished_run):
    out = finished_run
    assert (out / "state.pt").is_file()
    log = read_log(out)
    losses = loss_lines(log)
    assert [r["iteration"] for r in losses] == [1, 2]
    assert all(r["stage"] == "psnr" and math.isfinite(r["loss"]) and r["l_pix"] > 0 for r in losses)
    vals = [r for r in log if "val_psnr_db" in r]
    assert [r["iteration"] for r in vals] == [1, 2]
    assert all(25 < r["val_psnr_db"] < 60 and 0 < r["val_ssim"] <= 1 for r in vals)

    last = read_card(out / "last.safetensors")
    assert last.iterations == 2 and last.name == "tiny-test"
    assert 25 < last.metrics["val"]["val_psnr_db"] < 60
    assert last.training["train_images"] == 3 and last.training["val_images"] == 2
    assert last.degradation["name"] == "paper" and last.arch.num_feat == 8

    best = read_card(out / "best.safetensors")
    k = best.metrics["selected_at_iteration"]
    assert best.iterations == k in (1, 2)
    assert best.metrics["val"]["val_psnr_db"] == max(r["val_psnr_db"] for r in vals)
    net, _ = load_checkpoint(out / "last.safetensors")  # sha256 and strict loading pass
    assert sum(p.numel() for p in net.parameters()) == last.training["parameters"]


def test_stopped_run_resumes_exactly_where_it_stopped(finished_run, data_root, tmp_path):
    out = tmp_path / "out"
    cfg = load_config(write_config(tmp_path / "tiny.toml", data_root, out))
    stopped = train(cfg, max_minutes=1e-9, progress=False)  # deadline passes after one iteration
    assert stopped == out / "state.pt"
    assert not (out / "last.safetensors").exists()
    assert [r["iteration"] for r in loss_lines(read_log(out))] == [1]

    assert train(cfg, progress=False) == out / "last.safetensors"
    log = read_log(out)
    assert [r["iteration"] for r in loss_lines(log)] == [1, 2]  # 2 follows 1; 1 is not run twice
    assert read_card(out / "last.safetensors").iterations == 2
    # same weights as the run that went straight through: every random state was restored
    resumed, straight = load_file(out / "last.safetensors"), load_file(finished_run / "last.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)
    assert loss_lines(log)[1]["loss"] == loss_lines(read_log(finished_run))[1]["loss"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on CPU needs a C compiler (apt-get install -y gcc g++)")
def test_compiled_training_writes_the_same_kind_of_checkpoint(data_root, tmp_path):
    """compile = true trains through torch.compile (needs a C compiler on CPU); the checkpoint holds
    the plain module's keys, so it loads strictly like any other."""
    out = tmp_path / "out"
    cfg = load_config(write_config(tmp_path / "c.toml", data_root, out, extra="compile = true\n"))
    assert train(cfg, progress=False) == out / "last.safetensors"
    assert all(math.isfinite(r["loss"]) for r in loss_lines(read_log(out)))
    plain = tmp_path / "plain"
    train(load_config(write_config(tmp_path / "p.toml", data_root, plain)), progress=False)
    assert load_file(out / "last.safetensors").keys() == load_file(plain / "last.safetensors").keys()
    net, card = load_checkpoint(out / "last.safetensors")
    assert card.iterations == 2


@pytest.mark.gpu
def test_cuda_run_with_amp_stops_and_resumes(data_root, tmp_path):
    """The paper config trains on CUDA in slices: a stopped bf16 run must resume there (its saved CPU
    RNG state once came back as a CUDA tensor and the resume failed)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
    out = tmp_path / "out"
    cfg = load_config(write_config(tmp_path / "cuda.toml", data_root, out, extra="amp = true\n", device="cuda"))
    assert train(cfg, max_minutes=1e-9, progress=False) == out / "state.pt"
    assert train(cfg, progress=False) == out / "last.safetensors"
    assert [r["iteration"] for r in loss_lines(read_log(out))] == [1, 2]
    card = read_card(out / "last.safetensors")
    assert card.iterations == 2 and card.training["device"].startswith("cuda")
    assert 25 < card.metrics["val"]["val_psnr_db"] < 60
    # a resumed optimiser is the fused CUDA Adam with its whole state on the GPU (a non-fused Adam
    # with step counters on the GPU synchronised once per parameter per step)
    resumed = Trainer(cfg, progress=False)
    assert resumed.load_state()
    states = list(resumed.opt.state.values())
    assert resumed.opt.param_groups[0]["fused"] and len(states) == len(list(resumed.net.parameters()))
    assert all(s["step"].device.type == "cuda" and s["exp_avg"].device.type == "cuda" for s in states)


@pytest.mark.gpu
def test_cuda_training_through_cuda_graphs_writes_a_plain_checkpoint(data_root, tmp_path):
    """compile_mode = "reduce-overhead" (torch.compile with CUDA graphs, for the launch-bound paper
    config) trains on CUDA and saves the plain module's weights, loadable strictly."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
    out = tmp_path / "out"
    extra = 'amp = true\ncompile = true\ncompile_mode = "reduce-overhead"\n'
    cfg = load_config(write_config(tmp_path / "g.toml", data_root, out, extra=extra, device="cuda"))
    assert train(cfg, progress=False) == out / "last.safetensors"
    assert all(math.isfinite(r["loss"]) for r in loss_lines(read_log(out)))
    net, card = load_checkpoint(out / "last.safetensors")
    assert card.iterations == 2


def test_compile_without_a_c_compiler_says_what_to_do(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    cfg = load_config(write_config(tmp_path / "c.toml", data_root, tmp_path / "out", extra="compile = true\n"))
    with pytest.raises(ValueError, match="needs a C compiler.*compile=false"):
        Trainer(cfg, progress=False)


def test_cli_train_reports_a_missing_data_folder_without_a_traceback(data_root, tmp_path):
    path = write_config(tmp_path / "c.toml", data_root, tmp_path / "out")
    result = CliRunner().invoke(model_group, ["train", str(path), "--set", f"data.root={tmp_path / 'nope'}"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "image folder" in result.output and "does not exist" in result.output and "data.root" in result.output


def test_an_unknown_compile_mode_is_refused(data_root, tmp_path):
    path = write_config(tmp_path / "c.toml", data_root, tmp_path / "out", extra='compile_mode = "fast"\n')
    with pytest.raises(ValueError, match="compile_mode 'fast'.*reduce-overhead"):
        load_config(path)


def test_losses_are_read_only_when_logged_and_time_still_adds_up(data_root, tmp_path):
    """Steps hand back device tensors; the loop reads them every log_every iterations and at the
    end, so the log has plain numbers there and nowhere else."""
    out = tmp_path / "out"
    cfg = load_config(write_config(tmp_path / "l.toml", data_root, out, psnr={"iterations": 5}, log_every=2))
    train(cfg, progress=False)
    lines = loss_lines(read_log(out))
    assert [r["iteration"] for r in lines] == [2, 4, 5]
    assert all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in lines)
    assert 0 < lines[0]["elapsed_s"] <= lines[1]["elapsed_s"] <= lines[2]["elapsed_s"]  # rounded to 0.01 s


def test_ema_update_is_the_per_parameter_lerp(data_root, tmp_path):
    trainer = Trainer(load_config(write_config(tmp_path / "e.toml", data_root, tmp_path / "out")), progress=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainer.net.parameters():
            p.add_(torch.randn_like(p))
    before = [e.clone() for e in trainer.ema.parameters()]
    trainer.iteration = 10**6  # past the warm-up, so the decay is the config's 0.999
    trainer._update_ema()
    for old, e, p in zip(before, trainer.ema.parameters(), trainer.net.parameters(), strict=True):
        torch.testing.assert_close(e, old + (p - old) * (1 - 0.999))


def test_more_iterations_continue_a_finished_run(data_root, tmp_path):
    out = tmp_path / "out"
    train(load_config(write_config(tmp_path / "a.toml", data_root, out, psnr={"iterations": 1})), progress=False)
    assert read_card(out / "last.safetensors").iterations == 1
    train(load_config(write_config(tmp_path / "b.toml", data_root, out, psnr={"iterations": 2})), progress=False)
    assert [r["iteration"] for r in loss_lines(read_log(out))] == [1, 2]
    assert read_card(out / "last.safetensors").iterations == 2


def test_resume_with_another_config_is_refused_naming_what_differs(data_root, tmp_path):
    out = tmp_path / "out"
    path = write_config(tmp_path / "a.toml", data_root, out, psnr={"iterations": 4})
    assert train(load_config(path), max_minutes=1e-9, progress=False) == out / "state.pt"
    before = (out / "state.pt").read_bytes()
    result = CliRunner().invoke(model_group, ["train", str(path), "--set", "psnr.lr=0.01", "--set", "seed=5"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "psnr.lr: 0.0002 -> 0.01" in result.output and "seed: 0 -> 5" in result.output
    assert "another out_dir" in result.output
    assert (out / "state.pt").read_bytes() == before  # nothing trained, nothing overwritten
    # what may change on resume (a longer schedule, how often it validates) still resumes
    ok = CliRunner().invoke(model_group, ["train", str(path), "--set", "psnr.iterations=5", "--set", "val_every=2",
                                          "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert [r["iteration"] for r in loss_lines(read_log(out))] == [1, 2, 3, 4, 5]


def test_a_damaged_state_file_is_named_without_a_traceback(data_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "state.pt").write_bytes(b"garbage\n")
    path = write_config(tmp_path / "a.toml", data_root, out)
    result = CliRunner().invoke(model_group, ["train", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "state.pt cannot be read as a training state" in result.output and "delete it" in result.output


def test_a_bad_perceptual_source_fails_before_the_psnr_stage(data_root, tmp_path):
    out = tmp_path / "out"
    path = write_config(tmp_path / "a.toml", data_root, out, psnr={"iterations": 2},
                        gan={"iterations": 2, "perceptual": str(tmp_path / "vgg19.pth")})
    result = CliRunner().invoke(model_group, ["train", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "gan.perceptual" in result.output and "vgg19.pth" in result.output
    assert not (out / "log.jsonl").exists()  # refused before the first iteration
    bad_layer = write_config(tmp_path / "b.toml", data_root, out, psnr={"iterations": 2},
                             gan={"iterations": 2, "perceptual": "random_vgg19", "perceptual_layer": "conv9"})
    result = CliRunner().invoke(model_group, ["train", str(bad_layer)])
    assert result.exit_code == 1 and "conv9" in result.output and "Traceback" not in result.output


def test_gan_stage_logs_its_losses_and_resumes(data_root, tmp_path):
    out = tmp_path / "out"
    gan = {"iterations": 2, "perceptual": "random_vgg19", "perceptual_layer": "conv2_2", "disc_feat": 8}
    cfg = load_config(write_config(tmp_path / "gan.toml", data_root, out, psnr={"iterations": 1}, gan=gan))
    assert train(cfg, max_minutes=1e-9, progress=False).name == "state.pt"  # after the PSNR iteration
    assert train(cfg, max_minutes=1e-9, progress=False).name == "state.pt"  # after GAN iteration 2
    assert torch.load(out / "state.pt", weights_only=False)["disc"] is not None
    assert train(cfg, progress=False).name == "last.safetensors"  # GAN iteration 3, discriminator resumed

    losses = loss_lines(read_log(out))
    assert [(r["iteration"], r["stage"]) for r in losses] == [(1, "psnr"), (2, "gan"), (3, "gan")]
    assert "l_adv" not in losses[0]
    for r in losses[1:]:
        assert all(math.isfinite(r[k]) for k in ("l_pix", "l_percep", "l_adv", "l_d"))
        assert r["l_percep"] > 0 and r["l_d"] > 0
    card = read_card(out / "last.safetensors")
    assert card.iterations == 3
    assert card.training["gan_stage"]["perceptual"] == "random_vgg19"
    assert card.training["stages"] == {"psnr_iterations": 1, "gan_iterations": 2}


def test_l1_ssim_pixel_loss(data_root, tmp_path):
    out = tmp_path / "out"
    psnr = {"iterations": 1, "pixel_loss": "l1_ssim", "ssim_weight": 1.0}
    cfg = load_config(write_config(tmp_path / "ssim.toml", data_root, out, psnr=psnr))
    trainer = Trainer(cfg, progress=False)
    from pytorch_msssim import ssim as torch_ssim

    hr = torch.rand(2, 1, 64, 64)
    sr = (hr + 0.1 * torch.randn_like(hr)).clamp(0, 1)
    expected = F.l1_loss(sr, hr) + (1 - torch_ssim(sr, hr, data_range=1.0))
    loss = trainer._pixel_loss(sr, hr)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() > F.l1_loss(sr, hr).item() + 0.02  # the SSIM term (here ~0.05) is really added
    assert trainer.run() == out / "last.safetensors"
    assert math.isfinite(loss_lines(read_log(out))[0]["loss"])


def test_load_config_rejects_unknown_keys_by_name(data_root, tmp_path):
    path = write_config(tmp_path / "typo.toml", data_root, tmp_path / "out", extra="epochs = 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epochs'\]"):
        load_config(path)
    path = write_config(tmp_path / "typo2.toml", data_root, tmp_path / "out", psnr={"iters": 3})
    with pytest.raises(ValueError, match=r"psnr: unknown key\(s\) \['iters'\]"):
        load_config(path)
    path = write_config(tmp_path / "bad.toml", data_root, tmp_path / "out", psnr={"pixel_loss": "l2"})
    with pytest.raises(ValueError, match="pixel_loss.*'l2'"):
        load_config(path)


def test_load_config_keeps_a_named_degradation_s_defaults_under_the_given_keys(data_root, tmp_path):
    path = write_config(tmp_path / "m.toml", data_root, tmp_path / "out",
                        extra='[degradation]\nname = "mixed"\ndose_max = 50000.0\n')
    deg = load_config(path).degradation
    assert (deg.name, deg.dose_scale, deg.dose_max, deg.read_noise) == ("mixed", 1000.0, 50000.0, 0.006)
    assert load_config(path, {"degradation.name": "lowdose"}).degradation.dose_scale == 2000.0
    with pytest.raises(ValueError, match="degradation.*dose_max"):
        load_config(path, {"degradation.dose_scale": 80000.0})


def test_load_config_applies_dotted_overrides(data_root, tmp_path):
    path = write_config(tmp_path / "ok.toml", data_root, tmp_path / "out")
    cfg = load_config(path, {"psnr.iterations": 7, "arch.attention": "none", "seed": 3})
    assert cfg.psnr.iterations == 7 and cfg.arch.attention == "none" and cfg.seed == 3
    assert cfg.arch.num_feat == 8 and cfg.data.hr_crop == 64
    with pytest.raises(ValueError, match="attention"):
        load_config(path, {"arch.attention": "cbam"})


def test_cli_train_with_set_override(data_root, tmp_path):
    out = tmp_path / "out"
    path = write_config(tmp_path / "cli.toml", data_root, out, psnr={"iterations": 5})
    proc = subprocess.run(
        [sys.executable, "-m", "model.cli", "train", str(path), "--set", "psnr.iterations=1",
         "--threads", "1", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "finished" in proc.stdout and str(out / "last.safetensors") in proc.stdout
    assert read_card(out / "last.safetensors").iterations == 1  # --set won over the file's 5


def test_cli_train_names_a_bad_override(data_root, tmp_path):
    path = write_config(tmp_path / "cli.toml", data_root, tmp_path / "out")
    result = CliRunner().invoke(model_group, ["train", str(path), "--set", "psnr.itrations=1"])
    assert result.exit_code != 0
    assert "itrations" in result.output
    result = CliRunner().invoke(model_group, ["train", str(path), "--set", "psnr.iterations"])
    assert result.exit_code != 0 and "KEY=VALUE" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("degradation", ["paper", "mixed"])
def test_validation_scores_what_model_eval_scores(data_root, tmp_path, degradation):
    """A global-skip net starts exactly at bicubic, so the trainer's first validation equals `model
    eval`'s bicubic row on the same images: the same LR seeds, SR quantised to the image's levels
    like a saved image, the same metrics. (Unquantised, it read ~0.06 dB / 0.001 SSIM higher.)
    A config naming only ``mixed`` gets the named setting's dose range, as eval does."""
    from model.eval.run import EvalConfig, run

    extra = f'[degradation]\nname = "{degradation}"\n'
    trainer = Trainer(load_config(write_config(tmp_path / "v.toml", data_root, tmp_path / "out", extra=extra)),
                      progress=False)
    assert trainer.config.degradation == Degradation.named(degradation)
    scores = trainer.validate()
    bicubic = run(EvalConfig(data=data_root, split="val", crops=0, device="cpu", degradation=degradation))
    bicubic = bicubic["methods"]["bicubic"]
    assert scores["val_psnr_db"] == pytest.approx(bicubic["psnr_db"], abs=1e-4)
    assert scores["val_ssim"] == pytest.approx(bicubic["ssim"], abs=1e-6)


def test_model_eval_seed_reproduces_a_seeded_run_s_validation(data_root, tmp_path):
    """The low-dose and dose-blind fine-tunes validate with seed 1: `model eval --seed 1` sees their LR."""
    extra = '[degradation]\nname = "lowdose"\n'
    cfg = load_config(write_config(tmp_path / "v.toml", data_root, tmp_path / "out", extra=extra), {"seed": 1})
    scores = Trainer(cfg, progress=False).validate()
    runs = {}
    for seed in (1, 0):
        out = tmp_path / f"eval{seed}"
        result = CliRunner().invoke(model_group, ["eval", "--bicubic-only", "--data", str(data_root), "--split", "val",
                                                  "--degradation", "lowdose", "--seed", str(seed), "--crops", "0",
                                                  "--device", "cpu", "--out", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
        runs[seed] = json.loads((out / "metrics.json").read_text())["methods"]["bicubic"]
    assert scores["val_psnr_db"] == pytest.approx(runs[1]["psnr_db"], abs=1e-4)
    assert runs[0]["psnr_db"] != pytest.approx(runs[1]["psnr_db"], abs=1e-4)  # the seed is what made them equal


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "model" / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_its_generator(path):
    """A typo in a shipped config would only show when a researcher starts a long run."""
    from model.arch import Generator, count_parameters

    cfg = load_config(path)
    assert cfg.name and cfg.total_iterations > 0
    assert count_parameters(Generator(cfg.arch)) > 0


def test_resume_refuses_a_schedule_that_ends_before_the_state(data_root, tmp_path):
    out = tmp_path / "out"
    gan = {"iterations": 2, "perceptual": "random_vgg19", "perceptual_layer": "conv2_2", "disc_feat": 8}
    path = write_config(tmp_path / "a.toml", data_root, out, psnr={"iterations": 3}, gan=gan)
    train(load_config(path, {"save_every": 1, "val_every": 10}), max_minutes=1e-9, progress=False)
    train(load_config(path, {"save_every": 1, "val_every": 10}), max_minutes=1e-9, progress=False)
    assert torch.load(out / "state.pt", weights_only=False)["iteration"] == 2  # in the PSNR stage
    before = (out / "state.pt").read_bytes()
    result = CliRunner().invoke(model_group, ["train", str(path), "--set", "psnr.iterations=1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "at iteration 2 of the PSNR stage" in result.output and "psnr.iterations >= 2" in result.output
    assert (out / "state.pt").read_bytes() == before
    train(load_config(path), progress=False)  # to the end: 3 PSNR + 2 GAN
    for args, says in ((["psnr.iterations=2"], "keep psnr.iterations = 3"),
                       (["gan.iterations=1"], "set gan.iterations >= 2")):
        result = CliRunner().invoke(model_group, ["train", str(path), *sum((["--set", a] for a in args), [])])
        assert result.exit_code == 1 and says in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("override", "says"), [
    ("val_every=0", "val_every must be >= 1"),
    ("data.batch_size=0", "batch_size must be >= 1"),
    ("data.hr_crop=abc", "hr_crop must be an integer, got 'abc'"),
    ("psnr.iterations=2.5", "iterations must be an integer, got 2.5"),
    ("psnr.lr=-1", "lr must be > 0"),
    ("amp=1", "amp must be true or false"),
])
def test_cli_train_refuses_bad_values_by_key(data_root, tmp_path, override, says):
    path = write_config(tmp_path / "cli.toml", data_root, tmp_path / "out")
    result = CliRunner().invoke(model_group, ["train", str(path), "--set", override])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert says in result.output
    assert not (tmp_path / "out").exists()


def test_training_without_validation_images_is_refused_before_it_starts(data_root, tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
    for src in sorted((data_root / "train").glob("*.png")):
        (root / "train" / src.name).write_bytes(src.read_bytes())
    path = write_config(tmp_path / "a.toml", root, tmp_path / "out")
    result = CliRunner().invoke(model_group, ["train", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"no val images in {root}: {root / 'val'} is empty" in result.output
    assert not (tmp_path / "out" / "log.jsonl").exists()
    (root / "val" / "broken.png").write_bytes(b"\x89PNG\r\n")  # read at set-up, not after training
    result = CliRunner().invoke(model_group, ["train", str(path)])
    assert result.exit_code == 1 and "broken.png: cannot be read as an image" in result.output
    assert not (tmp_path / "out" / "log.jsonl").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_train_saves_its_state_and_exits_non_zero(data_root, tmp_path, sig):
    """Ctrl-C (or systemd's SIGTERM) keeps the state but must not let `train && eval` go on."""
    out = tmp_path / "out"
    path = write_config(tmp_path / "sig.toml", data_root, out, psnr={"iterations": 100000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "model.cli", "train", str(path), "--threads", "1", "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "log.jsonl").exists() or len(loss_lines(read_log(out))) < 2:  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"interrupted ({sig.name})" in err and "resume" in err
    state = torch.load(out / "state.pt", map_location="cpu", weights_only=False)
    assert 2 <= state["iteration"] < 100000
