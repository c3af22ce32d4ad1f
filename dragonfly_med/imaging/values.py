"""Header values read leniently, and facts made JSON-safe.

DICOM headers from the field hold empty strings, multi-valued elements where one value is
expected and numbers that do not parse; a missing or odd value must never stop an image from
showing. These helpers turn any of them into a plain value or None.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def text(value: Any) -> str | None:
    if value is None:
        return None
    out = str(value).strip()
    return out or None


def as_float(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except Exception:
        return None


def as_int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except Exception:
        return None


def as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def json_safe(value: Any) -> Any:
    """Recursively convert numpy scalars, pydicom values and tuples into JSON types."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return str(value)
