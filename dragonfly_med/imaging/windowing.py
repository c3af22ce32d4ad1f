"""DICOM display mapping: decoded stored values -> 8-bit RGB, and the window that was used.

Greyscale (PS3.3 C.11 / PS3.4 N.2):
    stored values -> modality LUT or rescale slope/intercept -> VOI LUT or window
    -> MONOCHROME1 inversion -> uint8
Colour: YBR is converted to RGB by the decoder, PALETTE COLOR goes through its LUT, RGB is
scaled by its bit depth. The caller's window request (a preset, "C,W", "minmax", "file[:N]") is
parsed and checked here too, since the presets and the window functions are one vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dragonfly_med.imaging.dicom_decode import frame_value
from dragonfly_med.imaging.errors import (
    CorruptFileError,
    InvalidRequestError,
    UnsupportedError,
    damaged_header,
)
from dragonfly_med.imaging.values import as_float, as_int, as_list, json_safe

# Centre/width pairs as PACS viewers ship them (Hounsfield units).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "liver": (90.0, 150.0),
    "bone": (480.0, 2500.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}


@dataclass
class Window:
    """The window/level used for display; source is file, preset:<name>, custom or minmax."""

    center: float
    width: float
    source: str
    function: str = "LINEAR"  # DICOM VOI LUT Function, or VOI_LUT when a LUT table was used

    def to_dict(self) -> dict[str, Any]:
        return {k: json_safe(v) for k, v in asdict(self).items()}


def parse_window(text: str) -> str | tuple[float, float]:
    """'lung' / 'soft tissue' / 'minmax' / 'file' / 'file:2' -> name; '-600,1500' -> (C, W).

    Users type presets in many ways, so case, spaces and hyphens are normalised.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError(_window_help("An empty window was given"))
    name = text.strip().lower().replace("-", "_").replace(" ", "_")
    if name in WINDOW_PRESETS or name in ("minmax", "file"):
        return name
    if name.startswith("file:") and name[5:].isdigit():
        return name
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 2:
        try:
            center, width = float(parts[0]), float(parts[1])
        except ValueError:
            pass
        else:
            return _check_custom_window(center, width)
    raise InvalidRequestError(_window_help(f"'{text.strip()[:40]}' is not a window"))


def normalise_window(window: Any) -> str | tuple[float, float] | None:
    """load_image's window option: None, a name from `parse_window`, or a checked (C, W)."""
    if window is None:
        return None
    if isinstance(window, str):
        return parse_window(window)
    try:
        center, width = (float(v) for v in window)
    except Exception as exc:
        raise InvalidRequestError(_window_help("The window must be (center, width)")) from exc
    return _check_custom_window(center, width)


def _check_custom_window(center: float, width: float) -> tuple[float, float]:
    if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
        raise InvalidRequestError(
            _window_help(f"A window width of {width:g} cannot be displayed (it must be >= 1)")
        )
    return (center, width)


def _window_help(what: str) -> str:
    names = ", ".join(WINDOW_PRESETS)
    return f"{what}: use a preset ({names}), 'minmax', or centre,width such as 40,400"


def to_rgb8(
    arr: np.ndarray, ds, index: int, request: str | tuple[float, float] | None
) -> tuple[np.ndarray, Window | None]:
    """Map one decoded frame to HxWx3 uint8; returns the window used (None for colour)."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return _colour_to_uint8(arr, ds), None
    if arr.ndim != 2:
        raise UnsupportedError(
            f"This DICOM stores {arr.shape[-1]} colour samples per pixel, which is not "
            "supported: export it as RGB or greyscale"
        )
    if photometric == "PALETTE COLOR":
        return _palette_to_rgb(arr, ds), None
    grey, window = _grey_to_uint8(arr, ds, index, request)
    return np.repeat(grey[:, :, None], 3, axis=2), window


def _colour_to_uint8(arr: np.ndarray, ds) -> np.ndarray:
    """RGB (YBR already converted by the decoder) at any bit depth -> uint8 by bit depth."""
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    bits = as_int(ds.get("BitsStored")) or 0
    if not 1 <= bits <= arr.dtype.itemsize * 8:
        bits = arr.dtype.itemsize * 8
    scale = 255.0 / float(2**bits - 1)
    return np.clip(arr.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8)


def _palette_to_rgb(arr: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(arr, ds)
    except Exception as exc:
        raise CorruptFileError(damaged_header("colour palette")) from exc
    if rgb.dtype != np.uint8:
        # 16-bit LUT entries; some writers store 8-bit values in them.
        rgb = rgb.astype(np.float64) / (257.0 if rgb.max() > 255 else 1.0)
        rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return rgb


def _grey_to_uint8(
    arr: np.ndarray, ds, index: int, request: str | tuple[float, float] | None
) -> tuple[np.ndarray, Window]:
    """Modality LUT -> VOI LUT or window -> MONOCHROME1 inversion -> uint8."""
    values = _apply_modality(arr, ds, index)
    if values.dtype.kind == "f" and arr.dtype.kind == "f":  # Float Pixel Data may hold NaN/inf
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lut_item = _voi_lut_item(ds) if request in (None, "file") else None
    if lut_item is not None:
        out, window = _apply_voi_lut_table(values, ds, lut_item)
    else:
        window = _choose_window(values, ds, index, request)
        out = apply_window(values, window)
    if _displays_inverted(ds):
        out = 1.0 - out
    return (out * 255.0 + 0.5).astype(np.uint8), window


def _apply_modality(arr: np.ndarray, ds, index: int) -> np.ndarray:
    """Stored values -> modality units (HU for CT) as float32."""
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        try:
            return apply_modality_lut(arr, ds).astype(np.float32)
        except Exception:
            pass  # a broken LUT: fall back to the stored values rather than refusing
    slope = as_float(frame_value(ds, index, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = as_float(
        frame_value(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
    )
    values = arr.astype(np.float32)
    if slope not in (None, 0.0) and slope != 1.0:
        values *= slope
    if intercept not in (None, 0.0):
        values += intercept
    return values


def _voi_lut_item(ds):
    try:
        seq = ds.get("VOILUTSequence")
        return seq[0] if seq and "LUTData" in seq[0] and "LUTDescriptor" in seq[0] else None
    except Exception:
        return None


def _apply_voi_lut_table(values: np.ndarray, ds, item) -> tuple[np.ndarray, Window]:
    """Map through the file's VOI LUT; report it as the equivalent linear window.

    Done here rather than with pydicom's apply_voi, which wraps input values above 255 when
    the LUT has 8-bit entries.
    """
    entries = int(item.LUTDescriptor[0]) or 65536
    first = int(item.LUTDescriptor[1])
    lut = _lut_entries(item, ds)[:entries].astype(np.float32)
    if lut.size == 0:
        raise CorruptFileError(damaged_header("VOI lookup table"))
    index = np.clip(np.nan_to_num(values) - first, 0, lut.size - 1).astype(np.int64)
    lo, hi = float(lut.min()), float(lut.max())
    out = (lut[index] - lo) / (hi - lo) if hi > lo else np.zeros(values.shape, np.float32)
    return out, Window(first + entries / 2.0, float(entries), "file", "VOI_LUT")


def _lut_entries(item, ds) -> np.ndarray:
    """LUT Data as integers, whether stored as a US list or as OW bytes."""
    data = item.LUTData
    if isinstance(data, bytes):
        little = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
        return np.frombuffer(data, dtype="<u2" if little else ">u2").astype(np.int64)
    return np.asarray(as_list(data), dtype=np.int64)


def file_windows(ds, index: int = 0) -> list[dict[str, Any]]:
    """Every centre/width pair the file offers (multi-valued elements included)."""
    centers = as_list(frame_value(ds, index, "FrameVOILUTSequence", "WindowCenter"))
    widths = as_list(frame_value(ds, index, "FrameVOILUTSequence", "WindowWidth"))
    names = as_list(frame_value(ds, index, "FrameVOILUTSequence", "WindowCenterWidthExplanation"))
    out = []
    for i, (c, w) in enumerate(zip(centers, widths, strict=False)):
        c, w = as_float(c), as_float(w)
        if c is None or w is None or not (math.isfinite(c) and math.isfinite(w)) or w < 1:
            continue
        name = str(names[i]) if i < len(names) and names[i] else None
        out.append({"center": c, "width": w, "explanation": name})
    return out


def _choose_window(
    values: np.ndarray, ds, index: int, request: str | tuple[float, float] | None
) -> Window:
    """Requested preset/custom window, else the file's first window, else min..max."""
    function = str(frame_value(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR")
    if isinstance(request, tuple):
        return Window(request[0], request[1], "custom")
    if isinstance(request, str) and request in WINDOW_PRESETS:
        center, width = WINDOW_PRESETS[request]
        return Window(center, width, f"preset:{request}")
    offered = file_windows(ds, index)
    if isinstance(request, str) and request.startswith("file"):
        pick = int(request[5:]) if request.startswith("file:") else 0
        if pick >= len(offered):
            raise InvalidRequestError(
                f"This image offers {len(offered)} window(s) of its own, so 'file:{pick}' does "
                "not exist: choose a preset or a centre,width such as 40,400"
            )
        return Window(offered[pick]["center"], offered[pick]["width"], "file", function.upper())
    if request is None and offered:
        return Window(offered[0]["center"], offered[0]["width"], "file", function.upper())
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return Window((lo + hi) / 2.0, hi - lo, "minmax", "MINMAX")


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 window functions, giving 0..1 floats."""
    c, w = window.center, window.width
    if window.function == "MINMAX":
        lo = c - w / 2.0
        out = (values - lo) / w if w > 0 else np.zeros_like(values)
    elif window.function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    elif window.function == "LINEAR_EXACT":
        out = (values - c) / w + 0.5
    else:  # LINEAR
        out = (values - (c - 0.5)) / max(w - 1.0, 1e-6) + 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def _displays_inverted(ds) -> bool:
    """MONOCHROME1 shows its minimum as white; an INVERSE presentation LUT flips it again."""
    mono1 = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    inverse = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    return mono1 != inverse
