"""One writer per output: an advisory lock on every folder a command writes.

Two commands writing one dataset, model or run root interleave their files (a manifest naming
images the other run deleted, a training run "resuming" from another's in-flight checkpoint). Each
writer therefore holds a lock on its output folder for as long as it writes:

* The lock is a file beside the folder, ``<parent>/.<name>.lock``: beside it, not inside, because a
  stage empties or swaps its output folder as a whole, which would take a lock inside with it.
* The holder keeps the file open under ``flock(LOCK_EX)``. The kernel drops that lock when the
  process dies however it dies (``kill -9`` included), so a lock file whose ``flock`` can be taken
  is stale, and taking the ``flock`` *is* the atomic take-over: of two processes that find the same
  stale lock, only one gets it.
* The file records the holder (pid, host, start time, command) so that a refused writer can name it.
  A file whose ``flock`` is free but which names another host is not taken over: on a network file
  system the lock may not reach across machines, so the process may be alive there.
* A folder below one that is locked is locked too: ``medsynth train --out runs/demo/model`` is
  refused while ``medsynth run`` holds ``runs/demo``. Locks this process already holds (the run
  root, then each stage's folder) nest.

Readers take no lock: the stages read datasets that the writer publishes atomically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import InputError

__all__ = ["LockHolder", "lock_path", "lock_id", "hold", "hold_all", "holder_of"]

_LOCK_SUFFIX = ".lock"


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a lock: read from the lock file."""

    pid: int
    host: str
    since: str
    command: str

    def describe(self) -> str:
        """``pid 123 on host h since 2024-01-01T10:00:00Z (medsynth train)``."""
        return f"pid {self.pid} on host {self.host} since {self.since} ({self.command})"


@dataclass
class _Held:
    fd: int
    path: Path
    count: int


# Locks held by this process, by lock file: a lock taken again (nested) is counted, not re-taken.
_HELD: dict[Path, _Held] = {}


def lock_path(folder: str | os.PathLike[str]) -> Path:
    """The lock file of ``folder``: ``<parent>/.<name>.lock`` (the folder's path made absolute first)."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}{_LOCK_SUFFIX}"


def lock_id(folder: str | os.PathLike[str]) -> str:
    """A short hex id of ``folder``'s absolute path: names its writer's MLflow runs without the path."""
    return hashlib.sha256(os.path.abspath(folder).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _host() -> str:
    return socket.gethostname()


def _command() -> str:
    words = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:2]]
    return " ".join(word for word in words if word) or "python"


def holder_of(path: Path) -> LockHolder | None:
    """The holder recorded in a lock file (None when it is absent, empty or unreadable)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(int(payload["pid"]), str(payload["host"]), str(payload["since"]), str(payload["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive_here(holder: LockHolder) -> bool:
    """Whether ``holder`` names a process on this host that is still running."""
    if holder.host != _host():
        return True  # cannot be checked from here: assume it runs
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _refuse(folder: Path, lock: Path, holder: LockHolder | None, what: str) -> InputError:
    who = holder.describe() if holder is not None else "another process (its lock file names no holder)"
    return InputError(
        f"{folder}: {what} is being written by {who}. Fix: wait for it to finish (or stop it), or write to "
        f"another folder; if that process is gone, delete {lock}."
    )


def _check_parents(folder: Path) -> None:
    """Refuse when a folder above ``folder`` is locked by a live process other than this one."""
    for parent in folder.parents:
        if parent == parent.parent:
            break
        lock = lock_path(parent)
        if lock in _HELD or not lock.is_file():
            continue
        holder = holder_of(lock)
        if holder is not None and holder.pid == os.getpid() and holder.host == _host():
            continue
        if holder is not None and _alive_here(holder) and _flock_taken(lock):
            raise _refuse(folder, lock, holder, f"the folder above it, {parent},")


def _flock_taken(lock: Path) -> bool:
    """Whether some process holds the ``flock`` of ``lock`` (probed with a shared, non-blocking lock)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _prepare(folder: Path) -> None:
    """Require that ``folder`` is, or can become, a folder (checked before any work)."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder. Fix: pass a new or existing folder.")
    existing = next((path for path in folder.parents if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"{folder}: cannot be created: {existing} is a file. Fix: pass a folder path.")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"{folder.parent}: cannot be created ({exc.strerror or type(exc).__name__}). Fix: pass a writable folder."
        ) from None


def _open_locked(lock: Path, folder: Path) -> int:
    """Open ``lock`` and take its ``flock``; the file must still be the one at ``lock`` once taken."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(
                f"{lock}: the lock file cannot be created ({exc.strerror or type(exc).__name__}). "
                "Fix: pass an output folder in a writable place."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refuse(folder, lock, holder_of(lock), "it") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released (and removed) the file between our open and flock: try again


def _write_holder(fd: int) -> None:
    since = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    payload = json.dumps({"pid": os.getpid(), "host": _host(), "since": since, "command": _command()}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, payload.encode("utf-8"), 0)
    os.fsync(fd)


def _acquire(folder: Path, notes: list[str]) -> Path:
    lock = lock_path(folder)
    if lock in _HELD:
        _HELD[lock].count += 1
        return lock
    _prepare(folder)
    _check_parents(folder)
    fd = _open_locked(lock, folder)
    previous = holder_of(lock)
    if previous is not None and previous.host != _host():
        os.close(fd)
        raise _refuse(folder, lock, previous, "it")
    if previous is not None:
        notes.append(
            f"note: took over the lock of {folder} left by {previous.describe()}, which is no longer running"
        )
    _write_holder(fd)
    _HELD[lock] = _Held(fd, lock, 1)
    return lock


def _release(lock: Path) -> None:
    held = _HELD.get(lock)
    if held is None:
        return
    held.count -= 1
    if held.count > 0:
        return
    del _HELD[lock]
    with contextlib.suppress(OSError):
        lock.unlink()  # before the flock goes: a waiter that opened the old file sees it gone and retries
    os.close(held.fd)


@contextlib.contextmanager
def hold(folder: str | os.PathLike[str], notes: list[str] | None = None) -> Iterator[Path]:
    """Hold the write lock of ``folder`` for the block; yield the lock file.

    Args:
        folder: the output folder (it need not exist yet; its parent is created).
        notes: receives a line when a stale lock (its process is gone) was taken over.

    Raises:
        InputError: another live process holds the lock of ``folder`` or of a folder above it, or
            ``folder`` cannot be a folder (a file is in the way).
    """
    with hold_all([folder], notes) as locks:
        yield locks[0]


@contextlib.contextmanager
def hold_all(folders: Iterable[str | os.PathLike[str]], notes: list[str] | None = None) -> Iterator[list[Path]]:
    """Hold the write locks of every folder in ``folders`` (all or none) for the block."""
    notes = notes if notes is not None else []
    taken: list[Path] = []
    try:
        for folder in folders:
            taken.append(_acquire(Path(os.path.abspath(folder)), notes))
        yield taken
    finally:
        for lock in reversed(taken):
            _release(lock)
