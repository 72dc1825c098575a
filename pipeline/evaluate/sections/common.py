"""Putting figures into a report section: numbers are finite floats or null with a reason beside them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["put", "number", "ratio", "units"]


def put(target: dict[str, Any], key: str, value: Any, reason: str | None) -> None:
    """Set ``target[key]``; a None value gets ``<key>_reason`` beside it."""
    target[key] = number(value)
    if target[key] is None:
        target[f"{key}_reason"] = reason or "not measurable"


def number(value: Any) -> Any:
    """A float for report.json (None for NaN/inf); None, bools and strings pass through."""
    if value is None or isinstance(value, (bool, str)):
        return value
    result = float(value)
    return result if math.isfinite(result) else None


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``; None when either is missing or the reference is (near) zero."""
    if value is None or reference is None or reference <= 1e-12:
        return None
    return value / reference


def units(points: np.ndarray, groups: np.ndarray | None) -> int:
    """Independent units of a set: subjects when grouped, else points."""
    return int(np.unique(groups.astype(str)).size) if groups is not None else int(points.shape[0])
