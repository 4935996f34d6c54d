"""Grayscale image folders, a leak-free split, and random aligned HR/LR crops for training.

Bit depth comes from the file's pixel mode (8-bit ``L``, 16-bit ``I;16``), never from the observed
maximum, so a dark 16-bit image is not mistaken for an 8-bit one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.degrade import Degradation, crop_to_scale

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")


def load_gray(path: Path) -> np.ndarray:
    """Read an 8- or 16-bit grayscale (or RGB, converted) image as float32 in [0, 1]."""
    with Image.open(path) as img:
        mode = img.mode
        if mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(img, dtype=np.float32) / 65535.0
        if mode == "I":  # 32-bit container, e.g. 16-bit TIFF decoded as I
            arr = np.asarray(img)
            return (arr.astype(np.float64) / 65535.0).clip(0, 1).astype(np.float32)
        if mode == "F":
            raise ValueError(f"{path}: floating-point images have no defined range; convert to 8/16-bit")
        if mode != "L":
            img = img.convert("L")
        return np.asarray(img, dtype=np.float32) / 255.0


def levels_of(path: Path) -> int:
    """Quantisation levels of an image file, from its pixel mode (as :func:`load_gray` reads it)."""
    with Image.open(path) as img:
        return 65535 if img.mode in ("I;16", "I;16B", "I;16L", "I") else 255


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist: point the config's [data] root (or --set "
            "data.root=DIR) at a folder of 8/16-bit grayscale PNG/TIFF images"
        )
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


_VARIANT = re.compile(r"^(.*\d)[A-Za-z]$")


def group_key(path: Path) -> str:
    """Patient-level key, so one patient's images share a split.

    NIH ChestX-ray14 names are ``<patient>_<followup>.png``: the part before the first ``_``.
    Otherwise a single letter after the number is an image variant of one patient (Figure 1
    COVID-19: ``COVID-00003a.jpg``, ``COVID-00003b.jpg`` are patient ``COVID-00003``) and is
    dropped; any other stem is its own group. For other naming schemes, ship the split as
    ``train/``, ``val/`` and ``test/`` folders (:func:`split_files` then uses them as they are).
    """
    stem = path.stem.split("_")[0]
    variant = _VARIANT.match(stem)
    return variant.group(1) if variant else stem


def split_of(path: Path, *, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """Deterministic split by a hash of the group key, so one patient never spans two splits."""
    digest = hashlib.sha256(group_key(path).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_files(root: Path, split: str) -> list[Path]:
    """Files of ``split``: the ``root/<split>`` folder when the data set ships its own split,
    else a hash split of every image under ``root`` (see :func:`split_of`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if all((root / s).is_dir() for s in SPLITS):
        return list_images(root / split)
    return [p for p in list_images(root) if split_of(p) == split]


@dataclass
class CropSampler:
    """Random aligned (HR, LR) crops. LR of each whole image is computed once (blur + bicubic,
    unquantised); noise and quantisation are applied per crop, so low-dose noise is fresh."""

    files: list[Path]
    degradation: Degradation
    hr_crop: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        s = self.degradation.scale
        if self.hr_crop % s:
            raise ValueError(f"hr_crop ({self.hr_crop}) must be a multiple of the scale {s}")
        if not self.files:
            raise ValueError("no training images found")
        self.hr: list[np.ndarray] = []
        self.lr: list[np.ndarray] = []
        for path in self.files:
            hr = crop_to_scale(load_gray(path), s)
            if min(hr.shape) < self.hr_crop:
                continue
            self.hr.append(hr)
            self.lr.append(self.degradation.clean_lr(hr))
        if not self.hr:
            raise ValueError(f"no image is at least {self.hr_crop} px on each side")
        self.rng = np.random.default_rng(self.seed)

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns HR (N, 1, c, c) and LR (N, 1, c/4, c/4) float32 arrays."""
        s, c = self.degradation.scale, self.hr_crop
        lc = c // s
        hrs, lrs = [], []
        for _ in range(size):
            i = int(self.rng.integers(len(self.hr)))
            lr_full = self.lr[i]
            y = int(self.rng.integers(lr_full.shape[0] - lc + 1))
            x = int(self.rng.integers(lr_full.shape[1] - lc + 1))
            hr = self.hr[i][y * s : (y + lc) * s, x * s : (x + lc) * s]
            lr = self.degradation.finish(lr_full[y : y + lc, x : x + lc], self.rng)
            if self.rng.random() < 0.5:
                hr, lr = hr[:, ::-1], lr[:, ::-1]
            hrs.append(hr)
            lrs.append(lr)
        return np.stack(hrs)[:, None].copy(), np.stack(lrs)[:, None].copy()
