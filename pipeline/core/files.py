"""File helpers shared by every stage: atomic writes, checksums, NIfTI read/write."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from isal import igzip

from pipeline.core.errors import InputError

__all__ = [
    "PRIVATE_MODE",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "sha256_file",
    "sha256_bytes",
    "write_nifti",
    "read_nifti",
]

_CHUNK = 1 << 20
# ISA-L's default level: several times faster than zlib's level 1 (nibabel's), and a little smaller.
_GZIP_LEVEL = 2


# Files that link pseudonyms to patients (the private folder): owner only.
PRIVATE_MODE = 0o600


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    A reader never sees a half-written file, and an interrupted stage leaves only a ``.tmp``
    file that the next run overwrites. The file is created with ``mode`` less the umask, as a
    plain ``open()`` would (shared outputs readable by the group); pass :data:`PRIVATE_MODE` for
    private files.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(target: str | os.PathLike[str], text: str, mode: int = 0o666) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically and return the path."""
    with atomic_path(target, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def atomic_write_json(target: str | os.PathLike[str], payload: Any, mode: int = 0o666) -> Path:
    """Write ``payload`` as indented JSON atomically; numpy scalars are converted."""
    return atomic_write_text(
        target, json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n", mode
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def write_nifti(
    target: str | os.PathLike[str],
    data: np.ndarray,
    affine: np.ndarray,
    descrip: str = "",
) -> Path:
    """Write ``data`` as a NIfTI-1 file (``.nii.gz``) atomically.

    The header carries nothing but geometry, datatype and ``descrip`` (which callers use to
    mark synthetic images); ``aux_file``, ``db_name`` and ``intent_name`` stay empty and no
    header extension is written.
    """
    image = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    header = image.header
    header.set_xyzt_units("mm", "sec")
    header["descrip"] = descrip.encode("ascii", "replace")[:79]
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    target = Path(target)
    # gzip is most of the cost of writing a volume: ISA-L writes the same format several times
    # faster than zlib. The volume streams through it (no uncompressed copy in memory); mtime=0
    # and no file name in the gzip header keep the bytes reproducible, as nibabel does.
    with atomic_path(target) as tmp, open(tmp, "wb") as raw:
        with igzip.IGzipFile(filename="", mode="wb", compresslevel=_GZIP_LEVEL, fileobj=raw, mtime=0) as stream:
            image.to_file_map(image.make_file_map({"image": stream, "header": stream}))
    return target


def read_nifti(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file and return ``(data as float32, affine)``.

    Raises:
        InputError: the file is missing or not a readable NIfTI image.
    """
    path = Path(path)
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: file not found. Fix: check the manifest's 'path' column.") from exc
    except Exception as exc:  # nibabel raises several unrelated types for corrupt files
        raise InputError(
            f"{path}: not a readable NIfTI image ({type(exc).__name__}). Fix: re-create the file or remove its manifest row."
        ) from exc
    return data, np.asarray(image.affine, dtype=np.float64)
