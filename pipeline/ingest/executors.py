"""Where ingest's per-series tasks run: this machine's process pool, or the workers of a Dask cluster.

Both executors run the same pure task (:func:`pipeline.ingest.task.process_series`) and report each
result as it comes, in any order, as ``(index, result)``; a task whose worker failed is reported as
``(index, exception)`` and the run goes on. The caller (the ingest stage, on the client) keeps the
manifest, split, quarantine and audit.

On Dask:

* The arguments every task shares (the pseudonymization key, the config) are scattered once to the
  workers under a neutral random name and passed to each task as a future: the key travels in memory
  only and never appears in a task's name, the scheduler's task specifications, a log or the dashboard.
  Every argument travels sealed (pickled, with a repr that shows nothing), so even Dask's debug log,
  which prints the data it receives, never prints the key or a source path.
* Task names are ``medsynth-ingest-<run token>-<n>``: they carry no path, label or pseudonym.
* A task never raises on a worker: Dask's "Compute Failed" log line quotes the task's arguments
  (source paths), so a failure comes back as a value and is raised here, on the client.
* A worker that dies mid-task loses nothing: the scheduler runs its tasks again on another worker, and
  a task rewrites the same bytes (outputs are written atomically, the resume record last).
* Every worker must see the sources, the dataset folder and the private folder at the same paths
  (shared storage); this is checked on each worker before any task is submitted.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.core.errors import InputError
from pipeline.ingest.config import ExecutorConfig
from pipeline.ingest.pool import pool_map

__all__ = ["RemoteTaskError", "map_tasks", "check_executor", "check_dask_installed"]

T = TypeVar("T")

_INSTALL_HINT = "pip install 'medsynth[cluster]' (dask[distributed])"


class RemoteTaskError(Exception):
    """A task failed on a Dask worker; the message is the exception's type name only (never its text)."""


class _Sealed:
    """A task argument whose repr shows nothing of it.

    Dask describes data in its debug log (a scattered ``bytes`` value is printed whole) and a task
    in some error logs; a sealed value travels pickled, so neither the key nor a source path is printed.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<medsynth: sealed>"

    def __getstate__(self) -> Any:
        return self.value

    def __setstate__(self, value: Any) -> None:
        self.value = value


@dataclass(frozen=True)
class _Failure:
    """What a guarded task returns instead of raising: the exception's type name, nothing else."""

    kind: str


def _guarded(function: Callable[..., T], *args: Any) -> T | _Failure:
    """Run ``function(*args)`` (sealed arguments unsealed) on a worker; an exception comes back as a value."""
    try:
        return function(*(arg.value if isinstance(arg, _Sealed) else arg for arg in args))
    except Exception as exc:  # reported on the client, where the stage quarantines the series
        return _Failure(type(exc).__name__)


def _missing_folders(folders: Sequence[str]) -> list[int]:
    """On one worker: the indexes of ``folders`` that are not a directory it can read."""
    return [index for index, folder in enumerate(folders) if not (os.path.isdir(folder) and os.access(folder, os.R_OK))]


def check_dask_installed() -> None:
    """Raise :class:`InputError` when ``dask.distributed`` cannot be imported."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise InputError(
            f"ingest.executor.kind is 'dask' but dask.distributed is not installed. Fix: {_INSTALL_HINT}, "
            "or set ingest.executor.kind: local."
        ) from None


def check_executor(executor: ExecutorConfig) -> None:
    """Refuse an executor that cannot run (no Dask installed, no scheduler at the address) before anything is written."""
    if executor.kind == "local":
        return
    check_dask_installed()
    if executor.address is not None:
        with _DaskClient(executor, 1):
            pass


def map_tasks(
    function: Callable[..., T],
    jobs: Sequence[tuple[Any, ...]],
    shared: tuple[Any, ...],
    executor: ExecutorConfig,
    workers: int,
    tick: Callable[[T], None],
    folders: Sequence[tuple[str, str]] = (),
    priorities: Sequence[int] | None = None,
) -> Iterator[tuple[int, T | BaseException]]:
    """Run ``function(*job, *shared)`` for every job; yield ``(index, result or exception)`` as each finishes.

    Args:
        function: a module-level function (it is pickled by reference onto the workers).
        jobs: the per-task arguments.
        shared: arguments every task gets after its own (sent once per worker on Dask, in memory only).
        executor: ``ingest.executor``: local process pool or Dask.
        workers: pool size (local) or LocalCluster size (Dask without an address).
        tick: called with each successful result on the client (progress).
        folders: ``(what, path)`` pairs every worker must see, e.g. ``("--out", "/shared/ds")``; ``what``
            names the folder in the message when a worker cannot (a source's path is never printed).
        priorities: per job; higher runs first on Dask (the local pool runs jobs in the given order).

    Raises:
        InputError: Dask is not installed, the scheduler does not answer, or a worker cannot see a folder.
    """
    if executor.kind == "local":
        yield from pool_map(function, [(*job, *shared) for job in jobs], workers, tick)
        return
    check_dask_installed()
    with _DaskClient(executor, workers) as client:
        _check_folders(client, folders, executor.timeout_s)
        yield from _dask_map(client, function, jobs, shared, tick, priorities)


class _DaskClient:
    """A Dask client on ``executor.address``, or on a LocalCluster it starts (and stops) itself."""

    def __init__(self, executor: ExecutorConfig, workers: int) -> None:
        self.executor = executor
        self.workers = workers
        self.cluster: Any = None
        self.client: Any = None

    def __enter__(self) -> Any:
        import logging

        from distributed import Client, LocalCluster

        if self.executor.address is None:
            # One single-threaded process per worker, as the local pool: the task holds the GIL for
            # most of its work (DICOM parsing, gzip), so threads would not run it in parallel.
            self.cluster = LocalCluster(
                n_workers=self.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            self.client = Client(self.cluster, set_as_default=False)
            return self.client
        try:
            self.client = Client(self.executor.address, timeout=self.executor.timeout_s, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise InputError(
                f"ingest.executor.address {self.executor.address}: no Dask scheduler answered ({type(exc).__name__}; "
                f"waited {self.executor.timeout_s:g} s, ingest.executor.timeout_s). Fix: start one (`dask scheduler`) "
                "and its workers, or correct the address (--scheduler)."
            ) from None
        return self.client

    def __exit__(self, *exc_info: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _check_folders(client: Any, folders: Sequence[tuple[str, str]], timeout: float) -> None:
    """Refuse (exit 2, nothing submitted) when a worker cannot see a folder the tasks read or write."""
    if not folders:
        return
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise InputError(
            f"the Dask scheduler has no worker (waited {timeout:g} s, ingest.executor.timeout_s). Fix: start workers "
            "(`dask worker ADDRESS`, or through dask-jobqueue / dask-kubernetes), or raise ingest.executor.timeout_s."
        ) from None
    missing = client.run(_missing_folders, [path for _, path in folders])
    for worker, indexes in sorted(missing.items()):
        if indexes:
            names = ", ".join(folders[index][0] for index in indexes)
            raise InputError(
                f"Dask worker {worker} cannot see {names} at the path the client uses. Fix: put the sources, "
                "the dataset folder and the private folder on storage every worker mounts at the same path "
                "(docs/ingest.md, 'Ingest on a Dask cluster')."
            )


def _dask_map(
    client: Any,
    function: Callable[..., T],
    jobs: Sequence[tuple[Any, ...]],
    shared: tuple[Any, ...],
    tick: Callable[[T], None],
    priorities: Sequence[int] | None,
) -> Iterator[tuple[int, T | BaseException]]:
    from asyncio import CancelledError

    from distributed import as_completed

    token = uuid.uuid4().hex[:12]
    # Neutral names chosen here: Dask's default for scattered data is a digest of the data, i.e. of the key.
    names = [f"medsynth-ingest-shared-{token}-{index}" for index in range(len(shared))]
    scattered = client.scatter({name: _Sealed(value) for name, value in zip(names, shared)}, broadcast=True, hash=False)
    shared_futures = [scattered[name] for name in names]
    futures = {}
    for index, job in enumerate(jobs):
        future = client.submit(
            _guarded, function, *(_Sealed(arg) for arg in job), *shared_futures,
            key=f"medsynth-ingest-{token}-{index}",
            priority=int(priorities[index]) if priorities is not None else 0,
            retries=0,
        )
        futures[future] = index
    try:
        for future in as_completed(futures, loop=client.loop):
            index = futures[future]
            try:
                result = future.result()
            except (Exception, CancelledError) as exc:  # KilledWorker; cancelled when the scheduler is lost
                yield index, exc
                continue
            finally:
                future.release()
            if isinstance(result, _Failure):
                yield index, RemoteTaskError(result.kind)
                continue
            tick(result)
            yield index, result
    finally:
        for future in [*futures, *shared_futures]:
            future.release()
