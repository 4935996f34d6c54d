"""What a generator costs: size and multiply-accumulates (``model info``), measured time and memory
per image against bicubic (``model bench``).

A model comes from a checkpoint (its card and weights) or from an architecture alone: ``paper``
(:data:`model.arch.PAPER`) or the ``[arch]`` table of a training config (``.toml``), with random
weights, which time the same as trained ones.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import inference
from model.arch import PAPER, ArchConfig, Generator, count_parameters, macs
from model.checkpoint import ModelCard, read_card, sha256_file

PAPER_REFERENCE = (
    "the paper reports 0.016 s per 256×256 image on an RTX 4080 for its 16.75 M-parameter "
    "generator (Appl. Sci. 2026, 16(4), 1797)"
)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A generator to describe or time: its name, architecture and, if any, checkpoint and card."""

    name: str
    arch: ArchConfig
    source: str  # the checkpoint path, "paper", or the config path
    checkpoint: Path | None = None
    card: ModelCard | None = None

    @classmethod
    def from_checkpoint(cls, path: Path) -> ModelSpec:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        card = read_card(path)
        return cls(name=card.name, arch=card.arch, source=str(path), checkpoint=path, card=card)

    @classmethod
    def from_arch(cls, value: str) -> ModelSpec:
        if value == "paper":
            return cls(name="paper", arch=PAPER, source="paper")
        path = Path(value)
        if path.suffix != ".toml":
            raise ValueError(f"--arch must be 'paper' or a training config .toml file, got {value!r}")
        if not path.is_file():
            raise FileNotFoundError(f"--arch config {path} does not exist")
        from model.train.config import load_config

        config = load_config(path)
        return cls(name=config.name, arch=config.arch, source=str(path))

    @classmethod
    def resolve(cls, *, checkpoint: Path | None, arch: str | None) -> ModelSpec:
        """``--checkpoint`` or ``--arch`` (not both); neither: the node's default checkpoint."""
        if checkpoint is not None and arch is not None:
            raise ValueError("give either --checkpoint or --arch, not both")
        if arch is not None:
            return cls.from_arch(arch)
        if checkpoint is None:
            checkpoint = inference.DEFAULT_CHECKPOINT
            if not checkpoint.is_file():
                raise FileNotFoundError(
                    f"no --checkpoint or --arch was given and the default checkpoint {checkpoint} does "
                    "not exist yet; pass --checkpoint FILE or --arch paper|CONFIG.toml"
                )
        return cls.from_checkpoint(checkpoint)

    def build(self, device: torch.device) -> Generator:
        """The generator on ``device`` in eval mode: the checkpoint's weights, else random ones."""
        if self.checkpoint is not None:
            return inference.load_generator(self.checkpoint, device).net
        net = Generator(self.arch).to(device).eval()
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        for p in net.parameters():
            p.requires_grad_(False)
        return net


def model_info(spec: ModelSpec) -> dict[str, Any]:
    """The card (or the architecture) plus the exact parameter count and MACs of a 64² -> 256² pass.

    Both come from a generator on torch's ``meta`` device: no weights are allocated, nothing runs."""
    with torch.device("meta"):
        net = Generator(spec.arch)
        counts = {"parameters": count_parameters(net), "macs_64_to_256": macs(net, 64)}
    if spec.card is None:
        return {"name": spec.name, "source": spec.source, "arch": spec.arch.to_dict(), **counts}
    return {
        **spec.card.to_dict(),
        "checkpoint": str(spec.checkpoint),
        "weights_sha256_matches": sha256_file(spec.checkpoint) == spec.card.sha256,
        "arch_mismatch": _arch_mismatch(spec.checkpoint, spec.arch),
        **counts,
    }


def _arch_mismatch(path: Path, arch: ArchConfig) -> str | None:
    """None when the file's tensors are exactly the card architecture's, else the first difference
    (``load_checkpoint`` refuses such a file; info still describes it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        return f"the file cannot be read as safetensors ({exc})"
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in Generator(arch).state_dict().items()}
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            have = stored.get(key, "absent")
            return f"tensor {key}: the card's architecture wants {wanted.get(key, 'none')}, the file has {have}"
    return None


def format_info(info: dict[str, Any]) -> str:
    a = info["arch"]
    gmacs = info["macs_64_to_256"] / 1e9
    lines = [
        f"name         {info['name']}" + (f" {info['version']}" if "version" in info else ""),
        f"source       {info.get('checkpoint', info.get('source'))}",
        f"architecture attention {a['attention']}, {a['num_blocks']} RRDB blocks, {a['num_feat']} features, "
        f"growth {a['num_grow']}, global bicubic skip {'on' if a['global_skip'] else 'off'}, "
        f"x{a['scale']}, {a['in_channels']} channel(s)",
        f"parameters   {info['parameters']:,}",
        f"MACs         {gmacs:.2f} G for 64×64 -> 256×256 ({16 * gmacs:.1f} G for 256×256 -> 1024×1024)",
    ]
    if "sha256" in info:
        ok = "matches the weights" if info["weights_sha256_matches"] else "DOES NOT match the weights file"
        lines.append(f"sha256       {info['sha256']} ({ok})")
        if info.get("arch_mismatch"):
            lines.append(f"WARNING      the weights are not this architecture: {info['arch_mismatch']} "
                         "(loading this checkpoint fails)")
        lines.append(f"iterations   {info['iterations']}, stored as {info['dtype']}")
        degradation = info["degradation"] or {}
        lines.append(f"degradation  {degradation.get('name', 'unknown')}  {degradation}")
        for key in ("training", "metrics"):
            if info[key]:
                lines.append(f"{key:<12} {info[key]}")
        lines.append(f"licence      {info['licence'] or '(none given)'}")
        if info["notes"]:
            lines.append(f"notes        {info['notes']}")
    if info.get("source") == "paper":
        lines.append("paper        ≈16.75 M parameters, 36.91 GFLOPs for a 256×256 image (as reported)")
    return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    sizes: tuple[int, ...] = (64, 256, 1024)  # LR sides
    repeats: int = 3
    budget_s: float = 20.0  # stop repeating a size once its timed runs took this long (>= 1 run)
    device: str = "auto"
    tile: int = 256
    overlap: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ValueError(f"sizes must be positive integers (LR sides in px), got {self.sizes}")
        if self.repeats < 1 or self.budget_s <= 0:
            raise ValueError(f"need repeats >= 1 and budget_s > 0, got {self.repeats}, {self.budget_s}")
        if self.tile < 8 or self.overlap < 0:
            raise ValueError(f"need tile >= 8 and overlap >= 0, got tile={self.tile}, overlap={self.overlap}")


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _ru_maxrss_kib() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB elsewhere


def _release_freed_heap() -> None:
    """Give memory that is free but still mapped (glibc keeps it for reuse) back to the system.

    Without this, a size measured after a larger one reuses the larger one's freed pages and its
    RSS growth reads ~0 (seen: 64² after 256² read 0.0 MiB). ``malloc_trim`` is glibc's; elsewhere
    this does nothing and the figure stays a lower bound.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc's, no library search
    except (OSError, AttributeError, TypeError):
        pass  # not glibc (musl, macOS): no malloc_trim


class PeakMemory:
    """Peak memory growth during a block, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` over what was allocated at the start. CPU (Linux): the
    memory freed by earlier blocks is returned to the system (``malloc_trim``), the kernel's
    peak-RSS mark is reset (``/proc/self/clear_refs``), then peak RSS minus RSS at the start.
    Elsewhere: growth of ``ru_maxrss``, a lower bound (0 unless the block sets a new high for the
    whole process); ``method`` says which was used.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float = 0.0
        self.method = "cuda_max_memory_allocated" if device.type == "cuda" else "rss_peak"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_freed_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self._base = _proc_status_kib("VmRSS")
        except OSError:
            self.method = "ru_maxrss_lower_bound"
            self._base = _ru_maxrss_kib()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self.method == "rss_peak":
            self.mib = max(_proc_status_kib("VmHWM") - self._base, 0) / 1024
        else:
            self.mib = max(_ru_maxrss_kib() - self._base, 0) / 1024


def _measure(
    fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, *, warm: np.ndarray, config: BenchConfig,
    device: torch.device,
) -> tuple[list[float], PeakMemory]:
    fn(warm)  # warm-up: kernels, allocator, oneDNN primitives for the tile shape
    times: list[float] = []
    with PeakMemory(device) as peak:
        for _ in range(config.repeats):
            t0 = time.perf_counter()
            fn(image)  # returns numpy, so CUDA work has finished
            times.append(time.perf_counter() - t0)
            if sum(times) >= config.budget_s:
                break
    return times, peak


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform's description below
    return platform.processor() or platform.machine() or "cpu"


def benchmark(spec: ModelSpec, config: BenchConfig) -> dict[str, Any]:
    """Seconds per image (median) and peak memory for bicubic and the model at each LR size."""
    from model.eval.run import bicubic_x4

    device = inference.resolve_device(config.device)
    net = spec.build(device)
    precisions = ["fp32"]
    if device.type == "cuda":
        precisions += ["bf16"] if torch.cuda.is_bf16_supported() else []
        precisions += ["fp16"]
    upscalers = {
        p: inference.Upscaler(net, tile=config.tile, overlap=config.overlap, precision=p, device=device)
        for p in precisions
    }
    rng = np.random.default_rng(config.seed)
    rows: list[dict[str, Any]] = []
    memory_method = ""
    for size in config.sizes:
        image = rng.random((size, size), dtype=np.float32)  # content does not change the time
        w = min(size, config.tile + 2 * config.overlap)
        warm = image[:w, :w]
        methods: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
            ("bicubic", "fp32", lambda x: bicubic_x4(x, device))
        ] + [(spec.name, p, up) for p, up in upscalers.items()]
        base = None
        for method, precision, fn in methods:
            times, peak = _measure(fn, image, warm=warm, config=config, device=device)
            memory_method = peak.method
            seconds = statistics.median(times)
            base = seconds if base is None else base
            rows.append(
                {
                    "lr_px": size,
                    "sr_px": size * 4,
                    "method": method,
                    "precision": precision,
                    "runs": len(times),
                    "s_per_image": seconds,
                    "ratio_vs_bicubic": seconds / base if base > 0 else None,
                    "peak_mem_mib": round(peak.mib, 1),
                }
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "model": {
            "name": spec.name,
            "source": spec.source,
            "parameters": count_parameters(net),
            "sha256": spec.card.sha256 if spec.card else None,
        },
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tile": config.tile,
        "overlap": config.overlap,
        "repeats": config.repeats,
        "budget_s": config.budget_s,
        "memory": memory_method,
        "rows": rows,
        "reference": PAPER_REFERENCE,
    }


def format_bench(result: dict[str, Any]) -> str:
    m = result["model"]
    memory = {
        "cuda_max_memory_allocated": "peak CUDA memory allocated above the start",
        "rss_peak": "peak resident memory growth of this process",
        "ru_maxrss_lower_bound": "growth of the process's peak RSS (a lower bound)",
    }[result["memory"]]
    lines = [
        f"model {m['name']} ({m['parameters']:,} parameters, {m['source']}) on {result['device']} "
        f"({result['device_name']}, torch threads: {result['threads']}, torch {result['torch']})",
        f"tile {result['tile']} px, overlap {result['overlap']} px; s/image = median of the timed runs after "
        f"a warm-up (up to {result['repeats']}, fewer once a size's runs take {result['budget_s']:g} s); "
        "random input",
        "",
        "| LR px | SR px | method | precision | runs | s/image | ratio_vs_bicubic | peak MiB |",
        "|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ratio = "—" if r["ratio_vs_bicubic"] is None else f"{r['ratio_vs_bicubic']:.1f}"
        lines.append(
            f"| {r['lr_px']} | {r['sr_px']} | {r['method']} | {r['precision']} | {r['runs']} | "
            f"{r['s_per_image']:.4g} | {ratio} | {r['peak_mem_mib']:.1f} |"
        )
    lines += ["", f"peak MiB: {memory}.", f"note: {result['reference']}."]
    return "\n".join(lines)
