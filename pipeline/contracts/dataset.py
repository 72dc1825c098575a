"""The dataset contract: a folder holding ``manifest.csv`` and the image files it names.

Every stage reads and writes datasets through this module (docs/contracts.md, "The dataset
contract"). A malformed manifest is refused with a message naming file, row and column.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from pipeline.core.errors import InputError
from pipeline.core.files import atomic_path, sha256_file

__all__ = [
    "locate_manifest",
    "MANIFEST_NAME",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "ORIGINS",
    "Dataset",
    "read_dataset",
    "validate_manifest",
    "write_manifest",
    "verify_checksums",
    "verify_files",
    "dataset_digest",
]

MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS: tuple[str, ...] = ("sample_id", "subject_id", "label", "split", "path", "origin", "sha256")
SPLITS: tuple[str, ...] = ("train", "val", "test")
ORIGINS: tuple[str, ...] = ("real", "synthetic")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Dataset:
    """A validated dataset: its folder and its manifest (one row per image, all columns as str)."""

    root: Path
    manifest: pd.DataFrame

    def image_path(self, row: pd.Series | dict) -> Path:
        """Path of the image named by a manifest row, checked to stay inside the dataset folder.

        The manifest's ``path`` is relative and has no ``..`` (:func:`validate_manifest`); this also
        follows symlinks, so a file or folder linked to somewhere outside the dataset is refused
        rather than read (or written through).

        Raises:
            InputError: the path resolves outside the dataset folder (the message names the row).
        """
        path = self.root / str(row["path"])
        if not path.resolve().is_relative_to(self._resolved_root):
            raise InputError(
                f"{self.root / MANIFEST_NAME}{_row_text(row)}, column 'path': {row['path']} resolves outside the "
                "dataset folder (a symbolic link?). Fix: put the file itself inside the dataset folder."
            )
        return path

    @functools.cached_property
    def _resolved_root(self) -> Path:
        return self.root.resolve()

    @property
    def labels(self) -> list[str]:
        """Sorted distinct class labels."""
        return sorted(self.manifest["label"].unique().tolist())

    def subset(self, *, split: str | None = None, origin: str | None = None) -> pd.DataFrame:
        """Rows of one split and/or origin (a copy)."""
        rows = self.manifest
        if split is not None:
            rows = rows[rows["split"] == split]
        if origin is not None:
            rows = rows[rows["origin"] == origin]
        return rows.copy()

    @property
    def digest(self) -> str:
        """Content digest over the per-file checksums (see :func:`dataset_digest`)."""
        return dataset_digest(self.manifest)


def locate_manifest(root: str | os.PathLike[str]) -> Path:
    """``root/manifest.csv``, checked to exist (cheap: commands call it before any heavy work).

    Raises:
        InputError: the folder or its manifest is missing.
    """
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found. Fix: pass a folder that holds {MANIFEST_NAME}.")
    if not manifest_path.is_file():
        raise InputError(
            f"{manifest_path}: no manifest. Fix: point at a dataset written by `medsynth ingest` or `generate`."
        )
    return manifest_path


def read_dataset(root: str | os.PathLike[str], *, check_files: bool = True) -> Dataset:
    """Read and validate ``root/manifest.csv``.

    Args:
        root: the dataset folder.
        check_files: also require every named image file to exist.

    Raises:
        InputError: missing folder or manifest, or a malformed manifest (the message names the
            file, the row as counted in a spreadsheet, header = row 1, and the column).
    """
    root = Path(root)
    manifest_path = locate_manifest(root)
    try:
        manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{manifest_path}: not a readable CSV ({exc.__class__.__name__}). Fix: re-create the manifest.") from exc
    validate_manifest(manifest, manifest_path)
    dataset = Dataset(root=root, manifest=manifest)
    if check_files:
        for _, row in manifest.iterrows():
            path = dataset.image_path(row)
            if not path.exists():
                raise InputError(
                    f"{manifest_path}{_row_text(row)}, column 'path': file {row['path']} does not exist. "
                    "Fix: restore the file or remove the row."
                )
            if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or device would block or never end
                raise InputError(
                    f"{manifest_path}{_row_text(row)}, column 'path': {row['path']} is not a regular file. "
                    "Fix: replace it with the image file or remove the row."
                )
    return dataset


def _row_text(row: pd.Series | dict) -> str:
    """`` row N`` as a spreadsheet counts it (header = row 1) for a manifest row read by :func:`read_dataset`."""
    name = getattr(row, "name", None)
    return f" row {int(name) + 2}" if isinstance(name, (int, np.integer)) else ""


def verify_files(dataset: Dataset, rows: pd.DataFrame | None = None, flag: str = "") -> None:
    """Require every image of ``rows`` (default: all) to match its recorded sha256 (tampering, bit rot).

    Hashing costs a fraction of decoding the same files (docs/contracts.md gives the measurement), so
    stages re-hash what they read, without a size+mtime cache that a tampered file could slip past.

    Raises:
        InputError: a file differs from its checksum (the message names the row and the file).
    """
    rows = dataset.manifest if rows is None else rows
    for _, row in rows.iterrows():
        path = dataset.image_path(row)
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise InputError(
                f"{dataset.root / MANIFEST_NAME}{_row_text(row)}, column 'path': file {row['path']} cannot be read "
                f"({exc.strerror or type(exc).__name__}). Fix: restore the file or remove the row."
            ) from None
        if actual != row["sha256"]:
            given = f" of {flag}" if flag else ""
            raise InputError(
                f"{dataset.root / MANIFEST_NAME}{_row_text(row)}, column 'sha256': file {row['path']}{given} no longer "
                "matches its checksum (changed or damaged since the manifest was written). Fix: restore the file, or "
                "re-run the stage that wrote the dataset."
            )


def validate_manifest(manifest: pd.DataFrame, where: str | os.PathLike[str] = MANIFEST_NAME) -> None:
    """Check a manifest against the contract; raise :class:`InputError` on the first problem."""
    missing = [column for column in REQUIRED_COLUMNS if column not in manifest.columns]
    if missing:
        raise InputError(
            f"{where}: missing column(s) {', '.join(missing)}. "
            f"Fix: a manifest needs the columns {', '.join(REQUIRED_COLUMNS)}."
        )
    if manifest.empty:
        raise InputError(f"{where}: the manifest has no rows. Fix: point at a dataset with at least one image.")
    allowed = {"split": SPLITS, "origin": ORIGINS}
    for index, row in enumerate(manifest[list(REQUIRED_COLUMNS)].itertuples(index=False)):
        line = index + 2
        values = row._asdict()
        for column in REQUIRED_COLUMNS:
            value = str(values[column]).strip()
            if not value:
                raise InputError(f"{where} row {line}, column '{column}': empty value. Fix: fill it in or drop the row.")
        for column, choices in allowed.items():
            if values[column] not in choices:
                raise InputError(
                    f"{where} row {line}, column '{column}': {values[column]!r} is not one of {', '.join(choices)}."
                )
        if not _SHA256.match(values["sha256"]):
            raise InputError(
                f"{where} row {line}, column 'sha256': not a 64-character lowercase hex digest. "
                "Fix: recompute it with `sha256sum`."
            )
        rel = PurePosixPath(values["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise InputError(
                f"{where} row {line}, column 'path': must be relative to the dataset folder and stay inside it."
            )
    duplicated = manifest["sample_id"].duplicated()
    if duplicated.any():
        line = int(duplicated.to_numpy().nonzero()[0][0]) + 2
        raise InputError(f"{where} row {line}, column 'sample_id': duplicate sample_id. Fix: sample ids must be unique.")
    real = manifest[manifest["origin"] == "real"]
    splits_per_subject = real.groupby("subject_id")["split"].nunique()
    leaking = splits_per_subject[splits_per_subject > 1]
    if not leaking.empty:
        subject = leaking.index[0]
        line = int((manifest["subject_id"] == subject).to_numpy().nonzero()[0][0]) + 2
        raise InputError(
            f"{where} row {line}, column 'split': subject {subject} appears in more than one split. "
            "Fix: splits are assigned by subject; re-run the split."
        )


def write_manifest(root: str | os.PathLike[str], manifest: pd.DataFrame) -> Path:
    """Validate and write ``root/manifest.csv`` atomically (required columns first, then extras)."""
    root = Path(root)
    validate_manifest(manifest, root / MANIFEST_NAME)
    extras = [column for column in manifest.columns if column not in REQUIRED_COLUMNS]
    ordered = manifest[list(REQUIRED_COLUMNS) + extras].sort_values("sample_id", kind="stable")
    target = root / MANIFEST_NAME
    with atomic_path(target) as tmp:
        ordered.to_csv(tmp, index=False, lineterminator="\n")
    return target


def verify_checksums(dataset: Dataset) -> list[str]:
    """Return the sample ids whose file no longer matches its recorded sha256."""
    return [
        str(row["sample_id"])
        for _, row in dataset.manifest.iterrows()
        if sha256_file(dataset.image_path(row)) != row["sha256"]
    ]


def dataset_digest(manifest: pd.DataFrame) -> str:
    """SHA-256 over the sorted ``(path, sha256, label, split, origin)`` rows.

    Unlike MLflow's default pandas digest (first 10,000 rows only) this covers every file, and
    it is independent of row order.
    """
    digest = hashlib.sha256()
    columns = ["path", "sha256", "label", "split", "origin"]
    for row in sorted(manifest[columns].astype(str).itertuples(index=False, name=None)):
        digest.update("\t".join(row).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
