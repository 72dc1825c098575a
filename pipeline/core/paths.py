"""Path relations that stages check before they read or write."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.core.errors import InputError

__all__ = ["is_inside", "refuse_escaping_folders"]


def is_inside(child: str | os.PathLike[str], parent: str | os.PathLike[str]) -> bool:
    """Whether ``child`` is ``parent`` or lies below it, after resolving symlinks and ``..``."""
    try:
        Path(child).resolve().relative_to(Path(parent).resolve())
    except ValueError:
        return False
    return True


def refuse_escaping_folders(root: str | os.PathLike[str], names: tuple[str, ...]) -> None:
    """Refuse to write into ``root/<name>`` when that folder is a link to somewhere outside ``root``.

    A stage writes its files into sub-folders of its output folder; a sub-folder replaced by a
    symbolic link would send them elsewhere (over another dataset, or anywhere the user may write).

    Raises:
        InputError: ``root/<name>`` resolves outside ``root`` (the message names it).
    """
    root = Path(root)
    for name in names:
        folder = root / name
        if (folder.exists() or folder.is_symlink()) and not is_inside(folder, root):
            raise InputError(
                f"{folder}: links to a folder outside {root}, so files written there would land elsewhere. "
                f"Fix: remove the link (or pass another output folder)."
            )
