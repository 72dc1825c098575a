"""The dataset fingerprint: what a training split is, measured before anything is planned.

From the manifest (labels, subjects, modality) and every image's NIfTI header (shape, spacing,
orientation), plus the voxels of a class-stratified sample of images (foreground bounding boxes,
foreground intensity percentiles, the share of slices that hold foreground). nnU-Net plans its
whole preprocessing from such a fingerprint; :mod:`pipeline.planning.plan` does the same here.

Foreground, in source units: CT is tissue above :data:`CT_AIR_LEVEL` HU (air and the scanner's
padding below); every other modality has no absolute scale, so an image's foreground is what lies
above its own Otsu threshold. A manifest row without a modality (NIfTI sources carry none) counts
as CT when its darkest voxels read as air in HU (:data:`CT_AIR_EVIDENCE`): only CT stores such
negative values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.contracts.dataset import Dataset
from pipeline.core.errors import InputError
from pipeline.core.files import read_nifti

__all__ = [
    "CT_AIR_LEVEL",
    "CT_AIR_EVIDENCE",
    "PERCENTILES",
    "LoadedImage",
    "ImageFacts",
    "Fingerprint",
    "fingerprint",
    "load_sample",
    "foreground_mask",
    "to_ras",
    "otsu_threshold",
]

# HU: soft tissue and fat lie above, air (-1000) and padding below.
CT_AIR_LEVEL = -500.0
# HU: an image whose 0.5th percentile is at or below this holds air in HU, i.e. it is CT.
CT_AIR_EVIDENCE = -500.0
PERCENTILES: tuple[float, ...] = (0.5, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.5)
# Foreground values kept per image for the pooled percentiles (a fixed-size random subset).
_VALUES_PER_IMAGE = 20_000
_RAS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class LoadedImage:
    """One sampled training image, read from its NIfTI file.

    Attributes:
        row: its manifest row.
        data: voxels as stored (float32; a 2D file gets a third axis of 1).
        affine: its NIfTI affine.
        modality: the resolved modality (the manifest's, else ``CT`` from the values, else ``""``).
    """

    row: pd.Series
    data: np.ndarray
    affine: np.ndarray
    modality: str


@dataclass(frozen=True)
class ImageFacts:
    """What the fingerprint measured on one sampled image (axes in RAS order)."""

    modality: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    foreground_fraction: float
    foreground_extent_mm: tuple[float, float, float]
    slices_with_foreground: float


@dataclass
class Fingerprint:
    """The fingerprint of a training split (every figure is JSON-ready).

    Attributes:
        n_images: images (manifest rows) in the split.
        n_subjects: distinct subjects.
        images_per_class / subjects_per_class: class balance.
        modality: the dataset's modality (``CT``, ``MR``, ``DX``, ...; ``""``: unknown, no absolute scale).
        modality_source: how it was decided (manifest or values).
        modalities: resolved modality -> sampled images.
        single_frame: share of images with one slice (2D images: X-ray, a single slice).
        shape / spacing: per RAS axis, ``{"median", "min", "max"}`` over every image's header.
        axcodes: native orientation codes -> images.
        foreground_extent_mm: per RAS axis, ``{"median", "p90", "max"}`` of the sampled foreground boxes.
        foreground_fraction: median share of an image's voxels that are foreground.
        slices_with_foreground: mean share of an image's slices holding foreground (2D training images).
        intensity: the pooled foreground percentiles of the sample (``"p<q>"`` -> value), source units.
        sampled: images whose voxels were read.
    """

    n_images: int
    n_subjects: int
    images_per_class: dict[str, int]
    subjects_per_class: dict[str, int]
    modality: str
    modality_source: str
    modalities: dict[str, int]
    single_frame: float
    shape: list[dict[str, float]]
    spacing: list[dict[str, float]]
    axcodes: dict[str, int]
    foreground_extent_mm: list[dict[str, float]]
    foreground_fraction: float
    slices_with_foreground: float
    intensity: dict[str, float]
    sampled: int
    images: list[ImageFacts] = field(default_factory=list, repr=False)

    @property
    def is_ct(self) -> bool:
        """True when the intensities are HU (a CT dataset)."""
        return self.modality == "CT"

    def to_dict(self) -> dict[str, Any]:
        """The fingerprint for plan.json (per-image facts left out)."""
        document = asdict(self)
        document.pop("images")
        return document

    def lines(self) -> list[str]:
        """A few human-readable lines."""
        med = [axis["median"] for axis in self.spacing]
        size = [axis["median"] for axis in self.shape]
        fov = [axis["p90"] for axis in self.foreground_extent_mm]
        classes = ", ".join(
            f"{label} {self.images_per_class[label]} images / {self.subjects_per_class[label]} subjects"
            for label in sorted(self.images_per_class)
        )
        modality = self.modality or "unknown modality (no absolute intensity scale)"
        low, high = self.intensity.get("p1"), self.intensity.get("p99")
        return [
            f"Fingerprint: {self.n_images} training images of {self.n_subjects} subjects ({classes})",
            f"  modality {modality} (from {self.modality_source}); "
            f"{'single-frame 2D images; ' if self.single_frame >= 0.5 else ''}"
            f"median shape {'x'.join(f'{v:g}' for v in size)} at {'x'.join(f'{v:.3g}' for v in med)} mm; "
            f"orientation {', '.join(f'{code} ({n})' for code, n in sorted(self.axcodes.items()))}",
            f"  foreground (sample of {self.sampled}): box {'x'.join(f'{v:.0f}' for v in fov)} mm (90th percentile), "
            f"{self.foreground_fraction:.0%} of the voxels, intensities p1..p99 {low:.4g}..{high:.4g}",
        ]


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient ``data`` (3D) to RAS axis order by flips and transposes only; returns it and its spacing."""
    ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(("R", "A", "S"), _RAS))
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(transform):
        spacing[int(target)] = float(zooms[axis])
    return nib.orientations.apply_orientation(data, transform), (spacing[0], spacing[1], spacing[2])


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the level that best splits ``values`` into two classes (between-class variance)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mass = np.cumsum(counts * centres)
    mean_low = mass / np.maximum(weight_low, 1)
    mean_high = (mass[-1] - mass) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def foreground_mask(data: np.ndarray, modality: str) -> np.ndarray:
    """The foreground of one image in source units (see the module docstring)."""
    if modality == "CT":
        return data > CT_AIR_LEVEL
    return data > otsu_threshold(data)


def _resolved_modality(row: pd.Series, data: np.ndarray | None) -> str:
    """The manifest's modality; for a row without one, CT when the values hold air in HU."""
    stated = str(row.get("modality", "") or "").strip().upper()
    if stated and stated != "NAN":
        return stated
    if data is not None and data.size and float(np.percentile(data, 0.5)) <= CT_AIR_EVIDENCE:
        return "CT"
    return ""


def load_sample(dataset: Dataset, rows: pd.DataFrame, max_images: int = 32, seed: int = 0) -> list[LoadedImage]:
    """Read the voxels of up to ``max_images`` rows, the same number from each class where possible.

    The draw is seeded, so the same split gives the same sample (and the same plan).
    """
    rng = np.random.default_rng(seed)
    labels = sorted(rows["label"].unique().tolist())
    per_class = max(1, max_images // max(1, len(labels)))
    picked: list[int] = []
    for label in labels:
        index = np.flatnonzero((rows["label"] == label).to_numpy())
        picked.extend(sorted(rng.permutation(index)[:per_class].tolist()))
    loaded = []
    for position in sorted(picked):
        row = rows.iloc[position]
        data, affine = read_nifti(dataset.image_path(row))
        if data.ndim == 2:
            data = data[:, :, None]
        if data.ndim != 3:
            raise InputError(
                f"{dataset.root / 'manifest.csv'}: sample {row['sample_id']} has shape {tuple(data.shape)}. "
                "Fix: store one 2D image or 3D volume per NIfTI file."
            )
        loaded.append(LoadedImage(row, data, affine, _resolved_modality(row, data)))
    return loaded


def _image_facts(image: LoadedImage, modality: str, rng: np.random.Generator) -> tuple[ImageFacts, np.ndarray]:
    """Foreground box, share and values of one image (RAS axes), and a subset of its foreground values."""
    data, spacing = to_ras(image.data, image.affine)
    mask = foreground_mask(data, modality)
    extent = [0.0, 0.0, 0.0]
    if mask.any():
        coords = np.nonzero(mask)
        for axis in range(3):
            # Robust bounds: a few stray voxels (noise, a marker) do not widen the box.
            low, high = np.percentile(coords[axis], [0.5, 99.5])
            extent[axis] = float((high - low + 1) * spacing[axis])
    values = data[mask]
    if values.size > _VALUES_PER_IMAGE:
        values = rng.choice(values, _VALUES_PER_IMAGE, replace=False)
    slices = mask.reshape(-1, mask.shape[2]).mean(axis=0) > 0.05
    facts = ImageFacts(
        modality=modality,
        shape=(int(data.shape[0]), int(data.shape[1]), int(data.shape[2])),
        spacing=spacing,
        foreground_fraction=float(mask.mean()),
        foreground_extent_mm=(extent[0], extent[1], extent[2]),
        slices_with_foreground=float(slices.mean()),
    )
    return facts, values


def _summary(values: np.ndarray, keys: tuple[str, ...] = ("median", "min", "max")) -> dict[str, float]:
    funcs = {
        "median": np.median,
        "min": np.min,
        "max": np.max,
        "p90": lambda array: np.percentile(array, 90),
    }
    return {key: round(float(funcs[key](values)), 4) for key in keys}


def _header(dataset: Dataset, row: pd.Series) -> tuple[tuple[int, int, int], tuple[float, float, float], str]:
    """Shape and spacing in RAS order and the native orientation codes, from the header alone."""
    path = dataset.image_path(row)
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises several unrelated types for corrupt files
        raise InputError(
            f"{path}: not a readable NIfTI image ({type(exc).__name__}). Fix: re-create the file or remove its row."
        ) from exc
    shape = tuple(int(v) for v in image.shape) + (1,) * (3 - len(image.shape))
    if len(shape) != 3:
        raise InputError(
            f"{dataset.root / 'manifest.csv'}: sample {row['sample_id']} has shape {tuple(image.shape)}. "
            "Fix: store one 2D image or 3D volume per NIfTI file."
        )
    ornt = nib.orientations.io_orientation(image.affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(("R", "A", "S"), _RAS))
    zooms = np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0))
    ras_shape, ras_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(transform):
        ras_shape[int(target)] = shape[axis]
        ras_spacing[int(target)] = float(zooms[axis])
    codes = "".join(nib.orientations.ornt2axcodes(ornt))
    return (ras_shape[0], ras_shape[1], ras_shape[2]), (ras_spacing[0], ras_spacing[1], ras_spacing[2]), codes


def fingerprint(
    dataset: Dataset, rows: pd.DataFrame, sample: list[LoadedImage] | None = None, seed: int = 0
) -> Fingerprint:
    """Measure the fingerprint of ``rows`` (a training split) of ``dataset``.

    Args:
        dataset: the dataset folder.
        rows: its training rows (one per image).
        sample: images already read with :func:`load_sample` (read here when None).
        seed: seed of the sample and of the value subsets.

    Raises:
        InputError: no rows, or an unreadable image.
    """
    if rows.empty:
        raise InputError(f"{dataset.root / 'manifest.csv'}: no training images to plan from. Fix: ingest a dataset.")
    sample = load_sample(dataset, rows, seed=seed) if sample is None else sample
    headers = [_header(dataset, row) for _, row in rows.iterrows()]
    shapes = np.asarray([shape for shape, _, _ in headers], dtype=float)
    spacings = np.asarray([spacing for _, spacing, _ in headers], dtype=float)

    stated = [str(value).strip().upper() for value in rows.get("modality", pd.Series(dtype=str)).fillna("")]
    stated = [value for value in stated if value and value != "NAN"]
    resolved = Counter(image.modality for image in sample)
    modality, _count = resolved.most_common(1)[0] if resolved else ("", 0)
    source = "the manifest" if stated and modality in stated else "the values" if modality == "CT" else "no record"

    rng = np.random.default_rng(seed)
    facts, pooled = [], []
    for image in sample:
        fact, values = _image_facts(image, modality, rng)
        facts.append(fact)
        pooled.append(values)
    values = np.concatenate(pooled) if pooled else np.zeros(1)
    if values.size == 0:
        values = np.zeros(1)
    extents = np.asarray([fact.foreground_extent_mm for fact in facts] or [[0.0, 0.0, 0.0]])
    subjects = rows.groupby("label")["subject_id"].nunique()
    return Fingerprint(
        n_images=int(len(rows)),
        n_subjects=int(rows["subject_id"].nunique()),
        images_per_class={str(k): int(v) for k, v in rows.groupby("label").size().items()},
        subjects_per_class={str(k): int(v) for k, v in subjects.items()},
        modality=modality,
        modality_source=source,
        modalities={name or "unknown": int(n) for name, n in resolved.items()},
        single_frame=round(float((shapes[:, 2] == 1).mean()), 4),
        shape=[_summary(shapes[:, axis]) for axis in range(3)],
        spacing=[_summary(spacings[:, axis]) for axis in range(3)],
        axcodes=dict(Counter(codes for _, _, codes in headers)),
        foreground_extent_mm=[_summary(extents[:, axis], ("median", "p90", "max")) for axis in range(3)],
        foreground_fraction=round(float(np.median([fact.foreground_fraction for fact in facts] or [0.0])), 4),
        slices_with_foreground=round(float(np.mean([fact.slices_with_foreground for fact in facts] or [1.0])), 4),
        intensity={f"p{q:g}": round(float(v), 4) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))},
        sampled=len(sample),
        images=facts,
    )
