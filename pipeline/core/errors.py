"""Exceptions that carry the CLI's exit code and a message fit for users.

Every message says what is wrong, where (file, row, column or config key) and how to fix it.
Messages never quote a value read from a patient's header.
"""

from __future__ import annotations

__all__ = ["MedsynthError", "InputError", "CheckFailed"]


class MedsynthError(Exception):
    """Base class: an expected failure with a user-facing message."""

    exit_code: int = 2


class InputError(MedsynthError):
    """Bad input or usage (corrupt file, wrong column, empty folder, bad config key): exit 2."""

    exit_code = 2


class CheckFailed(MedsynthError):
    """A check ran and failed (audit finding, failed gate): exit 1."""

    exit_code = 1
