"""Progress of the long stages: a tqdm bar on a terminal, a plain line now and then in a log.

A tqdm bar redraws itself with carriage returns; written to a log file or a CI console it becomes
one endless line. So :func:`progress` gives a bar only when stderr is a terminal, and otherwise a
:class:`LogProgress` that prints one ordinary line every ``interval`` seconds (and a last line when
it has printed any, so a short task stays silent). Lines carry counts, rates and losses only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["progress", "LogProgress", "LOG_INTERVAL_S"]

LOG_INTERVAL_S = 30.0


def progress(total: int | None, desc: str, unit: str, enabled: bool, initial: int = 0) -> Any:
    """A progress bar with tqdm's ``update``/``set_postfix``/``set_postfix_str``/``close`` interface.

    Args:
        total: the count at completion (None: unknown).
        desc: what is counted ("train", "ingest").
        unit: the unit of the count ("step", "file").
        enabled: False gives a bar that shows nothing.
        initial: the count already done (a resumed run).
    """
    from tqdm import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
    return LogProgress(total, desc, unit, initial=initial)


class LogProgress:
    """tqdm's interface, printing ``desc: n/total unit (pct), rate, postfix`` every ``interval`` seconds."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str,
        initial: int = 0,
        interval: float = LOG_INTERVAL_S,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start = initial
        self._interval, self._stream, self._clock = interval, stream, clock
        self._began = self._last = clock()
        self._postfix = ""
        self._printed = False
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._clock() - self._last >= self._interval:
            self._print()

    def set_postfix(self, **values: object) -> None:
        self._postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def set_postfix_str(self, text: str) -> None:
        self._postfix = text

    def close(self) -> None:
        if not self._closed and self._printed:
            self._print()
        self._closed = True

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _print(self) -> None:
        now = self._clock()
        elapsed = max(now - self._began, 1e-9)
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {count} {self.unit}s"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(f"{(self.n - self._start) / elapsed:.1f} {self.unit}s/s")
        if self._postfix:
            parts.append(self._postfix)
        stream = self._stream or sys.stderr
        stream.write(", ".join(parts) + "\n")
        stream.flush()
        self._last, self._printed = now, True
