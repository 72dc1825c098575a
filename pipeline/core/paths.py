"""Path relations that stages check before they read or write."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["is_inside"]


def is_inside(child: str | os.PathLike[str], parent: str | os.PathLike[str]) -> bool:
    """Whether ``child`` is ``parent`` or lies below it, after resolving symlinks and ``..``."""
    try:
        Path(child).resolve().relative_to(Path(parent).resolve())
    except ValueError:
        return False
    return True
