"""A process pool that reports each result as it comes and survives a dead worker."""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

__all__ = ["pool_map"]

T = TypeVar("T")


def pool_map(
    function: Callable[..., T], jobs: list[tuple[Any, ...]], workers: int, tick: Callable[[T], None]
) -> Iterator[tuple[int, T | BaseException]]:
    """Run ``function(*job)`` for every job (in a process pool when workers > 1); yields (index, result)."""
    if workers <= 1 or len(jobs) <= 1:
        for index, job in enumerate(jobs):
            result = function(*job)
            tick(result)
            yield index, result
        return
    context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures: dict[Future, int] = {pool.submit(function, *job): index for index, job in enumerate(jobs)}
        for future in as_completed(futures):
            try:
                result = future.result()
            except BaseException as exc:  # a worker died (e.g. out of memory): report, go on
                yield futures[future], exc
                continue
            tick(result)
            yield futures[future], result
