"""``cxr-sr-node model …``: train, evaluate, describe and benchmark the generator.

The node's CLI mounts this group; it is the only part of ``model`` besides ``model.inference``
that ``cxr_sr_node`` imports.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click


def _parse_set(values: tuple[str, ...]) -> dict:
    import tomllib

    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"--set needs KEY=VALUE, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


@click.group("model")
def model_group() -> None:
    """Train, evaluate and inspect the CSAEGAN generator."""


@model_group.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "sets", multiple=True, help="Override a config key, e.g. --set psnr.iterations=2")
@click.option("--max-minutes", type=float, default=None, help="Stop (resumable) after this many minutes.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_cmd(config: Path, sets: tuple[str, ...], max_minutes: float | None, threads: int | None, no_progress: bool) -> None:
    """Train (or resume) from CONFIG.toml; see model/configs/."""
    import torch

    from model.train.config import load_config
    from model.train.loop import ResumeError, Trainer

    if threads:
        torch.set_num_threads(threads)
    try:  # set-up errors (config, data folder, init_from, compiler) are the user's to fix: no traceback
        trainer = Trainer(load_config(config, _parse_set(sets)), progress=not no_progress)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        result = trainer.run(max_minutes=max_minutes)
    except ResumeError as exc:  # the state.pt in out_dir does not fit this config
        raise click.ClickException(str(exc)) from None
    if trainer.stopped_by is not None and result.suffix == ".pt":  # Ctrl-C / SIGTERM: state saved, but `train && eval` must not go on
        name = signal.Signals(trainer.stopped_by).name
        click.echo(f"interrupted ({name}) at iteration {trainer.iteration}; state saved: run the same command "
                   f"again to resume from {result}", err=True)
        sys.exit(128 + trainer.stopped_by)
    if result.suffix == ".pt":
        click.echo(f"stopped before the end; run the same command again to resume from {result}")
    else:
        click.echo(f"finished: {result} (best on val: {result.with_name('best.safetensors')})")


def _model_errors() -> tuple[type[BaseException], ...]:
    from model.inference import UpscaleError

    return (ValueError, OSError, UpscaleError)


def _noise_settings(d: dict) -> str:
    if d["name"] == "lowdose":
        return f" (dose scale {d['dose_scale']:g}, read noise {d['read_noise']:g})"
    if d["name"] == "mixed":
        return f" (dose scale {d['dose_scale']:g} to {d['dose_max']:g}, read noise up to {d['read_noise']:g})"
    return ""


@model_group.command("eval")
@click.option(
    "--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
    help="A .safetensors checkpoint; repeat for several (default: the node's shipped checkpoint).",
)
@click.option("--bicubic-only", is_flag=True, help="Evaluate the bicubic baseline alone (no checkpoint).")
@click.option(
    "--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Image folder; with train/val/test subfolders, --split picks one.",
)
@click.option(
    "--split", type=click.Choice(["train", "val", "test"]), default=None,
    help="Default: test for a split folder, every image for a flat one.",
)
@click.option("--degradation", type=click.Choice(["paper", "lowdose", "mixed"]), default="paper", show_default=True,
              help="paper: blur + bicubic; lowdose: + Poisson and read noise; mixed: a dose drawn per image.")
@click.option("--dose-scale", type=click.FloatRange(min=0, min_open=True), default=None,
              help="lowdose: photons at full signal (default 2000; lower = noisier); mixed: the lowest dose.")
@click.option("--read-noise", type=click.FloatRange(min=0), default=None,
              help="lowdose: Gaussian read noise σ in [0, 1] units (default 0.004); mixed: the largest.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/eval"), show_default=True)
@click.option("--tile", type=click.IntRange(min=32), default=256, show_default=True, help="LR tile side, px.")
@click.option("--overlap", type=click.IntRange(min=0), default=16, show_default=True, help="LR tile context, px.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--crops", type=click.IntRange(min=0), default=4, show_default=True, help="Crop PNGs for the first N images.")
@click.option("--lpips-backbone", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="torchvision AlexNet state dict (alexnet-owt-7be5be79.pth); needs --lpips-linear.")
@click.option("--lpips-linear", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="LPIPS v0.1 linear weights (alex.pth from the lpips package); needs --lpips-backbone.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Image i's degradation uses seed + i (a training run validates with its config's seed).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def eval_cmd(
    checkpoints: tuple[Path, ...], bicubic_only: bool, data: Path, split: str | None, degradation: str,
    dose_scale: float | None, read_noise: float | None, limit: int | None, out: Path, tile: int, overlap: int,
    precision: str, device: str, crops: int,
    lpips_backbone: Path | None, lpips_linear: Path | None, seed: int, threads: int | None, no_progress: bool,
) -> None:
    """Score bicubic and checkpoints on degraded images: metrics.json, per_image.csv, report.md, crops/."""
    import torch

    from model.eval.report import report_table
    from model.eval.run import evaluate

    if threads:
        torch.set_num_threads(threads)
    if (lpips_backbone is None) != (lpips_linear is None):
        raise click.UsageError("--lpips-backbone and --lpips-linear go together: give both or neither")
    if bicubic_only and checkpoints:
        raise click.UsageError("--bicubic-only and --checkpoint exclude each other")
    try:
        metrics = evaluate(
            [] if bicubic_only else (list(checkpoints) or None),
            data,
            split=split,
            degradation=degradation,
            dose_scale=dose_scale,
            read_noise=read_noise,
            limit=limit,
            out=out,
            tile=tile,
            overlap=overlap,
            precision=precision,
            device=device,
            crops=crops,
            lpips_files=(lpips_backbone, lpips_linear) if lpips_backbone else None,
            seed=seed,
            progress=not no_progress,
        )
    except _model_errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"{metrics['images']} images, split {metrics['split']}, degradation {metrics['degradation']}"
        f"{_noise_settings(metrics['degradation_settings'])}\n"
    )
    click.echo(report_table(metrics))
    click.echo(f"\nwrote {out}/metrics.json, per_image.csv, report.md" + (" and crops/" if crops else ""))


@model_group.command("headroom")
@click.option("--data", type=click.Path(path_type=Path), default=Path("../shared/data/cxr_png/nih"), show_default=True)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None,
              help="Default: test/ of a split folder, else every image.")
@click.option("--degradation", type=click.Choice(["paper", "lowdose", "mixed"]), default="paper", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images.")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Also score this checkpoint (fp32, CPU); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def headroom_cmd(
    data: Path, split: str | None, degradation: str, limit: int | None, checkpoints: tuple[Path, ...], as_json: bool
) -> None:
    """Score oracles that know HR (ideal low-passes, Gaussian blurs) against bicubic: how much
    PSNR/SSIM a super-resolver could still win on these images, and in which parts of them (SSIM
    by HR's local texture, for the oracles and any --checkpoint)."""
    from model.eval.headroom import format_headroom, headroom

    try:
        result = headroom(data, split=split, degradation=degradation, limit=limit, checkpoints=checkpoints)
    except _model_errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result, indent=1) if as_json else format_headroom(result))


_MODEL_OPTIONS = (
    click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="A .safetensors checkpoint (default: the node's shipped checkpoint)."),
    click.option("--arch", default=None, help="Instead of a checkpoint: 'paper' or a training config .toml."),
)


def _model_options(fn: Callable[..., None]) -> Callable[..., None]:
    """--checkpoint and --arch, shared by info and bench."""
    for option in reversed(_MODEL_OPTIONS):
        fn = option(fn)
    return fn


@model_group.command("info")
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info_cmd(checkpoint: Path | None, arch: str | None, as_json: bool) -> None:
    """Describe a generator: its card (or architecture), exact parameter count and MACs."""
    from model.eval.bench import ModelSpec, format_info, model_info

    try:
        info = model_info(ModelSpec.resolve(checkpoint=checkpoint, arch=arch))
    except _model_errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))


def _parse_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated LR sides in px, e.g. 64,256,1024; got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"sizes must be positive integers, got {value!r}")
    return sizes


@model_group.command("bench")
@_model_options
@click.option("--sizes", default="64,256,1024", show_default=True, callback=_parse_sizes,
              help="LR input sides in px, comma-separated.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs per size.")
@click.option("--budget-s", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="Stop repeating a size once its runs took this long (at least one run).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--tile", type=click.IntRange(min=32), default=256, show_default=True, help="LR tile side, px.")
@click.option("--overlap", type=click.IntRange(min=0), default=16, show_default=True, help="LR tile context, px.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_cmd(
    checkpoint: Path | None, arch: str | None, sizes: tuple[int, ...], repeats: int, budget_s: float,
    device: str, tile: int, overlap: int, threads: int | None, as_json: bool,
) -> None:
    """Seconds per image and peak memory of the generator against bicubic, per input size."""
    import torch

    from model.eval.bench import BenchConfig, ModelSpec, benchmark, format_bench

    if threads:
        torch.set_num_threads(threads)
    try:
        spec = ModelSpec.resolve(checkpoint=checkpoint, arch=arch)
        config = BenchConfig(sizes=sizes, repeats=repeats, budget_s=budget_s, device=device, tile=tile, overlap=overlap)
        result = benchmark(spec, config)
    except _model_errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))


@model_group.command("train-features")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Weights file; its JSON card goes beside it. Default: the package's model/weights/cxr-features.safetensors.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("../shared/data/cxr_png/nih"), show_default=True,
              help="Image folder; its train split is trained on, its val split scored.")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Stop after N iterations (default: the time budget alone).")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Training-loop budget in minutes (default 7 when --iterations is not given).")
@click.option("--crop", type=click.IntRange(min=16), default=128, show_default=True, help="HR crop side, px (multiple of 8).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads (1 leaves a core to other work).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--log", type=click.Path(dir_okay=False, path_type=Path), default=Path("runs/cxr-features/log.jsonl"),
              show_default=True, help="JSONL loss log.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--force", is_flag=True, help="Replace an existing --out file (by default the shipped one).")
def train_features_cmd(
    out: Path | None, data: Path, iterations: int | None, minutes: float | None, crop: int, batch_size: int,
    threads: int, seed: int, log: Path, no_progress: bool, force: bool,
) -> None:
    """Train the chest X-ray feature network for the perceptual loss (perceptual = "cxr_features")."""
    import torch

    from model.train.features import FeatureTrainConfig, train_features
    from model.train.nets import CXR_FEATURES_PATH

    target = out or CXR_FEATURES_PATH
    if target.exists() and not force:  # before minutes of training, not after: the default is the shipped file
        raise click.ClickException(
            f"{target} exists{' (the shipped feature network)' if out is None else ''}: pass --out NEW_FILE, "
            "or --force to replace it"
        )
    torch.set_num_threads(threads)
    if iterations is None and minutes is None:
        minutes = FeatureTrainConfig.minutes
    try:
        config = FeatureTrainConfig(
            data_root=data, log=log, iterations=iterations, minutes=minutes, crop=crop, batch_size=batch_size,
            seed=seed, progress=not no_progress, **({"out": out} if out else {}),
        )
        card = train_features(config)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    val = card["metrics"]["val"]
    click.echo(
        f"wrote {config.out} (sha256 {card['sha256'][:12]}…) after {card['training']['iterations']} iterations; "
        f"val reconstruction PSNR {val['noisy']['recon_psnr_db']} dB from noisy input, "
        f"{val['bicubic_lr']['recon_psnr_db']} dB from bicubic LR"
    )


@model_group.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--which", type=click.Choice(["auto", "best", "last", "state"]), default="auto", show_default=True,
              help="For a run folder: best.safetensors, last.safetensors or the EMA weights in state.pt "
                   "(auto: the first of these that exists).")
@click.option("--name", default=None, help="Card name (default: OUT's file name, or the source's name for a folder OUT).")
@click.option("--version", "version", default=None, help="Card version, e.g. 1.3.0 (default: the source's).")
@click.option("--dtype", type=click.Choice(["fp16", "fp32", "bf16"]), default="fp16", show_default=True,
              help="Stored precision (fp16 is what model/weights keeps).")
@click.option("--notes", default=None, help="A sentence for the card's notes.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def export_cmd(
    source: Path, out: Path, which: str, name: str | None, version: str | None, dtype: str, notes: str | None,
    force: bool, as_json: bool,
) -> None:
    """Write a shippable checkpoint (NAME.safetensors + NAME.json) from a training run or a checkpoint.

    SOURCE is a run folder (its out_dir), a state.pt, or a .safetensors checkpoint; OUT is a
    .safetensors path or a folder. The written file is reloaded strictly and compared tensor by
    tensor with the source before this command succeeds.
    """
    from model.export import SHIP_LIMIT_MIB, ExportError, export_checkpoint

    try:
        done = export_checkpoint(
            source, out, which=which, name=name, version=version, dtype=dtype, notes=notes, overwrite=force
        )
    except (ExportError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    info = done.summary()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(
            f"wrote {info['path']} and {Path(info['card']).name}: {info['name']} {info['version']}, {info['dtype']}, "
            f"{info['iterations']} iterations, {info['parameters']:,} parameters, {info['size_mib']:.1f} MiB, "
            f"sha256 {info['sha256'][:12]}… (from {info['source']})"
        )
    if info["over_ship_limit"]:
        click.echo(
            f"note: {info['size_mib']:.1f} MiB is over the {SHIP_LIMIT_MIB} MiB kept per checkpoint in model/weights "
            "(every version stays in git's history): ship fp16, or keep it outside the repository",
            err=True,
        )


def main(argv: list[str] | None = None) -> None:
    model_group.main(args=argv)


if __name__ == "__main__":
    main(sys.argv[1:])
