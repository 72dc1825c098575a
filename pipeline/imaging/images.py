"""Bring real and synthetic images onto one grid and one intensity scale.

With a model directory the model's own :class:`pipeline.imaging.preprocess.Preprocessor` is used, so
the evaluation sees exactly what the generator was trained on. Without one, a default
preprocessing makes the two sides comparable:

1. orientation to RAS (nibabel's closest canonical orientation),
2. resampling to the synthetic images' voxel size (in-plane only for 2D images),
3. centre crop/pad to the synthetic images' shape,
4. one robust intensity mapping for both sides: the overlap of the 0.5..99.5 percentile ranges
   of the real **training** voxels and of the synthetic voxels maps to -1..1 (clipped). One
   mapping, not one per image, so a synthetic set with the wrong brightness or contrast still
   shows as different; the overlap, because synthetic CT files are often stored clipped to the
   model's window. Ranges that barely overlap mean different units (normalised MR): each side is
   then scaled by its own range (:func:`intensity_mapping`).

In 2D mode real volumes expand to their non-empty axial slices (sample ids ``<sample_id>#z<k>``);
a slice is non-empty when at least 1% of its pixels lie above the lower quarter of the intensity
range (scaled value > -0.5), which drops air-only slices.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.contracts.dataset import Dataset
from pipeline.core.errors import InputError
from pipeline.core.files import read_nifti

__all__ = [
    "ImageSet",
    "Grid",
    "load_image_sets",
    "intensity_mapping",
    "default_grid",
    "spacing_of",
    "to_ras",
    "resample",
    "crop_or_pad",
    "PERCENTILES",
    "NONEMPTY_FRACTION",
]

PERCENTILES: tuple[float, float] = (0.5, 99.5)
NONEMPTY_FRACTION = 0.01
_NONEMPTY_LEVEL = -0.5
_SAMPLE_VOXELS_PER_FILE = 20000
_READ_THREADS = 4


@dataclass(frozen=True)
class ImageSet:
    """Images on the evaluation grid with their manifest facts, one entry per image (or slice).

    Attributes:
        images: float32 array (N, 1, *spatial) in [-1, 1].
        labels: class label per image.
        sample_ids: ``<sample_id>`` (synthetic, 3D) or ``<sample_id>#z<k>`` (real 2D slices).
        subject_ids: the manifest's subject pseudonym per image.
        splits: ``train``/``val``/``test`` for real images, ``synthetic`` for synthetic ones.
    """

    images: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray
    subject_ids: np.ndarray
    splits: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def select(self, mask: np.ndarray) -> ImageSet:
        """The images where ``mask`` (boolean or index array) selects."""
        return ImageSet(
            images=self.images[mask],
            labels=self.labels[mask],
            sample_ids=self.sample_ids[mask],
            subject_ids=self.subject_ids[mask],
            splits=self.splits[mask],
        )

    def split(self, *names: str) -> ImageSet:
        """The images of the given split(s)."""
        return self.select(np.isin(self.splits, names))

    def counts(self) -> dict[str, int]:
        """Images per label."""
        labels, counts = np.unique(self.labels, return_counts=True)
        return {str(label): int(count) for label, count in zip(labels, counts)}


@dataclass(frozen=True)
class Grid:
    """The evaluation grid: spatial dims, shape and voxel size (mm), all in RAS order."""

    spatial_dims: int
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    record: dict[str, Any] = field(default_factory=dict)


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) per array axis from a NIfTI affine."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a 3D array to the closest RAS orientation; return (data, spacing in RAS order)."""
    spacing = spacing_of(affine)
    linear = np.asarray(affine)[:3, :3]
    if np.count_nonzero(linear - np.diag(np.diag(linear))) == 0 and (np.diag(linear) > 0).all():
        return data, spacing  # already RAS-aligned: the common case, skip nibabel's SVD
    ornt = nib.orientations.io_orientation(affine)
    ras_spacing = np.empty(3)
    for axis, (target, _flip) in enumerate(ornt):
        ras_spacing[int(target)] = spacing[axis]
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt)), ras_spacing


def resample(data: np.ndarray, spacing: np.ndarray, target: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Linear resampling of ``data`` (3D) from ``spacing`` to ``target`` mm along ``axes``.

    Identity (no interpolation) when the voxel sizes already agree within 0.1%.
    """
    spacing = np.asarray(spacing, dtype=float)
    target = np.asarray(target, dtype=float)
    if all(abs(spacing[a] - target[a]) <= 1e-3 * target[a] for a in axes):
        return data
    size = list(data.shape)
    for axis in axes:
        size[axis] = max(1, int(round(data.shape[axis] * spacing[axis] / target[axis])))
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
    if 2 not in axes:  # in-plane only: treat slices as a batch of 2D images
        planes = tensor[0, 0].permute(2, 0, 1)[:, None]
        out = F.interpolate(planes, size=tuple(size[:2]), mode="bilinear", align_corners=False)
        return out[:, 0].permute(1, 2, 0).numpy()
    out = F.interpolate(tensor, size=tuple(size), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def crop_or_pad(data: np.ndarray, shape: tuple[int, ...], fill: float) -> np.ndarray:
    """Centre crop or pad the leading ``len(shape)`` axes of ``data`` to ``shape``."""
    out = data
    for axis, wanted in enumerate(shape):
        have = out.shape[axis]
        if have > wanted:
            start = (have - wanted) // 2
            out = np.take(out, np.arange(start, start + wanted), axis=axis)
        elif have < wanted:
            before = (wanted - have) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, wanted - have - before)
            out = np.pad(out, pad, constant_values=fill)
    return out


def default_grid(synthetic: Dataset) -> Grid:
    """The grid of the synthetic images (first file): 2D when it holds one slice, else 3D."""
    first = synthetic.manifest[synthetic.manifest["origin"] == "synthetic"].iloc[0]
    data, affine = read_nifti(synthetic.image_path(first))
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise InputError(
            f"{synthetic.root / str(first['path'])}: synthetic images must be 2D or 3D (got {data.ndim} axes). "
            "Fix: write one image per file."
        )
    data, spacing = to_ras(data, affine)
    if data.shape[2] == 1:
        return Grid(
            spatial_dims=2, shape=tuple(int(s) for s in data.shape[:2]), spacing=tuple(float(s) for s in spacing[:2])
        )
    return Grid(spatial_dims=3, shape=tuple(int(s) for s in data.shape), spacing=tuple(float(s) for s in spacing))


def _geometry(path: Path, grid: Grid) -> np.ndarray:
    """One file: RAS, resampled to the grid's voxel size, (x, y, z) unscaled."""
    data, affine = read_nifti(path)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 2D or 3D image (got {data.ndim} axes). Fix: write one volume per file.")
    data, spacing = to_ras(data, affine)
    if grid.spatial_dims == 2:
        return resample(data, spacing, np.array([*grid.spacing, spacing[2]]), axes=(0, 1))
    return resample(data, spacing, np.array(grid.spacing), axes=(0, 1, 2))


def _read_all(paths: list[Path], grid: Grid) -> list[np.ndarray]:
    """:func:`_geometry` over many files; a few threads overlap gzip inflation and file reads."""
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        return list(pool.map(lambda path: _geometry(path, grid), paths))


def _scale(data: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (data - low) * (2.0 / max(high - low, 1e-6)) - 1.0
    return np.clip(scaled, -1.0, 1.0).astype(np.float32)


def intensity_mapping(
    real: tuple[float, float], synthetic: tuple[float, float]
) -> tuple[tuple[float, float], tuple[float, float], str]:
    """Choose the intensity ranges mapped to [-1, 1]: (real range, synthetic range, mode).

    ``common``: both sides use the overlap of their percentile ranges, when it spans at least half
    of the narrower range and a tenth of the wider one. This covers the usual case of one unit (HU) where the
    synthetic files were stored clipped to the model's window: clipping the real side the same way
    makes air, tissue and lesion land on the same values, and a generator with the wrong
    brightness still reads as different. ``per-side``: ranges that barely overlap mean different
    units (normalised MR vs scanner units); each side is then scaled by its own range.
    """
    low, high = max(real[0], synthetic[0]), min(real[1], synthetic[1])
    widths = sorted((max(real[1] - real[0], 1e-6), max(synthetic[1] - synthetic[0], 1e-6)))
    if high - low >= 0.5 * widths[0] and high - low >= 0.1 * widths[1]:
        return (low, high), (low, high), "common"
    return real, synthetic, "per-side"


def _intensity_range(volumes: list[np.ndarray], seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    samples = []
    for volume in volumes:
        flat = volume.reshape(-1)
        take = min(flat.size, _SAMPLE_VOXELS_PER_FILE)
        samples.append(flat[rng.choice(flat.size, size=take, replace=False)] if take < flat.size else flat)
    pooled = np.concatenate(samples)
    low, high = np.nanpercentile(pooled, PERCENTILES)  # a NaN voxel (some MR tools write them) must not blank the range
    return float(low), float(high)


def _to_images(volume: np.ndarray, grid: Grid, keep_empty: bool) -> tuple[list[np.ndarray], list[int | None]]:
    """Scaled volume -> images on the grid: (slices with their z) in 2D, the volume in 3D."""
    if grid.spatial_dims == 3:
        return [crop_or_pad(volume, grid.shape, -1.0)[None]], [None]
    images, zs = [], []
    for z in range(volume.shape[2]):
        plane = crop_or_pad(volume[:, :, z], grid.shape, -1.0)
        if keep_empty or (plane > _NONEMPTY_LEVEL).mean() >= NONEMPTY_FRACTION:
            images.append(plane[None])
            zs.append(z)
    return images, zs


def _default_sets(real: Dataset, synthetic: Dataset, seed: int) -> tuple[ImageSet, ImageSet, dict[str, Any]]:
    grid = default_grid(synthetic)
    real_rows = real.subset(origin="real")
    synthetic_rows = synthetic.subset(origin="synthetic")
    real_volumes = _read_all([real.image_path(row) for _, row in real_rows.iterrows()], grid)
    train_volumes = [v for v, split in zip(real_volumes, real_rows["split"]) if split == "train"]
    if not train_volumes:
        raise InputError(
            f"{real.root / 'manifest.csv'}: no real images in split 'train'. "
            "Fix: evaluation compares synthetic data with the training split; pass the dataset the model was trained on."
        )
    synthetic_paths = [synthetic.image_path(row) for _, row in synthetic_rows.iterrows()]
    synthetic_raw = _read_all(synthetic_paths, grid)
    for path, volume in zip(synthetic_paths, synthetic_raw):
        if not np.isfinite(volume).all():  # a diverged generator: every metric would read NaN
            raise InputError(
                f"{path}: the synthetic image holds NaN or infinite values. "
                "Fix: regenerate from a model whose training did not diverge, or drop the image from the manifest."
            )
    real_range, synthetic_range, mode = intensity_mapping(
        _intensity_range(train_volumes, seed), _intensity_range(synthetic_raw, seed)
    )
    real_set = _collect(real_rows, [_scale(v, *real_range) for v in real_volumes], grid, is_real=True)
    synthetic_set = _collect(synthetic_rows, [_scale(v, *synthetic_range) for v in synthetic_raw], grid, is_real=False)
    record = {
        "kind": "default",
        "description": (
            "RAS orientation; resampled to the synthetic images' voxel size"
            + (" in-plane" if grid.spatial_dims == 2 else "")
            + "; centre crop/pad to their shape; "
            + (
                "one intensity mapping for both sides: the common part of the real-train and synthetic "
                f"{PERCENTILES[0]}..{PERCENTILES[1]} percentile ranges -> -1..1, clipped"
                if mode == "common"
                else "each side scaled by its own "
                f"{PERCENTILES[0]}..{PERCENTILES[1]} percentile range -> -1..1 (their ranges barely overlap: "
                "different units, e.g. normalised MR)"
            )
            + ("; real volumes expanded to non-empty axial slices" if grid.spatial_dims == 2 else "")
        ),
        "spatial_dims": grid.spatial_dims,
        "image_size": list(grid.shape),
        "spacing_mm": [round(s, 6) for s in grid.spacing],
        "orientation": "RAS",
        "intensity_percentiles": list(PERCENTILES),
        "intensity_mode": mode,
        "real_intensity_range": list(real_range),
        "synthetic_intensity_range": list(synthetic_range),
        "nonempty_rule": f"at least {NONEMPTY_FRACTION:.0%} of pixels above scaled value {_NONEMPTY_LEVEL}",
    }
    return real_set, synthetic_set, record


def _collect(rows: pd.DataFrame, volumes: list[np.ndarray], grid: Grid, is_real: bool) -> ImageSet:
    images, labels, ids, subjects, splits = [], [], [], [], []
    for (_, row), volume in zip(rows.iterrows(), volumes):
        planes, zs = _to_images(volume, grid, keep_empty=not is_real)
        for plane, z in zip(planes, zs):
            images.append(plane)
            labels.append(str(row["label"]))
            ids.append(f"{row['sample_id']}#z{z}" if is_real and z is not None else str(row["sample_id"]))
            subjects.append(str(row["subject_id"]))
            splits.append(str(row["split"]) if is_real else "synthetic")
    return _image_set(images, labels, ids, subjects, splits, grid.spatial_dims)


def _image_set(images, labels, ids, subjects, splits, spatial_dims: int) -> ImageSet:
    array = np.stack(images).astype(np.float32) if images else np.zeros((0, 1, *([1] * spatial_dims)), np.float32)
    return ImageSet(
        images=array,
        labels=np.asarray(labels, dtype=object),
        sample_ids=np.asarray(ids, dtype=object),
        subject_ids=np.asarray(subjects, dtype=object),
        splits=np.asarray(splits, dtype=object),
    )


def _model_sets(real: Dataset, synthetic: Dataset, model_dir: Path) -> tuple[ImageSet, ImageSet, dict[str, Any]]:
    from pipeline.contracts.model import read_model_meta
    from pipeline.imaging.preprocess import Preprocessor

    model = read_model_meta(model_dir)
    preprocessor = Preprocessor(model.preprocess)
    sets = []
    for dataset, origin in ((real, "real"), (synthetic, "synthetic")):
        rows = dataset.subset(origin=origin)
        images, labels, ids = preprocessor.dataset_images(dataset, rows)
        by_id = rows.set_index("sample_id")
        base = [str(i).split("#z")[0] for i in ids]
        subjects = [str(by_id.at[b, "subject_id"]) for b in base]
        splits = [str(by_id.at[b, "split"]) if origin == "real" else "synthetic" for b in base]
        sets.append(
            ImageSet(
                images=np.asarray(images, dtype=np.float32),
                labels=np.asarray([str(x) for x in labels], dtype=object),
                sample_ids=np.asarray([str(i) for i in ids], dtype=object),
                subject_ids=np.asarray(subjects, dtype=object),
                splits=np.asarray(splits, dtype=object),
            )
        )
    record = {
        "kind": "model",
        "description": "the model's own preprocessing (pipeline.imaging.preprocess.Preprocessor from model.json)",
        "spatial_dims": model.spatial_dims,
        "image_size": list(sets[0].images.shape[2:]),
        "spacing_mm": model.spacing,
        "spec": model.preprocess,
    }
    return sets[0], sets[1], record


def _cap(image_set: ImageSet, limit: int, rng: np.random.Generator) -> ImageSet:
    if len(image_set) <= limit:
        return image_set
    keep = np.sort(rng.choice(len(image_set), size=limit, replace=False))
    return image_set.select(keep)


def load_image_sets(
    real: Dataset,
    synthetic: Dataset,
    *,
    model_dir: Path | None = None,
    seed: int = 0,
    max_images: int | None = None,
) -> tuple[ImageSet, ImageSet, dict[str, Any]]:
    """Load both datasets onto one grid.

    Args:
        real: the real dataset (its ``origin == real`` rows are used).
        synthetic: the synthetic dataset (its ``origin == synthetic`` rows).
        model_dir: use this model's preprocessing; None for the default preprocessing.
        seed: seed of the intensity sampling and of subsampling above ``max_images``.
        max_images: cap per set (random subsample).

    Returns:
        (real images, synthetic images, the preprocessing record for the report).

    Raises:
        InputError: a dataset has no rows of the expected origin, or no training split.
    """
    for dataset, origin in ((real, "real"), (synthetic, "synthetic")):
        if not (dataset.manifest["origin"] == origin).any():
            raise InputError(
                f"{dataset.root / 'manifest.csv'}: no rows with origin '{origin}'. "
                f"Fix: pass the {origin} dataset here (--{origin})."
            )
    if model_dir is not None:
        real_set, synthetic_set, record = _model_sets(real, synthetic, Path(model_dir))
    else:
        real_set, synthetic_set, record = _default_sets(real, synthetic, seed)
    if len(real_set.split("train")) == 0:
        raise InputError(
            f"{real.root / 'manifest.csv'}: no non-empty real training images after preprocessing. "
            "Fix: check the images and the 'split' column."
        )
    if len(synthetic_set) == 0:
        raise InputError(f"{synthetic.root / 'manifest.csv'}: no synthetic images could be read.")
    if max_images is not None:
        rng = np.random.default_rng(seed)
        real_set, synthetic_set = _cap(real_set, max_images, rng), _cap(synthetic_set, max_images, rng)
    return real_set, synthetic_set, record
