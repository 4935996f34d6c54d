"""The two-stage training loop: PSNR stage (pixel loss), then GAN stage (ESRGAN's recipe).

Resumable: ``state.pt`` in the run folder holds the networks, EMA, optimisers, iteration and every
random state; running the same config again continues where it stopped (after ``max_minutes``,
Ctrl-C, SIGTERM or a crash: at most ``save_every`` iterations are lost). The run folder also gets
``log.jsonl`` (one line per ``log_every`` iterations and per validation), ``last.safetensors``
(EMA weights at the end) and ``best.safetensors`` (best validation PSNR of the final stage).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.arch import Generator, count_parameters
from model.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from model.data import CropSampler, check_scorable, list_images, read_gray, split_files
from model.degrade import crop_to_scale, quantize
from model.eval.metrics import psnr, ssim
from model.inference import Upscaler, resolve_device
from model.train.config import TrainConfig
from model.train.nets import Discriminator, build_perceptual, relativistic_loss


def stage_lr(config: TrainConfig, it: int) -> float:
    if it < config.psnr.iterations:
        stage, start, length, base = config.psnr, 0, config.psnr.iterations, config.psnr.lr
        if stage.warmup and it < stage.warmup:
            return base * (it + 1) / stage.warmup
        if stage.schedule == "constant":
            return base
    else:
        start, length, base = config.psnr.iterations, config.gan.iterations, config.gan.lr
    t = (it - start) / max(length, 1)
    return base * 0.5 * (1 + math.cos(math.pi * t))


class ResumeError(ValueError):
    """``state.pt`` cannot be resumed with this config; the message names the file and what differs."""


# May differ between the sitting that wrote state.pt and the one resuming it: names, where and how
# fast it runs, how often it logs/validates/saves, and the schedule's length (more iterations
# continue a finished run; the cosine then stretches over the new total).
RESUMABLE_CHANGES = frozenset({
    "name", "version", "licence", "out_dir", "device", "amp", "compile", "compile_mode", "val_every",
    "save_every", "log_every", "psnr.iterations", "gan.iterations",
})


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved, current)}`` for what differs, except :data:`RESUMABLE_CHANGES`.

    Keys only one side has (a setting added or removed since the state was written) are not
    compared: the state was written before they existed."""
    old, new = _flatten(saved), _flatten(current)
    return {
        k: (old[k], new[k])
        for k in sorted(set(old) & set(new))
        if k not in RESUMABLE_CHANGES and old[k] != new[k]
    }


def training_card(
    cfg: TrainConfig,
    *,
    iteration: int,
    elapsed_s: float,
    parameters: int,
    train_images: int | None,
    val_images: int | None,
    device: str,
    metrics: dict[str, Any],
) -> ModelCard:
    """The card of a checkpoint written by this trainer (or exported from its ``state.pt``)."""
    stages = {"psnr_iterations": cfg.psnr.iterations, "gan_iterations": cfg.gan.iterations}
    return ModelCard(
        name=cfg.name,
        version=cfg.version,
        arch=cfg.arch,
        iterations=iteration,
        training={
            "data_root": cfg.data.root,
            "train_images": train_images,
            "val_images": val_images,
            "hr_crop": cfg.data.hr_crop,
            "batch_size": cfg.data.batch_size,
            "psnr_stage": asdict(cfg.psnr),
            "gan_stage": asdict(cfg.gan) if cfg.gan.iterations else None,
            "stages": stages,
            "ema": cfg.ema,
            "seed": cfg.seed,
            "init_from": cfg.init_from or None,
            "device": device,
            "elapsed_s": round(elapsed_s, 1),
            "parameters": parameters,
        },
        degradation=asdict(cfg.degradation),
        metrics=metrics,
        licence=cfg.licence,
    )


class Trainer:
    def __init__(self, config: TrainConfig, *, progress: bool = True) -> None:
        self.config = config
        # before the data, init_from and model are loaded: fail fast
        if config.compile and not any(shutil.which(cc) for cc in filter(None, (os.environ.get("CC"), "cc", "gcc"))):
            raise ValueError(
                "compile = true needs a C compiler for torch.compile (Triton and Inductor build with "
                "it) and none was found on PATH: install one (apt-get install -y gcc) or train with "
                "--set compile=false"
            )
        self.progress = progress
        self.out = Path(config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(config.device)
        self.amp = config.amp and self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop shapes: let cuDNN pick the fastest kernels
        torch.manual_seed(config.seed)
        root = Path(config.data.root)
        self.train_files = split_files(root, "train")
        val = split_files(root, "val")
        self.val_files = val[: config.val_images] if config.val_images else val
        for split, files in (("train", self.train_files), ("val", self.val_files)):
            if not files:
                raise ValueError(
                    f"no {split} images in {root}: "
                    + (f"{root / split} is empty" if (root / split).is_dir() else
                       f"the split by patient of its {len(list_images(root))} image(s) put none in {split}")
                    + "; training needs both train and validation images (add images, or ship "
                    "train/, val/ and test/ folders and set [data] root to their parent)"
                )
        for path in self.val_files:  # validation reads them only after the first val_every steps
            check_scorable(path, read_gray(path)[0])
        self.sampler = CropSampler(
            self.train_files, config.degradation, hr_crop=config.data.hr_crop, seed=config.seed
        )
        # channels_last: ~2.5x faster training steps on CPU (oneDNN), tensor-core layout on CUDA
        self.net = Generator(config.arch).to(self.device, memory_format=torch.channels_last)
        if config.init_from:
            init, _ = load_checkpoint(Path(config.init_from))
            if init.config != config.arch:
                raise ValueError(
                    f"init_from {config.init_from}: its architecture {init.config} differs from "
                    f"the config's {config.arch}"
                )
            self.net.load_state_dict(init.state_dict(), strict=True)
            self.net.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.net).eval()
        # compiled view of the same module: parameters, state_dict and checkpoints stay self.net's
        self.forward = torch.compile(self.net, mode=config.compile_mode) if config.compile else self.net
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.opt = self._adam(self.net, config.psnr.lr)
        self.disc: Discriminator | None = None
        self.opt_d: torch.optim.Optimizer | None = None
        self.perceptual = None
        self._perceptual_built = None
        if config.gan.iterations:  # fail fast: not after the whole PSNR stage (200k iterations for paper)
            g = config.gan
            try:
                self._perceptual_built = build_perceptual(g.perceptual, g.perceptual_layer, seed=config.seed)
            except (OSError, KeyError, ValueError, RuntimeError) as exc:
                raise ValueError(
                    f"gan.perceptual = {g.perceptual!r}, gan.perceptual_layer = {g.perceptual_layer!r}: {exc}"
                ) from None
        self.iteration = 0
        self.best_psnr = -math.inf
        self.elapsed_s = 0.0
        self._stop = False
        self.stopped_by: int | None = None  # the signal that stopped run(), if one did

    def _adam(self, module: torch.nn.Module, lr: float) -> torch.optim.Adam:
        # fused on CUDA: the whole update in a few kernels (ESRGAN's betas)
        return torch.optim.Adam(module.parameters(), lr=lr, betas=(0.9, 0.99), fused=self.device.type == "cuda")

    # --- state -------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    def _enter_gan(self, *, fresh: bool) -> None:
        g = self.config.gan
        if fresh:  # ESRGAN: the GAN stage starts from the PSNR model
            self.net.load_state_dict(self.ema.state_dict())
            self.best_psnr = -math.inf
        self.opt = self._adam(self.net, g.lr)
        self.disc = Discriminator(num_feat=g.disc_feat).to(self.device)
        self.opt_d = self._adam(self.disc, g.lr)
        built = self._perceptual_built or build_perceptual(g.perceptual, g.perceptual_layer, seed=self.config.seed)
        self.perceptual = built.to(self.device)

    def save_state(self) -> None:
        state = {
            "iteration": self.iteration,
            "net": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "disc": self.disc.state_dict() if self.disc else None,
            "opt_d": self.opt_d.state_dict() if self.opt_d else None,
            "best_psnr": self.best_psnr,
            "elapsed_s": self.elapsed_s,
            "torch_rng": torch.get_rng_state(),
            "sampler_rng": self.sampler.state(),
            "config": asdict(self.config),
        }
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)

    def load_state(self) -> bool:
        if not self.state_path.is_file():
            return False
        # Loaded on the CPU: load_state_dict puts each tensor where its parameter and optimiser want
        # it. (map_location=cuda left a non-fused Adam's "step" counters on the GPU, which then
        # synchronised once per parameter per step: the likely reason a resumed run on an H200 made
        # 13-16 it/s where a fresh one made 22-25. Adam is fused on CUDA now; neither re-measured.)
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=False)
            saved = state["config"]
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
            raise ResumeError(
                f"{self.state_path} cannot be read as a training state ({type(exc).__name__}: {exc}); "
                "delete it to start this run over, or set another out_dir"
            ) from None
        if saved["arch"] != asdict(self.config.arch):
            raise ResumeError(
                f"{self.state_path} was written for architecture {saved['arch']}, not "
                f"{asdict(self.config.arch)}; use another out_dir"
            )
        changed = config_changes(saved, asdict(self.config))
        if changed:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ResumeError(
                f"{self.state_path} was written with another config ({listed}). Resuming would mix the "
                "two silently (and the card would record only the new one): restore those values to "
                "resume, or set another out_dir (with init_from = a checkpoint) to start a new run"
            )
        self._check_stages(state["iteration"], saved["psnr"]["iterations"], in_gan=state["disc"] is not None)
        self.iteration = state["iteration"]
        if state["disc"] is not None:
            self._enter_gan(fresh=False)
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.best_psnr = state["best_psnr"]
        self.elapsed_s = state["elapsed_s"]
        torch.set_rng_state(state["torch_rng"])
        self.sampler.set_state(state["sampler_rng"])
        return True

    def _check_stages(self, iteration: int, saved_psnr: int, *, in_gan: bool) -> None:
        """The schedule may grow or shrink on resume, but not to before where the state is."""
        psnr, gan = self.config.psnr.iterations, self.config.gan.iterations
        where = f"{self.state_path} is at iteration {iteration}"
        if not in_gan and iteration > psnr:
            raise ResumeError(
                f"{where} of the PSNR stage; psnr.iterations = {psnr} would end that stage before it "
                f"(and skip what comes after): set psnr.iterations >= {iteration}"
            )
        if in_gan and psnr != saved_psnr:
            raise ResumeError(
                f"{where}, in the GAN stage that began after {saved_psnr} PSNR iterations; "
                f"psnr.iterations = {psnr} would move that boundary: keep psnr.iterations = {saved_psnr}"
            )
        if in_gan and iteration > psnr + gan:
            raise ResumeError(
                f"{where}, {iteration - psnr} iterations into the GAN stage; gan.iterations = {gan} "
                f"ends before that: set gan.iterations >= {iteration - psnr}"
            )

    # --- steps -------------------------------------------------------------------------------
    def _pixel_loss(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        loss = F.l1_loss(sr, hr)
        p = self.config.psnr
        if p.pixel_loss == "l1_ssim":
            from pytorch_msssim import ssim as torch_ssim

            loss = loss + p.ssim_weight * (1 - torch_ssim(sr.clamp(0, 1), hr, data_range=1.0))
        return loss

    def step(self, hr: torch.Tensor, lr_img: torch.Tensor) -> dict[str, float | torch.Tensor]:
        """One iteration. Losses come back as detached tensors: reading them (``float()``) waits
        for the device, so the loop does it only when it logs, and a GPU is not synchronised
        every step."""
        cfg = self.config
        lr_now = stage_lr(cfg, self.iteration)
        for group in self.opt.param_groups:
            group["lr"] = lr_now
        gan = self.iteration >= cfg.psnr.iterations
        logs: dict[str, float] = {"lr": lr_now}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            sr = self.forward(lr_img)
        sr = sr.float()
        if not gan:
            loss = self._pixel_loss(sr, hr)
            logs["l_pix"] = loss.detach()
        else:
            g = cfg.gan
            for group in self.opt_d.param_groups:
                group["lr"] = lr_now
            for p in self.disc.parameters():
                p.requires_grad_(False)
            l_pix = F.l1_loss(sr, hr)
            l_per = F.l1_loss(self.perceptual(sr), self.perceptual(hr))
            real = self.disc(hr).detach()
            fake = self.disc(sr)
            l_adv = relativistic_loss(real, fake, for_generator=True)
            loss = g.pixel_weight * l_pix + g.perceptual_weight * l_per + g.adversarial_weight * l_adv
            logs.update(l_pix=l_pix.detach(), l_percep=l_per.detach(), l_adv=l_adv.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if gan:
            for p in self.disc.parameters():
                p.requires_grad_(True)
            real = self.disc(hr)
            fake = self.disc(sr.detach())
            l_d = relativistic_loss(real, fake, for_generator=False)
            self.opt_d.zero_grad(set_to_none=True)
            l_d.backward()
            self.opt_d.step()
            logs["l_d"] = l_d.detach()
        logs["loss"] = loss.detach()
        self._update_ema()
        return logs

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.config.ema, (1 + self.iteration) / (10 + self.iteration))
        # one multi-tensor kernel per dtype/device instead of a launch per parameter tensor
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1 - decay)
        for e, b in zip(self.ema.buffers(), self.net.buffers(), strict=True):
            e.copy_(b)

    def validate(self) -> dict[str, float]:
        up = Upscaler(self.ema, tile=1 << 14, device=self.device, precision="fp32")
        deg = self.config.degradation
        scores = []
        for i, path in enumerate(self.val_files):
            img, levels = read_gray(path)
            hr = crop_to_scale(img, deg.scale)
            lr = deg(hr, np.random.default_rng(self.config.seed + i))
            sr = quantize(up(lr), levels)  # as `model eval` scores it: saved images are integers
            scores.append((psnr(sr, hr), ssim(sr, hr)))
        self.ema.train(False)
        mean = np.mean(scores, axis=0)
        return {"val_psnr_db": float(mean[0]), "val_ssim": float(mean[1])}

    # --- run ---------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def card(self, metrics: dict[str, Any]) -> ModelCard:
        return training_card(
            self.config,
            iteration=self.iteration,
            elapsed_s=self.elapsed_s,
            parameters=count_parameters(self.net),
            train_images=len(self.train_files),
            val_images=len(self.val_files),
            device=str(self.device),
            metrics=metrics,
        )

    def export(self, name: str, metrics: dict[str, Any]) -> Path:
        path = self.out / f"{name}.safetensors"
        save_checkpoint(path, self.ema, self.card(metrics), dtype=torch.float16)
        return path

    def run(self, *, max_minutes: float | None = None) -> Path:
        cfg = self.config
        resumed = self.load_state()
        if not resumed and cfg.gan.iterations and cfg.psnr.iterations == 0:
            self._enter_gan(fresh=False)
        total = cfg.total_iterations
        deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=total, initial=self.iteration, disable=not self.progress, desc=cfg.name, unit="it")
        try:
            while self.iteration < total and not self._stop:
                if self.iteration == cfg.psnr.iterations and cfg.gan.iterations and self.disc is None:
                    self._enter_gan(fresh=True)
                t0 = time.perf_counter()
                hr, lr_img = self.sampler.batch(cfg.data.batch_size)
                hr_t = torch.from_numpy(hr).to(self.device).contiguous(memory_format=torch.channels_last)
                lr_t = torch.from_numpy(lr_img).to(self.device).contiguous(memory_format=torch.channels_last)
                logs = self.step(hr_t, lr_t)
                log_now = (self.iteration + 1) % cfg.log_every == 0 or self.iteration + 1 == total
                if log_now:  # reading the losses waits for the device: the time of the steps queued since
                    logs = {k: float(v) for k, v in logs.items()}
                self.elapsed_s += time.perf_counter() - t0
                self.iteration += 1
                bar.update(1)
                if log_now:
                    stage = "psnr" if self.iteration <= cfg.psnr.iterations else "gan"
                    self._log({"iteration": self.iteration, "stage": stage, "elapsed_s": round(self.elapsed_s, 2), **logs})
                    bar.set_postfix(loss=f"{logs['loss']:.4f}")
                if self.iteration % cfg.val_every == 0 or self.iteration == total:
                    self._validate_and_keep_best()
                if self.iteration % cfg.save_every == 0:
                    self.save_state()
                if deadline and time.monotonic() > deadline:
                    break
            self.save_state()
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        if self.iteration >= total:
            return self.export("last", {"val": self.validate()})
        return self.state_path

    def _validate_and_keep_best(self) -> None:
        scores = self.validate()
        stage = "psnr" if self.iteration <= self.config.psnr.iterations else "gan"
        self._log({"iteration": self.iteration, "stage": stage, **scores})
        if scores["val_psnr_db"] > self.best_psnr:
            self.best_psnr = scores["val_psnr_db"]
            self.export("best", {"val": scores, "selected_at_iteration": self.iteration})

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop = True
        self.stopped_by = signum


def train(config: TrainConfig, *, max_minutes: float | None = None, progress: bool = True) -> Path:
    """Train (or resume) a run; returns ``last.safetensors`` when finished, else ``state.pt``."""
    return Trainer(config, progress=progress).run(max_minutes=max_minutes)
