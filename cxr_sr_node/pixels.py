"""Pixel mapping between a CR/DX dataset and the model's [0, 1] domain (DESIGN §4).

The model was trained on display-contrast images; CR/DX stored values are often raw
(10-16 bit, narrow used range, MONOCHROME1). The path is:

    stored values --Modality LUT--> modality values v
    u = (v - low) / (high - low)                      low, high = 0.5th / 99.5th percentile of v
    u = 1 - u                                          for MONOCHROME1, so bone is always bright
    sr = SR(clip(u, 0, 1)) + bilinear_x4(u - clip(u, 0, 1))          (see :func:`restore_range`)
    v = low + sr * (high - low)                        (after undoing the inversion)
    out = v              (MONOCHROME2 source)
    out = out_max - v    (MONOCHROME1 source: flipped, the output is always MONOCHROME2)
    out = clip(round(out), 0, out_max),  out_max = 2**BitsStored - 1,  uint16
    (a fractional Rescale Slope or Intercept: out = round((out - intercept') / |slope|), stored
    with that Rescale Slope and Intercept, so no modality step is lost; see PixelMapping.storage)

Decisions where DESIGN is silent:

- The output's stored values are the source's *modality* values (the output has an identity
  Modality LUT and carries no Rescale Slope/Intercept), so Window Center/Width, which are defined
  on modality values, carry over unchanged for MONOCHROME2 sources. Where the source's modality
  values step by a fraction (Rescale Slope 0.684, or 0.01; a fractional Intercept), whole units
  would merge its levels (a 10-bit image at slope 0.01 kept 11 of 214): the output then stores
  values in steps of |slope| with its own Rescale Slope/Intercept (Modality LUT module, allowed in
  the SC Image IOD), in the source's BitsStored, and its modality values are the source's.
- The bit depth always comes from BitsStored, never from the observed maximum (BasicSR's
  ``max > 256`` trap): a 16-bit image whose values happen to be < 256 stays a 16-bit image.
- The map itself is not clipped, so it is exactly invertible for every pixel, the 1 % beyond the
  robust range included (the densest bone, metal, lead markers, collimated air). The model is
  trained on [0, 1] and only sees that; what lies beyond it is added back after SR, upsampled
  bilinearly (no overshoot, so no halo around a marker). Before 2026-11-26 those pixels were
  clipped to the percentiles: implants and markers came back as flat plateaus.
- A flat image (robust range of zero width) gets a span of one modality unit so the map stays
  invertible; the model then sees a constant image.
- Down-sampling in :func:`resample_to_fit` uses Pillow's Lanczos filter on 32-bit float ('F')
  images: Pillow widens the kernel by the reduction factor (true anti-aliasing), unlike
  ``scipy.ndimage.zoom``, which samples without a low-pass filter and aliases.
- Datasets without a Transfer Syntax UID (headerless files read with ``force=True``) are decoded
  with the syntax their encoding implies (implicit/explicit VR, little/big endian, native pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut, as_pixel_options, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import DS

ROBUST_LOW_PERCENTILE = 0.5
ROBUST_HIGH_PERCENTILE = 99.5
FLAT_IMAGE_SPAN = 1.0  # modality units used when the robust range has zero width
MAX_BITS_STORED = 16  # the output is a 16-bit container
RESAMPLE_FILTER = Image.Resampling.LANCZOS
RESAMPLE_FILTER_NAME = "Lanczos"
SOURCE_WINDOW_EXPLANATION = "SOURCE MIN-MAX"  # the window of a source that has none (see voi_for_output)
ROBUST_WINDOW_EXPLANATION = "ROBUST 0.5-99.5 PCT"  # the same, for a mapping that does not know the extremes

# VOI LUT Function values (PS3.3 C.11.2.1.3) and how each mirrors (see voi_for_output).
VOI_LINEAR = "LINEAR"
VOI_LINEAR_EXACT = "LINEAR_EXACT"
VOI_SIGMOID = "SIGMOID"


@dataclass(frozen=True)
class PixelMapping:
    """Everything needed to invert :func:`to_unit`.

    ``low``/``high`` are the robust range in modality-value units (after Rescale Slope/Intercept
    or the Modality LUT Sequence); ``invert`` is True for MONOCHROME1 sources; ``bits_stored`` is
    the output's BitsStored: the source's, widened (up to 16) when its modality values go beyond
    what the source's BitsStored can hold (a Rescale Intercept or a Modality LUT with a wider output)
    so that they are not clipped; ``source_bits_stored`` is the source's when it differs.
    ``vmin``/``vmax`` are the source's extreme modality values (the display window of a source
    without one), when known. ``storage``: the output stores them in fractional steps (see
    :class:`Storage`); ``bits_stored`` and ``out_max`` stay those of the modality values (the
    MONOCHROME1 flip and the windows use them), ``stored_bits`` is the output's BitsStored.
    """

    low: float
    high: float
    invert: bool
    bits_stored: int
    source_bits_stored: int | None = None
    vmin: float | None = None
    vmax: float | None = None
    storage: Storage | None = None  # None: the output stores modality values as they are

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high)):
            raise ValueError(f"PixelMapping low/high must be finite; got low={self.low}, high={self.high}")
        if self.high <= self.low:
            raise ValueError(f"PixelMapping needs high > low; got low={self.low}, high={self.high}")
        if not 1 <= self.bits_stored <= MAX_BITS_STORED:
            raise ValueError(
                f"PixelMapping bits_stored must be 1..{MAX_BITS_STORED} (a 16-bit output container); "
                f"got {self.bits_stored}"
            )

    @property
    def out_max(self) -> int:
        """Largest output modality value: ``2**bits_stored - 1``."""
        return 2**self.bits_stored - 1

    @property
    def stored_bits(self) -> int:
        """The output's BitsStored."""
        return self.bits_stored if self.storage is None else self.storage.bits

    @property
    def span(self) -> float:
        return self.high - self.low

    def describe(self) -> str:
        """One line for DerivationDescription: the exact, invertible map that was used."""
        polarity = "MONOCHROME1 inverted for the model, output flipped to MONOCHROME2" if self.invert else (
            "MONOCHROME2"
        )
        if self.storage is not None:
            stored = (f"BitsStored {self.storage.bits}, RescaleSlope {self.storage.slope:.6g}, RescaleIntercept "
                      f"{self.storage.intercept:.6g} (the source's fractional modality steps kept)")
        else:
            widened = (
                f", widened from the source's {self.source_bits_stored} to hold its modality values"
                if self.source_bits_stored and self.source_bits_stored != self.bits_stored else ""
            )
            stored = f"BitsStored {self.bits_stored} (0-{self.out_max}{widened})"
        return (
            f"modality values [{self.low:.6g}, {self.high:.6g}] "
            f"({ROBUST_LOW_PERCENTILE}-{ROBUST_HIGH_PERCENTILE} percentile) mapped linearly to [0, 1], "
            f"values beyond it added back after SR (bilinear); {polarity}; {stored}"
        )


@dataclass(frozen=True)
class Storage:
    """How the output stores modality values ``v`` that step by a fraction: ``round((v - intercept) /
    slope)`` in ``bits`` bits, written with that RescaleSlope and RescaleIntercept. The range is the
    source's own: for a MONOCHROME2 source the stored values are the source's."""

    slope: float
    intercept: float
    bits: int

    @property
    def stored_max(self) -> int:
        return 2**self.bits - 1

    def store(self, values: np.ndarray) -> np.ndarray:
        stored = np.rint((values.astype(np.float64) - self.intercept) / self.slope)
        return np.clip(stored, 0, self.stored_max).astype(np.uint16)


def output_bits_stored(source_bits: int, vmax: float) -> int:
    """BitsStored of the output: the source's, or more (at most 16) if ``vmax`` needs more bits.

    The output stores modality values; a Rescale Intercept (12-bit data + 500) or a Modality LUT
    whose output is wider than BitsStored gives values the source's BitsStored cannot hold.
    """
    needed = max(1, int(np.rint(max(vmax, 0.0))).bit_length())
    return min(MAX_BITS_STORED, max(source_bits, needed))


def transfer_syntax_of(ds: Dataset) -> UID | None:
    """Return the dataset's Transfer Syntax UID, or the one its encoding implies.

    A dataset read with ``force=True`` from a headerless file has no File Meta; its pixel data is
    then native and the syntax follows from how the dataset was encoded. None when neither is known.
    """
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and file_meta.get("TransferSyntaxUID"):
        return UID(file_meta.TransferSyntaxUID)
    is_implicit_vr, is_little_endian = getattr(ds, "original_encoding", (None, None))
    if is_implicit_vr is None or is_little_endian is None:
        return None
    if is_implicit_vr:
        return ImplicitVRLittleEndian if is_little_endian else None
    return ExplicitVRLittleEndian if is_little_endian else ExplicitVRBigEndian


def decode(ds: Dataset) -> np.ndarray:
    """Decode the Pixel Data as stored values: ``ds.pixel_array``, or the implied syntax when the
    dataset has no Transfer Syntax UID (see :func:`transfer_syntax_of`)."""
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and file_meta.get("TransferSyntaxUID"):
        return ds.pixel_array
    tsyntax = transfer_syntax_of(ds)
    if tsyntax is None:
        raise ValueError(
            "cannot decode Pixel Data: the dataset has no (0002,0010) Transfer Syntax UID and its "
            "encoding is unknown; set ds.file_meta.TransferSyntaxUID"
        )
    arr, _ = get_decoder(tsyntax).as_array(ds, validate=True, **as_pixel_options(ds))
    return arr


def to_unit(ds: Dataset) -> tuple[np.ndarray, PixelMapping]:
    """Decode, apply the Modality LUT and map linearly so the robust range is [0, 1] (bone bright).

    Returns the (rows, columns) float32 image and the :class:`PixelMapping` that inverts it. About
    1 % of the pixels lie outside [0, 1]; the model must get ``np.clip(unit, 0, 1)`` and
    :func:`restore_range` adds the rest back.
    """
    stored = decode(ds)
    if stored.ndim != 2:
        raise ValueError(
            f"to_unit needs a single-frame, single-sample image; decoded Pixel Data has shape {stored.shape}"
        )
    values = _modality_values(stored, ds)  # (H, W) float64
    low, high = (float(p) for p in np.percentile(values, [ROBUST_LOW_PERCENTILE, ROBUST_HIGH_PERCENTILE]))
    if high - low <= 0:
        high = low + FLAT_IMAGE_SPAN
    vmin, vmax = float(values.min()), float(values.max())
    source_bits = int(ds.BitsStored)
    invert = _photometric(ds) == "MONOCHROME1"
    bits = output_bits_stored(source_bits, vmax)
    mapping = PixelMapping(
        low=low,
        high=high,
        invert=invert,
        bits_stored=bits,
        source_bits_stored=source_bits,
        vmin=vmin,
        vmax=vmax,
        storage=_fractional_storage(ds, source_bits, 2**bits - 1 if invert else None),
    )
    unit = (values - low) / mapping.span  # not clipped: values beyond the robust range survive
    if mapping.invert:
        unit = 1.0 - unit
    return unit.astype(np.float32), mapping


def _fractional_storage(ds: Dataset, source_bits: int, flip: int | None) -> Storage | None:
    """A :class:`Storage` when the source's Rescale Slope/Intercept make fractional modality steps.

    ``flip``: the MONOCHROME1 output's ``out_max`` (its values are ``flip - v``), None otherwise.
    The output's range is the source's full stored range through its rescale (flipped for
    MONOCHROME1), so every source value is representable and nothing new is clipped.
    """
    if "ModalityLUTSequence" in ds or "RescaleSlope" not in ds:
        return None
    slope, intercept = float(ds.RescaleSlope), float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 0 or (abs(slope) >= 1 and slope.is_integer() and intercept.is_integer()):
        return None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lowest_stored = -(2 ** (source_bits - 1)) if signed else 0
    ends = (intercept + slope * lowest_stored, intercept + slope * (lowest_stored + 2**source_bits - 1))
    low, high = min(ends), max(ends)
    return Storage(slope=abs(slope), intercept=(flip - high) if flip is not None else low, bits=source_bits)


def from_unit(sr: np.ndarray, mapping: PixelMapping) -> np.ndarray:
    """Exact inverse of :func:`to_unit`, to MONOCHROME2 uint16 in [0, out_max] (stored through
    ``mapping.storage`` when the source has fractional modality steps).

    Values outside [0, 1] map linearly beyond ``low``/``high`` (see :func:`restore_range`); only
    the result is clipped, to what BitsStored allows. Raises ValueError for non-finite input.
    """
    unit = np.asarray(sr, dtype=np.float32)
    if unit.ndim != 2:
        raise ValueError(f"from_unit needs a 2-D image; got shape {unit.shape}")
    if not np.isfinite(unit).all():
        raise ValueError("from_unit got non-finite values (NaN or inf) from the super-resolution output")
    if mapping.invert:
        unit = 1.0 - unit  # back to the source's polarity
    values = np.float32(mapping.low) + unit * np.float32(mapping.span)  # modality values
    if mapping.invert:
        values = np.float32(mapping.out_max) - values  # MONOCHROME1 -> MONOCHROME2
    if mapping.storage is not None:
        return mapping.storage.store(values)
    return np.clip(np.rint(values), 0, mapping.out_max).astype(np.uint16)


def restore_range(sr: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Add back to the SR of ``clip(unit, 0, 1)`` what the clip took from ``unit``.

    The excess ``unit - clip(unit, 0, 1)`` (non-zero only beyond the robust range) is upsampled to
    ``sr``'s shape with Pillow's bilinear filter on float32, which has no negative lobes: a bright
    marker gets no dark halo. Where ``unit`` is inside [0, 1], ``sr`` is returned unchanged.
    """
    unit = np.asarray(unit, dtype=np.float32)
    excess = unit - np.clip(unit, 0.0, 1.0)
    if not excess.any():
        return sr
    rows, cols = sr.shape
    up = Image.fromarray(np.ascontiguousarray(excess)).resize((cols, rows), Image.Resampling.BILINEAR)
    return (np.asarray(sr, dtype=np.float32) + np.asarray(up, dtype=np.float32)).astype(np.float32)


def resample_to_fit(img: np.ndarray, max_output_px: int) -> tuple[np.ndarray, float, float]:
    """Shrink ``img`` so neither side exceeds ``max_output_px``, keeping the aspect ratio.

    Returns ``(img, row_ratio, col_ratio)`` with the true ratios ``out_rows / in_rows`` and
    ``out_cols / in_cols`` (they differ slightly after rounding to whole pixels; spacing must be
    recomputed per axis from them). An image that already fits is returned unchanged with ratios
    1.0. Resampler: Pillow Lanczos on float32 ('F' mode), then clipped to the input's range
    (Lanczos rings slightly past edges).
    """
    if max_output_px < 1:
        raise ValueError(f"max_output_px must be >= 1; got {max_output_px}")
    in_rows, in_cols = img.shape
    if max(in_rows, in_cols) <= max_output_px:
        return img, 1.0, 1.0
    factor = max_output_px / max(in_rows, in_cols)
    out_rows = min(max_output_px, max(1, round(in_rows * factor)))
    out_cols = min(max_output_px, max(1, round(in_cols * factor)))
    src = np.ascontiguousarray(img, dtype=np.float32)
    resized = Image.fromarray(src).resize((out_cols, out_rows), RESAMPLE_FILTER)  # PIL size is (W, H)
    out = np.clip(np.asarray(resized, dtype=np.float32), float(src.min()), float(src.max()))
    return out, out_rows / in_rows, out_cols / in_cols


def voi_for_output(ds: Dataset, mapping: PixelMapping) -> dict[str, Any]:
    """VOI LUT module attributes for the output, keyed by DICOM keyword, so it displays like the source.

    The output's stored values are modality values ``v`` (MONOCHROME2 source) or
    ``v' = out_max - v`` (MONOCHROME1 source, flipped to MONOCHROME2). A MONOCHROME1 display shows
    ``ymax - VOI(v)``; the output must show the same brightness through its own VOI, so
    ``VOI'(out_max - v) = ymax - VOI(v)``:

    - Window LINEAR (the default; PS3.3 C.11.2.1.2.1, with its half-unit offset
      ``(x - (c - 0.5)) / (w - 1)``): ``c' = out_max + 1 - c``, ``w' = w``. (The ``+ 1`` is exact:
      plain ``out_max - c`` is off by one unit.)
    - LINEAR_EXACT (``(x - c) / w``) and SIGMOID: ``c' = out_max - c``, ``w' = w``.
    - VOI LUT Sequence: entries are reversed and complemented, ``LUT'[j] = (2**n - 1) - LUT[N-1-j]``
      with ``first' = out_max - (first + N - 1)``; entries for input values outside
      [0, out_max] are dropped (the output cannot contain them).

    MONOCHROME2 sources keep windows and LUTs as they are. All windows of a multi-valued window
    are mirrored (Window Center/Width pairs; explanations carried). When the source has neither
    windows nor a VOI LUT, viewers show it from its minimum to its maximum; the output gets the
    LINEAR window that does exactly that for the source's extremes ``[a, b]`` in output values
    (``[vmin, vmax]``, or ``[out_max - vmax, out_max - vmin]`` for MONOCHROME1): ``c = (a + b + 1)
    / 2``, ``w = b - a + 1``, mapping ``a`` to black and ``b`` to white. The output shows the source's
    picture even where SR overshoots the extremes, and in viewers that would show an image
    without VOI over its whole BitsStored range. (A mapping without the extremes uses the robust range.)
    """
    out: dict[str, Any] = {}
    out.update(_windows_for_output(ds, mapping))
    luts = _voi_luts_for_output(ds, mapping)
    if luts:
        out["VOILUTSequence"] = luts
    if not out:
        out.update(_source_window(mapping))
    return out


# -- helpers ---------------------------------------------------------------------------------------


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "")).strip().upper()


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _ds(value: float) -> DS:
    return DS(float(value), auto_format=True)


def _mirrored_center(center: float, function: str, out_max: int) -> float:
    if function == VOI_LINEAR:
        return out_max + 1 - center
    return out_max - center  # LINEAR_EXACT, SIGMOID


def _windows_for_output(ds: Dataset, mapping: PixelMapping) -> dict[str, Any]:
    """The source's windows, mirrored for MONOCHROME1. Windows no viewer can use are not carried
    (with none left, the output gets :func:`_source_window`): a width below 1 (LINEAR, SIGMOID;
    PS3.3 C.11.2.1.2) or not above 0 (LINEAR_EXACT), or a center or width that is not a number."""
    function = str(ds.get("VOILUTFunction", VOI_LINEAR) or VOI_LINEAR).strip().upper()
    try:
        centers = [float(c) for c in _as_list(ds.get("WindowCenter"))]
        widths = [float(w) for w in _as_list(ds.get("WindowWidth"))]
    except (TypeError, ValueError):
        return {}
    explanations = _as_list(ds.get("WindowCenterWidthExplanation"))
    if len(explanations) != len(centers):
        explanations = [None] * len(centers)
    kept = [(c, w, e) for c, w, e in zip(centers, widths, explanations, strict=False)
            if np.isfinite(c) and np.isfinite(w) and (w > 0 if function == VOI_LINEAR_EXACT else w >= 1)]
    if not kept:
        return {}
    if mapping.invert:
        kept = [(_mirrored_center(c, function, mapping.out_max), w, e) for c, w, e in kept]
    out: dict[str, Any] = {
        "WindowCenter": [_ds(c) for c, _, _ in kept],
        "WindowWidth": [_ds(w) for _, w, _ in kept],
    }
    if all(e is not None for _, _, e in kept):
        out["WindowCenterWidthExplanation"] = [str(e) for _, _, e in kept]
    if "VOILUTFunction" in ds and ds.VOILUTFunction:
        out["VOILUTFunction"] = function
    return out


def _modality_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values through the Modality LUT (PS3.3 C.11.1) as float64.

    A Modality LUT Sequence is applied here rather than by pydicom, which cannot build an array
    for the 10- or 12-bit entries that real CR files declare (PS3.3 says 8 or 16; the entries
    are 16-bit words either way): inputs below the first mapped value take the first entry, above
    the last the last. Rescale Slope/Intercept go through pydicom.
    """
    sequence = ds.get("ModalityLUTSequence", None)
    if sequence:
        item = sequence[0]
        check_lut(item, "ModalityLUTSequence item 1")
        entries, first, _ = (int(x) for x in item.LUTDescriptor)
        data = _lut_data(item, ds, entries or 2**16)
        index = np.clip(stored.astype(np.int64) - first, 0, data.size - 1)
        return data[index].astype(np.float64)
    if "RescaleSlope" in ds and float(ds.RescaleSlope) == 0:
        raise ValueError("RescaleSlope is 0, so every pixel has the same modality value and there is no image to "
                         "super-resolve; correct the RescaleSlope of the source")
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)


def check_lut(item: Dataset, name: str) -> None:
    """Raise ValueError naming ``name`` unless ``item`` is a usable Modality/VOI LUT item:
    LUTDescriptor of three numbers with 8 to 16 bits per entry (PS3.3 C.11.2.1.1), and LUTData."""
    descriptor = _as_list(item.get("LUTDescriptor", None))
    if len(descriptor) != 3:
        raise ValueError(f"{name}: LUTDescriptor must hold 3 values (entries, first input value, bits); got {descriptor!r}")
    if not 8 <= int(descriptor[2]) <= 16:
        raise ValueError(f"{name}: LUTDescriptor gives {int(descriptor[2])} bits per entry; it must be 8 to 16")
    if "LUTData" not in item or item["LUTData"].value in (None, b"", []):
        raise ValueError(f"{name}: LUTData (0028,3006) is absent or empty")


def _lut_data(item: Dataset, ds: Dataset, entries: int) -> np.ndarray:
    elem = item["LUTData"]
    if isinstance(elem.value, bytes):  # OW: raw bytes in the dataset's byte order
        tsyntax = transfer_syntax_of(ds)
        dtype = ">u2" if tsyntax is not None and not tsyntax.is_little_endian else "<u2"
        return np.frombuffer(elem.value, dtype=dtype, count=entries).astype(np.int64)
    return np.asarray(_as_list(elem.value), dtype=np.int64)[:entries]


def _voi_luts_for_output(ds: Dataset, mapping: PixelMapping) -> list[Dataset]:
    luts: list[Dataset] = []
    for index, item in enumerate(ds.get("VOILUTSequence", None) or [], start=1):
        check_lut(item, f"VOILUTSequence item {index}")
        entries_declared, first, bits = (int(x) for x in item.LUTDescriptor)
        entries = entries_declared or 2**16
        data = _lut_data(item, ds, entries)
        inputs = first + np.arange(len(data))
        keep = (inputs >= 0) & (inputs <= mapping.out_max)
        data, inputs = data[keep], inputs[keep]
        if data.size == 0:
            continue
        if mapping.invert:
            data = (2**bits - 1) - data[::-1]
            first_out = mapping.out_max - int(inputs[-1])
        else:
            first_out = int(inputs[0])
        lut = Dataset()
        lut.LUTDescriptor = [data.size % 2**16, first_out, bits]  # 0 means 65536 entries
        lut.add_new("LUTData", "OW", data.astype("<u2").tobytes())
        if item.get("LUTExplanation"):
            lut.LUTExplanation = item.LUTExplanation
        luts.append(lut)
    return luts


def _source_window(mapping: PixelMapping) -> dict[str, Any]:
    explanation = ROBUST_WINDOW_EXPLANATION
    a, b = mapping.low, mapping.high
    if mapping.vmin is not None and mapping.vmax is not None:
        exact = mapping.storage is not None  # fractional modality steps: no rounding to whole units
        lo, hi = (float(np.clip(v if exact else np.rint(v), 0, mapping.out_max)) for v in (mapping.vmin, mapping.vmax))
        if hi > lo:  # a flat image keeps the robust range's (FLAT_IMAGE_SPAN wide) window
            a, b, explanation = lo, hi, SOURCE_WINDOW_EXPLANATION
    if mapping.invert:
        a, b = mapping.out_max - b, mapping.out_max - a
    return {
        "WindowCenter": [_ds((a + b + 1) / 2)],
        "WindowWidth": [_ds(b - a + 1)],
        "WindowCenterWidthExplanation": [explanation],
    }
