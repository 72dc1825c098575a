"""Failures of the machine, not of the input: a full disk, an I/O error, a permission, no memory.

A stage must tell the two apart. A property of an input file (corrupt, not an image, burned-in
text) is permanent: the file is quarantined and the decision may be remembered. A failure of
the environment says nothing about the file: retrying after the user frees space or fixes a
permission gives a different outcome, so it must never be remembered as a quarantine nor let a
stage count as finished. It stops the stage with :class:`EnvironmentFailure` (exit 1) and a
message that names the cause, the folder being written and the fix; never a source path
(``OSError.filename`` may be one, so it is never quoted).
"""

from __future__ import annotations

import errno
import os
from concurrent.futures.process import BrokenProcessPool

from pipeline.core.errors import MedsynthError

__all__ = ["ENVIRONMENT_ERRNOS", "EnvironmentFailure", "environment_cause", "environment_fix", "environment_failure"]

# errno values that describe the machine (space, storage, permissions, resources), not a file's content.
ENVIRONMENT_ERRNOS = frozenset(
    code
    for code in (
        errno.ENOSPC,
        getattr(errno, "EDQUOT", None),
        errno.EFBIG,
        errno.EIO,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENODEV,
        errno.ENXIO,
        getattr(errno, "ESTALE", None),
        getattr(errno, "ENOLINK", None),
        errno.ETIMEDOUT,
        errno.EAGAIN,
        errno.EBUSY,
    )
    if code is not None
)
_SPACE = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if code is not None)
_ACCESS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class EnvironmentFailure(MedsynthError):
    """The machine failed the stage (disk full, I/O error, permission, memory): exit 1, nothing remembered."""

    exit_code = 1


def environment_cause(exc: BaseException) -> str | None:
    """A plain phrase for an environment failure (``"no space left on device"``), or None for anything else.

    An ``OSError`` without an errno (``gzip.BadGzipFile``, a decoder's complaint) is about the
    data it read, so it is not an environment failure.
    """
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, BrokenProcessPool):
        return "a worker process was killed (out of memory, or by a signal)"
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return None


def environment_fix(exc: BaseException) -> str:
    """What the user does about the failure ``exc`` before re-running."""
    if isinstance(exc, OSError) and exc.errno in _SPACE:
        return "free space and re-run"
    if isinstance(exc, OSError) and exc.errno in _ACCESS:
        return "fix the permissions (or the read-only mount) and re-run"
    if isinstance(exc, (MemoryError, BrokenProcessPool)) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return "free memory (or use fewer workers) and re-run"
    return "check the disk or file system and re-run"


def environment_failure(exc: BaseException, doing: str, kept: str = "nothing was lost") -> EnvironmentFailure | None:
    """The :class:`EnvironmentFailure` for ``exc`` raised while ``doing``, or None when ``exc`` is not one.

    Args:
        exc: the exception caught.
        doing: what the stage was doing, without PHI (``"writing the dataset /data/real"``).
        kept: what the user still has (``"nothing was lost"``, ``"the last checkpoint is kept"``).
    """
    cause = environment_cause(exc)
    if cause is None:
        return None
    return EnvironmentFailure(f"{cause} while {doing}: {environment_fix(exc)}; {kept}.")
