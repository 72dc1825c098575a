"""Writing the augmented dataset's images: real ones on the model grid, synthetic ones marked.

Real volumes get the model's preprocessing (:class:`pipeline.imaging.preprocess.Preprocessor`) and
are stored in modality units on the model grid (2D: one file per non-empty axial slice), or are
copied unchanged without a model. Synthetic files are copied byte for byte when their NIfTI
``descrip`` already says they are synthetic (re-marked otherwise) and can also be written as DICOM.
"""

from __future__ import annotations

import hashlib
import re
import stat
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.contracts.dataset import REQUIRED_COLUMNS, Dataset
from pipeline.contracts.synthetic import REAL_EXPORT_DESCRIP, says_synthetic, synthetic_descrip
from pipeline.export.dicom import SyntheticImageInfo, synthetic_uid, write_synthetic_series
from pipeline.export.config import ExportConfig
from pipeline.core.errors import InputError
from pipeline.core.files import atomic_path, read_nifti, sha256_bytes, sha256_file, write_nifti

__all__ = ["export_real", "export_synthetic", "descrip_of"]

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(name: str) -> str:
    """A file-name-safe form of a sample id or label (ids and labels are never PHI)."""
    return _SAFE_NAME.sub("_", name).strip("._") or "x"


def _spacing_text(affine: np.ndarray) -> str:
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return "x".join(f"{value:g}" for value in np.round(zooms, 4))


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(value)) for value in shape)


def _claim(rel: Path, sample_id: str, used: set[str]) -> Path:
    """``rel``, or ``rel`` with a digest of the sample id appended when another image already took it.

    Two sample ids can share a file-name-safe form (``a/b`` and ``a_b``); neither may overwrite the other.
    """
    if rel.as_posix() in used:
        suffix = ".nii.gz" if rel.name.endswith(".nii.gz") else rel.suffix
        stem = rel.name[: -len(suffix)] if suffix else rel.name
        rel = rel.with_name(f"{stem}-{sha256_bytes(sample_id.encode('utf-8'))[:8]}{suffix}")
    used.add(rel.as_posix())
    return rel


def _copy(dataset: Dataset, row: pd.Series, target: Path) -> None:
    """Copy the image of manifest ``row`` to ``target``: a regular file, its manifest checksum, a readable NIfTI.

    The bytes are hashed as they are copied, so what lands in the export is exactly what the
    manifest vouches for, even if the source changed after the stage's up-front check.

    Raises:
        InputError: the source resolves outside its dataset, is not a regular file, differs from
            its checksum or is not a readable NIfTI image (the message names the row).
    """
    source = dataset.image_path(row)
    where = f"{dataset.root / 'manifest.csv'} row {int(row.name) + 2}"
    if not stat.S_ISREG(source.stat().st_mode):
        raise InputError(f"{where}, column 'path': {row['path']} is not a regular file. Fix: restore the image file.")
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(source, "rb") as reader, open(tmp, "wb") as writer:
            for chunk in iter(lambda: reader.read(1 << 20), b""):
                digest.update(chunk)
                writer.write(chunk)
        if digest.hexdigest() != str(row["sha256"]):
            raise InputError(
                f"{where}, column 'sha256': file {row['path']} no longer matches its checksum. Fix: restore the file, "
                "or re-run the stage that wrote the dataset."
            )
    try:  # by the target's own name: nibabel tells formats by their suffix (the export is staged, not yet shared)
        nib.load(target).header.get_data_shape()
    except Exception:  # nibabel raises several unrelated types for files that are not NIfTI
        raise InputError(
            f"{where}, column 'path': {row['path']} is not a readable NIfTI image. Fix: re-create the file or "
            "remove its row."
        ) from None


def _nifti_suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def export_real(
    real: Dataset, stage_dir: Path, preprocessor: Any | None, used: set[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write the real images; return (manifest rows, excluded rows).

    Args:
        real: the real dataset.
        stage_dir: the folder the export is assembled in.
        preprocessor: the model's :class:`~pipeline.imaging.preprocess.Preprocessor`, or None to copy
            the files unchanged.
        used: relative paths already written (updated).
    """
    rows: list[dict[str, Any]] = []
    excluded: list[dict[str, Any]] = []
    extras = [column for column in real.manifest.columns if column not in REQUIRED_COLUMNS]
    for _, source in real.manifest.sort_values("sample_id", kind="stable").iterrows():
        base = {column: str(source[column]) for column in extras}
        base.update(
            subject_id=str(source["subject_id"]), label=str(source["label"]), split=str(source["split"]), origin="real",
            source_sample_id=str(source["sample_id"]), generator_run_id="", seed="", model_digest="", dicom_path="",
        )
        folder = Path(str(source["split"])) / _safe(str(source["label"]))
        if preprocessor is None:
            path = real.image_path(source)
            rel = _claim(folder / f"{_safe(str(source['sample_id']))}{_nifti_suffix(path)}", str(source["sample_id"]), used)
            _copy(real, source, stage_dir / rel)
            rows.append({**base, "sample_id": str(source["sample_id"]), "path": rel.as_posix(), "sha256": str(source["sha256"]),
                         "slice_index": "", "preprocessing": "none"})
            continue
        data, affine = read_nifti(real.image_path(source))
        images = preprocessor.to_intensity(preprocessor.volume_to_images(data, affine, origin="real"))
        grid = preprocessor.grid_affine()
        if len(images) == 0:
            excluded.append({"sample_id": str(source["sample_id"]), "origin": "real", "label": str(source["label"]),
                             "split": str(source["split"]),
                             "reason": "real volume without a non-empty axial slice on the model grid (model preprocessing)"})
            continue
        two_d = preprocessor.spatial_dims == 2
        for index, image in enumerate(images):
            volume = np.asarray(image, dtype=np.float32)
            volume = volume[:, :, None] if two_d else volume
            sample_id = f"{source['sample_id']}#z{index}" if two_d else str(source["sample_id"])
            name = f"{_safe(str(source['sample_id']))}_z{index:03d}" if two_d else _safe(str(source["sample_id"]))
            rel = _claim(folder / f"{name}.nii.gz", sample_id, used)
            write_nifti(stage_dir / rel, volume, grid, descrip=REAL_EXPORT_DESCRIP)
            rows.append({**base, "sample_id": sample_id, "path": rel.as_posix(), "sha256": sha256_file(stage_dir / rel),
                         "slice_index": str(index) if two_d else "", "preprocessing": "model-grid",
                         "spacing": _spacing_text(grid), "shape": _shape_text(volume.shape), "dtype": "float32"})
    return rows, excluded


def descrip_of(path: Path) -> str:
    """The NIfTI ``descrip`` of a file (empty when unreadable)."""
    try:
        raw = nib.load(path).header["descrip"]
    except Exception:  # nibabel raises several unrelated types for corrupt files; read_nifti reports them
        return ""
    value = raw.item() if hasattr(raw, "item") else raw
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def export_synthetic(
    synthetic: Dataset,
    kept: pd.DataFrame,
    stage_dir: Path,
    config: ExportConfig,
    modality: str,
    window: tuple[float, float] | None,
    used: set[str],
) -> tuple[list[dict[str, Any]], int, int]:
    """Write the kept synthetic images (and their DICOM series); return (rows, re-marked files, moved to train).

    Args:
        synthetic: the synthetic dataset.
        kept: its rows that passed the privacy filter.
        stage_dir: the folder the export is assembled in.
        config: the ``export:`` section (DICOM switch and UID root).
        modality: DICOM modality of the images (``CT`` or other).
        window: CT display window in HU for the DICOM files, or None.
        used: relative paths already written (updated).
    """
    rows: list[dict[str, Any]] = []
    remarked = 0
    moved = int((kept["split"] != "train").sum())
    extras = [column for column in synthetic.manifest.columns if column not in REQUIRED_COLUMNS]
    study_uid = synthetic_uid(
        config.uid_root, "study", synthetic.digest, *sorted(set(synthetic.manifest["generator_run_id"]))
    )
    for series_number, (_, source) in enumerate(kept.sort_values("sample_id", kind="stable").iterrows(), start=1):
        path = synthetic.image_path(source)
        sample_id = str(source["sample_id"])
        run_id = str(source["generator_run_id"])
        # Every synthetic file must say so in its header; generate already writes the marker.
        marked = says_synthetic(descrip_of(path))
        suffix = _nifti_suffix(path) if marked else ".nii.gz"
        rel = _claim(Path("train") / _safe(str(source["label"])) / f"{_safe(sample_id)}{suffix}", sample_id, used)
        target = stage_dir / rel
        if marked:
            _copy(synthetic, source, target)
        else:
            data, affine = read_nifti(path)
            write_nifti(target, data, affine, descrip=synthetic_descrip(run_id))
            remarked += 1
        row = {column: str(source[column]) for column in extras}
        row.update(
            sample_id=sample_id, subject_id=str(source["subject_id"]), label=str(source["label"]), split="train",
            path=rel.as_posix(), origin="synthetic", sha256=sha256_file(target), source_sample_id="", slice_index="",
            preprocessing="generated", dicom_path="",
        )
        header = nib.load(target)
        row["spacing"] = row.get("spacing") or _spacing_text(header.affine)
        row["shape"] = row.get("shape") or _shape_text(header.shape)
        if config.dicom:
            data, affine = read_nifti(target)
            series = Path("dicom") / _safe(sample_id)
            info = SyntheticImageInfo(
                sample_id=sample_id, label=str(source["label"]), generator_run_id=run_id,
                seed=str(source.get("seed", "")), model_digest=str(source.get("model_digest", "")), sha256=row["sha256"],
                modality=modality, series_number=series_number, study_uid=study_uid, window=window,
            )
            write_synthetic_series(data, affine, stage_dir / series, info, config.uid_root)
            row["dicom_path"] = series.as_posix()
        rows.append(row)
    return rows, remarked, moved
