"""``cxr-sr-node model …``: train, evaluate, describe and benchmark the generator.

The node's CLI mounts this group; it is the only part of ``model`` besides ``model.inference``
that ``cxr_sr_node`` imports.
"""

from __future__ import annotations

import json
import sys
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
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_cmd(config: Path, sets: tuple[str, ...], max_minutes: float | None, threads: int | None, no_progress: bool) -> None:
    """Train (or resume) from CONFIG.toml; see model/configs/."""
    import torch

    from model.train.config import load_config
    from model.train.loop import train

    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = load_config(config, _parse_set(sets))
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    result = train(cfg, max_minutes=max_minutes, progress=not no_progress)
    if result.suffix == ".pt":
        click.echo(f"stopped before the end; run the same command again to resume from {result}")
    else:
        click.echo(f"finished: {result} (best on val: {result.with_name('best.safetensors')})")


def main(argv: list[str] | None = None) -> None:
    model_group.main(args=argv)


if __name__ == "__main__":
    main(sys.argv[1:])
