"""Process-wide torch settings a stage may change for its own duration, and then gives back.

A library function that calls ``torch.set_num_threads`` or ``torch.manual_seed`` changes the
caller's process: a notebook that trains and then evaluates would run evaluate with the thread
count and the random stream that training left behind. Stages wrap such changes in these
context managers instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["torch_threads", "preserved_torch_rng"]


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads (None: unchanged), restoring the previous count after."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def preserved_torch_rng() -> Iterator[None]:
    """Restore torch's global CPU (and CUDA) random state on exit, whatever the body seeded."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
