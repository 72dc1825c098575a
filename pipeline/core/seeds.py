"""Seeds as named streams: every random draw is keyed by the run's seed and the purpose it serves.

Deriving a seed as ``seed + 11`` makes two purposes collide as soon as one seed is 11 above
another; hashing ``(seed, purpose, counters...)`` gives independent, reproducible streams that do
not depend on the order in which they are requested.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["stream_seed", "stream_rng"]


def stream_seed(*parts: int | str) -> int:
    """A non-negative int64 seed for the stream named by ``parts`` (e.g. ``seed, "step", rank, step``)."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stream_rng(*parts: int | str) -> np.random.Generator:
    """A NumPy generator for the stream named by ``parts``."""
    return np.random.default_rng(stream_seed(*parts))
