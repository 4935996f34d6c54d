"""Self-describing checkpoints: ``NAME.safetensors`` (generator weights, EMA) + ``NAME.json`` (card).

The card carries the architecture config, a format version, what the weights were trained on and
how, their metrics, licence, and the sha256 of the weights file, which the node writes into the
provenance tags of every derived image. Loading is strict: an unknown format version, a sha256
that does not match, or a missing / unexpected / mis-shaped tensor is an error that names the file
and the key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from model.arch import ArchConfig, Generator

FORMAT = "cxr-sr-node/generator"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the file and what is wrong."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    name: str
    version: str
    arch: ArchConfig
    sha256: str = ""
    dtype: str = "float16"
    iterations: int = 0
    training: dict[str, Any] = field(default_factory=dict)
    degradation: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    licence: str = ""
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "dtype": self.dtype,
            "arch": self.arch.to_dict(),
            "iterations": self.iterations,
            "training": self.training,
            "degradation": self.degradation,
            "metrics": self.metrics,
            "licence": self.licence,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: Path) -> ModelCard:
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: a model card must be a JSON object, not a {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{source}: 'format' is {data.get('format')!r}, expected {FORMAT!r}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: format_version {version!r} is not supported (this code reads "
                f"{FORMAT_VERSION}); upgrade cxr-sr-node or re-export the checkpoint"
            )
        try:
            arch = ArchConfig.from_dict(data["arch"])
            return cls(
                name=data["name"],
                version=data["version"],
                arch=arch,
                sha256=data["sha256"],
                dtype=data.get("dtype", "float16"),
                iterations=int(data.get("iterations", 0)),
                training=data.get("training", {}),
                degradation=data.get("degradation", {}),
                metrics=data.get("metrics", {}),
                licence=data.get("licence", ""),
                notes=data.get("notes", ""),
            )
        except KeyError as exc:
            raise CheckpointError(f"{source}: card is missing the key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: invalid card: {exc}") from None


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with the same bytes for the same tensors, and the file mode
    of any other file written here. safetensors writes its JSON header with the metadata in a hash
    map's order (it changes from one process to the next, and with it the file's sha256, which
    cards and derived DICOM UIDs quote) and creates files 0600; here the header is rewritten with
    sorted keys, padded to the same length, and the file is created under the umask."""
    blob = bytearray(save(tensors, metadata=metadata))
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob[8 : 8 + size] = canonical.ljust(size)  # the same characters in another order: never longer
    with open(path, "wb") as f:
        f.write(blob)


def save_checkpoint(
    path: Path, generator: Generator, card: ModelCard, *, dtype: torch.dtype = torch.float16
) -> ModelCard:
    """Write weights (cast to ``dtype``) and the card; returns the card with its sha256 filled in."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in generator.state_dict().items()}
    write_safetensors(path, tensors, {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    data = card.to_dict()
    data.update(sha256=sha256_file(path), dtype=str(dtype).removeprefix("torch."), arch=generator.config.to_dict())
    card_path(path).write_text(json.dumps(data, indent=2) + "\n")
    return ModelCard.from_dict(data, source=card_path(path))


def update_card(path: Path, **changes: Any) -> ModelCard:
    """Rewrite fields of an existing card (e.g. metrics after evaluation); weights are untouched."""
    card = read_card(path)
    data = card.to_dict()
    data.update(changes)
    card_path(path).write_text(json.dumps(data, indent=2) + "\n")
    return ModelCard.from_dict(data, source=card_path(path))


def read_card(path: Path) -> ModelCard:
    path = Path(path)
    cp = card_path(path)
    if not cp.is_file():
        raise CheckpointError(f"{path}: its model card {cp.name} is missing beside it")
    try:
        data = json.loads(cp.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cp}: not valid JSON ({exc})") from None
    return ModelCard.from_dict(data, source=cp)


def load_checkpoint(path: Path, *, verify_sha256: bool = True) -> tuple[Generator, ModelCard]:
    """Build the generator from the card and load its weights strictly (float32, CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    if path.suffix == ".pt":
        raise CheckpointError(
            f"{path} is a training state, not a checkpoint: turn its EMA weights into one with "
            f"`cxr-sr-node model export {path.parent} OUT.safetensors --which state`"
        )
    card = read_card(path)
    if verify_sha256:
        actual = sha256_file(path)
        if actual != card.sha256:
            raise CheckpointError(
                f"{path}: sha256 {actual[:12]}… does not match the card's {card.sha256[:12]}…; "
                "the weights file was changed or belongs to another card"
            )
    generator = Generator(card.arch)
    expected = generator.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format_version") != str(FORMAT_VERSION):
                raise CheckpointError(
                    f"{path}: weights format_version {meta.get('format_version')!r} is not "
                    f"{FORMAT_VERSION}"
                )
            keys = set(f.keys())
            missing = sorted(set(expected) - keys)
            unexpected = sorted(keys - set(expected))
            if missing:
                raise CheckpointError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing)")
            if unexpected:
                raise CheckpointError(
                    f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected); "
                    "the card's architecture does not match the weights"
                )
            state = {}
            for key, ref in expected.items():
                tensor = f.get_tensor(key)
                if tensor.shape != ref.shape:
                    raise CheckpointError(
                        f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the architecture "
                        f"expects {tuple(ref.shape)}"
                    )
                state[key] = tensor.float()
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    generator.load_state_dict(state, strict=True)
    return generator.eval(), card
