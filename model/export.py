"""Turn a training run into a self-describing checkpoint to ship (``cxr-sr-node model export``).

A run folder holds ``best.safetensors`` (best validation of the final stage), ``last.safetensors``
(written when the schedule ends) and ``state.pt`` (everything needed to resume). A GPU slice that
stops on its time limit leaves only ``best`` and ``state``; a run stopped before its first
validation leaves only ``state``. Export picks one of them, names and versions it, and writes
``NAME.safetensors`` + ``NAME.json`` (fp16 by default: the form kept in ``model/weights/``), then
reloads what it wrote strictly and checks that every tensor is the source's, cast to the dtype.

Sources, by ``which``:

* ``best`` / ``last``: that checkpoint of a run folder; its card is kept, with the new name,
  version and an ``exported_from`` note.
* ``state``: the EMA weights in ``state.pt`` at the iteration it was saved. Its card is built from
  the config saved in the state, like the trainer's own; those weights were not validated at that
  iteration, which the card says (run ``model eval`` before shipping them).
* ``auto`` (default): ``best``, else ``last``, else ``state``.

A ``.safetensors`` file is also a source (re-export: rename, new version, other dtype).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from model.arch import Generator, count_parameters
from model.checkpoint import CheckpointError, ModelCard, load_checkpoint, save_checkpoint

SOURCES = ("auto", "best", "last", "state")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
# The kept size of one shipped checkpoint (the model issue): every version stays in git's history.
SHIP_LIMIT_MIB = 40
# The name and version become DICOM SoftwareVersions / DerivationDescription values (VR LO: at
# most 64 characters, no backslash, which separates values): keep them short and plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,47}$")
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+){0,3}([.+-][A-Za-z0-9.]+)?$")


class ExportError(ValueError):
    """The source cannot be exported; the message names the file and what to do."""


@dataclass(frozen=True)
class Exported:
    path: Path
    card: ModelCard
    source: Path
    size_bytes: int
    parameters: int

    @property
    def size_mib(self) -> float:
        return self.size_bytes / 2**20

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "card": str(self.path.with_suffix(".json")),
            "name": self.card.name,
            "version": self.card.version,
            "dtype": self.card.dtype,
            "iterations": self.card.iterations,
            "parameters": self.parameters,
            "size_mib": round(self.size_mib, 2),
            "sha256": self.card.sha256,
            "source": str(self.source),
            "over_ship_limit": self.size_mib > SHIP_LIMIT_MIB,
        }


def resolve_source(source: Path, which: str = "auto") -> Path:
    """The file to export: ``source`` itself, or the chosen file of a run folder."""
    if which not in SOURCES:
        raise ExportError(f"which={which!r}: use one of {', '.join(SOURCES)}")
    source = Path(source)
    if source.is_file():
        if which != "auto":
            raise ExportError(f"{source} is a file: --which picks a file inside a run folder; leave it out")
        return source
    if not source.is_dir():
        raise ExportError(f"{source}: no such run folder or checkpoint file")
    names = {"best": "best.safetensors", "last": "last.safetensors", "state": "state.pt"}
    order = ("best", "last", "state") if which == "auto" else (which,)
    for key in order:
        if (source / names[key]).is_file():
            return source / names[key]
    wanted = " or ".join(names[k] for k in order)
    if (source / names["state"]).is_file():
        raise ExportError(
            f"{source}: no {wanted} in this run folder yet (it has not reached a validation, or "
            "not its end); --which state exports the EMA weights in its state.pt"
        )
    raise ExportError(
        f"{source}: no {wanted} in this folder; point at a training run's out_dir "
        "(the folder with log.jsonl and state.pt)"
    )


def _from_state(path: Path) -> tuple[dict[str, torch.Tensor], ModelCard]:
    # imported here: the training package (tqdm, data loading) is not needed to re-export a file
    from model.train.config import config_from_dict
    from model.train.loop import training_card

    try:
        # weights_only: a state file is data (tensors, numbers, strings, the config as dicts);
        # nothing in it needs code to unpickle, so nothing in a foreign one can run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad file
        raise ExportError(f"{path}: not a readable training state ({type(exc).__name__}: {exc})") from None
    try:
        cfg = config_from_dict(state["config"], str(path))
        ema = state["ema"]
        iteration = int(state["iteration"])
        elapsed_s = float(state["elapsed_s"])
    except KeyError as exc:
        raise ExportError(f"{path}: training state has no {exc.args[0]!r}; is it a cxr-sr-node state.pt?") from None
    except ValueError as exc:
        raise ExportError(f"{path}: its saved config does not load: {exc}") from None
    parameters = count_parameters(Generator(cfg.arch))
    card = training_card(
        cfg,
        iteration=iteration,
        elapsed_s=elapsed_s,
        parameters=parameters,
        train_images=None,
        val_images=cfg.val_images or None,
        device="unknown (exported from state.pt)",
        # null, not -Infinity (which is not JSON), for a run that has not validated yet
        metrics={"best_val_psnr_db_before_export": best if isinstance(best := state.get("best_psnr"), float)
                 and math.isfinite(best) else None},
    )
    note = (
        f"EMA weights of {path.name} at iteration {iteration} of {cfg.total_iterations}, exported "
        "without a validation at that iteration: score them with `cxr-sr-node model eval` before shipping"
    )
    return ema, dataclasses.replace(card, notes=note)


def _load_source(path: Path) -> tuple[dict[str, torch.Tensor], ModelCard]:
    if path.suffix == ".safetensors":
        try:
            generator, card = load_checkpoint(path)  # strict: card, sha256, every tensor
        except CheckpointError as exc:
            raise ExportError(str(exc)) from None
        # the file's own tensors (not the float32 copy in the generator): fp16 → fp16 is bit-exact
        return load_file(str(path)), card
    if path.suffix in (".pt", ".pth"):
        return _from_state(path)
    raise ExportError(f"{path}: export reads .safetensors checkpoints and training state.pt files")


def export_checkpoint(
    source: Path,
    out: Path,
    *,
    which: str = "auto",
    name: str | None = None,
    version: str | None = None,
    dtype: str = "fp16",
    notes: str | None = None,
    overwrite: bool = False,
) -> Exported:
    """Write ``out`` (a ``.safetensors`` path, or a folder for ``NAME.safetensors``) from ``source``."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    src = resolve_source(Path(source), which)
    tensors, card = _load_source(src)
    out = Path(out)
    if out.suffix == ".safetensors":
        name = name or out.stem
    else:
        name = name or card.name
        out = out / f"{name}.safetensors"
    version = version or card.version
    if not _NAME.match(name):
        raise ExportError(
            f"name {name!r}: use 1-48 letters, digits, '.', '_', '+' or '-' (it goes into DICOM "
            "SoftwareVersions of every derived image)"
        )
    if not _VERSION.match(version):
        raise ExportError(f"version {version!r}: use a version number such as 1.2.0 (at most 4 parts, optional -suffix)")
    if out.resolve() == src.resolve():
        raise ExportError(f"{out} is the source itself: export to another path")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists: pass --force to replace it, or choose another name or --version")
    generator = Generator(card.arch)
    expected = generator.state_dict()
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ExportError(f"{src}: tensors do not match the architecture (missing {missing[:3]}, unexpected {extra[:3]})")
    try:
        generator.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{src}: {exc}") from None
    note = f"exported from {src.name} ({card.name} {card.version}, {card.iterations} iterations)"
    card = dataclasses.replace(
        card,
        name=name,
        version=version,
        notes="; ".join(filter(None, [notes, card.notes, note])),
    )
    written = save_checkpoint(out, generator, card, dtype=DTYPES[dtype])
    # read back what a node will load, strictly, and compare with the source tensor by tensor
    reloaded = load_file(str(out))
    load_checkpoint(out)
    for key, value in tensors.items():
        if not torch.equal(reloaded[key], value.to(DTYPES[dtype])):
            raise ExportError(f"{out}: tensor {key} did not survive the export; the file is not usable")
    return Exported(
        path=out, card=written, source=src, size_bytes=out.stat().st_size, parameters=count_parameters(generator)
    )
