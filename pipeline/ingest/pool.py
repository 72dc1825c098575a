"""A process pool that reports each result as it comes and survives a dead worker."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sys
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

__all__ = ["pool_map", "quiet_readers"]

T = TypeVar("T")


def pool_map(
    function: Callable[..., T], jobs: list[tuple[Any, ...]], workers: int, tick: Callable[[T], None]
) -> Iterator[tuple[int, T | BaseException]]:
    """Run ``function(*job)`` for every job (in a process pool when workers > 1); yields (index, result)."""
    if workers <= 1 or len(jobs) <= 1:
        for index, job in enumerate(jobs):
            try:
                result = function(*job)
            except Exception as exc:  # the same contract as a failed worker below: report, go on
                yield index, exc
                continue
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


@contextlib.contextmanager
def quiet_readers() -> Iterator[None]:
    """Silence pydicom/nibabel warnings and log records for the block.

    Their messages can quote header values ("invalid value for VR DA: '19700101'"), which must
    never reach the console; ingest reports problems through quarantine reasons instead.
    """
    loggers = [logging.getLogger(name) for name in ("pydicom", "nibabel")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
