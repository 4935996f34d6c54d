"""Grayscale image folders, a leak-free split, and random aligned HR/LR crops for training.

Bit depth comes from the file's pixel mode (8-bit ``L``, 16-bit ``I;16``), so a dark 16-bit image
is never mistaken for an 8-bit one. One refinement for 16-bit files: detector data is usually 12
bits stored in a 16-bit container (DICOM BitsStored 12), and read as 16-bit it would fill 1/16 of
the range (a near-black input to the network, and PSNR inflated by 24 dB). A 16-bit file whose
maximum is below 4096 is therefore read as 12-bit (0-4095); any other as 16-bit.
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


# the smallest image a score or a training crop can use: SSIM's 11-px window inside a 4-px border
MIN_SIDE = 32


def read_gray(path: Path) -> tuple[np.ndarray, int]:
    """An 8-, 12- or 16-bit grayscale (or RGB, converted) image as float32 in [0, 1], and its
    quantisation levels (255, 4095 or 65535: see the module docstring)."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):  # "I": a 32-bit container, e.g. 16-bit TIFF
                arr = np.asarray(img).astype(np.float64)
                levels = 4095 if arr.size and arr.max() < 4096 else 65535
                return (arr / levels).clip(0, 1).astype(np.float32), levels
            if mode == "F":
                raise ValueError(f"{path}: floating-point images have no defined range; convert to 8/16-bit")
            if mode != "L":
                img = img.convert("L")
            return np.asarray(img, dtype=np.float32) / 255.0, 255
    except OSError as exc:  # truncated, empty or not an image: name the file and what to do
        raise ValueError(f"{path}: cannot be read as an image ({exc}); replace or remove it") from None


def load_gray(path: Path) -> np.ndarray:
    """:func:`read_gray` without the levels."""
    return read_gray(path)[0]


def levels_of(path: Path) -> int:
    """Quantisation levels of an image file, as :func:`read_gray` reads it."""
    return read_gray(path)[1]


def check_scorable(path: Path, img: np.ndarray) -> np.ndarray:
    """``img`` when both sides are at least :data:`MIN_SIDE` px, else a ValueError naming the file."""
    if min(img.shape) < MIN_SIDE:
        raise ValueError(
            f"{path} is {img.shape[1]}x{img.shape[0]} px: too small to score or train on (at least "
            f"{MIN_SIDE} px per side); remove it from the folder"
        )
    return img


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist: point the config's [data] root (or --set "
            "data.root=DIR) at a folder of 8/16-bit grayscale PNG/TIFF images"
        )
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


_VARIANT = re.compile(r"^(.*\d)[A-Za-z]$")


def group_key(path: Path) -> str:
    """Patient-level key of a file in a flat folder, so one patient's images share a split.

    NIH ChestX-ray14 names are ``<patient>_<followup>.png``: the part before the first ``_``.
    Otherwise a single letter after the number is an image variant of one patient (Figure 1
    COVID-19: ``COVID-00003a.jpg``, ``COVID-00003b.jpg`` are patient ``COVID-00003``) and is
    dropped; any other stem is its own group. Folder-per-patient layouts are keyed by folder
    (:func:`group_keys`). For other naming schemes, ship the split as ``train/``, ``val/`` and
    ``test/`` folders (:func:`split_files` then uses them as they are).
    """
    stem = path.stem.split("_")[0]
    variant = _VARIANT.match(stem)
    return variant.group(1) if variant else stem


def group_keys(root: Path, files: list[Path]) -> dict[Path, str]:
    """Each file's patient key. Below the folders every file shares (``images/`` of a flat data
    set), a file in a subfolder belongs to that subfolder's group (``patient00001/study1/
    view1_frontal.png`` of a folder-per-patient layout: every image of patient00001 together);
    a file directly there is keyed by its name (:func:`group_key`)."""
    parents = [p.relative_to(root).parts[:-1] for p in files]
    common = 0
    while parents and all(len(q) > common and q[common] == parents[0][common] for q in parents):
        common += 1
    return {
        path: ("/".join(parts[: common + 1]) + "/") if len(parts) > common else group_key(path)
        for path, parts in zip(files, parents, strict=True)
    }


def split_of(path: Path, *, key: str | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """Deterministic split by a hash of the group key (``key``, else :func:`group_key` of the
    name), so one patient never spans two splits."""
    digest = hashlib.sha256((group_key(path) if key is None else key).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def shipped_splits(root: Path) -> bool:
    """True when ``root`` ships its split as train/, val/ and test/ folders; a ValueError when it
    has only some of them (treating it as flat would mix one split's images into another)."""
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present and len(present) < len(SPLITS):
        missing = [s for s in SPLITS if s not in present]
        raise ValueError(
            f"{root} has {', '.join(s + '/' for s in present)} but no {', '.join(s + '/' for s in missing)}: "
            "a data set that ships its split needs all three folders (an empty one is fine for a "
            "split you do not use); without any of them every image under the folder is split by "
            "patient (model.data.split_of)"
        )
    return bool(present)


def split_files(root: Path, split: str) -> list[Path]:
    """Files of ``split``: the ``root/<split>`` folder when the data set ships its own split,
    else a hash split of every image under ``root`` by patient (see :func:`group_keys`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if shipped_splits(root):
        return list_images(root / split)
    files = list_images(root)
    keys = group_keys(root, files)
    return [p for p in files if split_of(p, key=keys[p]) == split]


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
            raise ValueError("no training images were given")
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
