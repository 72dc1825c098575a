"""Putting figures into a report section (finite floats, or null with a reason), and small ops on one thread."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

__all__ = ["put", "number", "ratio", "units", "single_threaded"]


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


@contextmanager
def single_threaded() -> Iterator[None]:
    """Torch and the BLAS behind numpy on one thread each, restored afterwards.

    The metric sections run thousands of small matrix operations (128-d covariances, k-NN blocks of
    a few hundred rows). Two threads per op gain nothing there, and when another process holds a
    core, threads spinning on each other at every op make them many times slower (measured on a
    2-core machine under load: the fidelity section of 1,000 vs 1,000 images took 30 s on two
    threads, 0.6 s on one).
    """
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(previous)
