"""Shared helpers for the eligibility / pixels / derive tests: the shared DICOM files and a
bicubic stand-in for the super-resolution model (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

DICOM_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
CHEST_DIR = DICOM_DIR / "chest"
OTHER_DIR = DICOM_DIR / "other"

COVID = "1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
CHEST_FILES = ("test1.dcm", "test2.dcm", "test3.dcm", COVID, "RG1_J2KI.dcm", "CR-MONO1-10-chest.dcm")


def require_data() -> None:
    if not CHEST_DIR.is_dir() or not OTHER_DIR.is_dir():
        pytest.skip(f"the shared DICOM test files are not at {DICOM_DIR}", allow_module_level=True)


def read(path: Path | str) -> pydicom.Dataset:
    """Read a test file; ``force=True`` because CR-MONO1-10-chest.dcm has no File Meta."""
    return pydicom.dcmread(path, force=True)


def chest(name: str) -> pydicom.Dataset:
    return read(CHEST_DIR / name)


def other(name: str) -> pydicom.Dataset:
    return read(OTHER_DIR / name)


def bicubic_upscale(unit: np.ndarray, scale: int = 4) -> np.ndarray:
    """Stand-in for the model: Pillow bicubic on a float32 ('F') image, clipped to [0, 1]."""
    rows, cols = unit.shape
    image = Image.fromarray(np.ascontiguousarray(unit, dtype=np.float32))
    big = image.resize((cols * scale, rows * scale), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(big, dtype=np.float32), 0.0, 1.0)
