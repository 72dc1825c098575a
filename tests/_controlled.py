"""Controlled datasets with known answers: a real cohort and synthetic sets derived from it.

The evaluate stage is only trustworthy if it tells good synthetic data from bad. These helpers
build cases whose verdict is known in advance (identical copies, near-copies, independent draws,
one image per class, white noise, swapped labels) so tests and benchmarks can check the verdicts.

Images look like the demo's axial CT slices: air at -1000 HU, an elliptical body at ~40 HU with
noise, and for the ``lesion`` class a bright round lesion inside the body.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from pipeline.contracts.dataset import Dataset, read_dataset, write_manifest
from pipeline.core.files import read_nifti, sha256_file, write_nifti

__all__ = [
    "LABELS",
    "SyntheticKind",
    "SYNTHETIC_KINDS",
    "draw_slice",
    "make_real_dataset",
    "make_synthetic_dataset",
]

LABELS: tuple[str, str] = ("lesion", "normal")
SyntheticKind = Literal["identical", "noisy_copies", "independent", "one_per_class", "white_noise", "swapped"]
SYNTHETIC_KINDS: tuple[str, ...] = (
    "identical",
    "noisy_copies",
    "independent",
    "one_per_class",
    "white_noise",
    "swapped",
)
_AIR_HU = -1000.0
_TISSUE_HU = 40.0
_LESION_HU = 160.0
_NOISE_HU = 15.0


@dataclass(frozen=True)
class _Subject:
    """Geometry of one subject's body and lesion (in units of the image size)."""

    cx: float
    cy: float
    rx: float
    ry: float
    tissue: float
    lx: float
    ly: float
    lr: float


def _draw_subject(rng: np.random.Generator) -> _Subject:
    rx, ry = rng.uniform(0.26, 0.42), rng.uniform(0.22, 0.38)
    cx, cy = 0.5 + rng.uniform(-0.06, 0.06), 0.5 + rng.uniform(-0.06, 0.06)
    angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.5)
    return _Subject(
        cx=cx,
        cy=cy,
        rx=rx,
        ry=ry,
        tissue=_TISSUE_HU + rng.uniform(-20, 20),
        lx=cx + radius * rx * np.cos(angle),
        ly=cy + radius * ry * np.sin(angle),
        lr=rng.uniform(0.10, 0.16),
    )


def _render(subject: _Subject, label: str, size: int, shrink: float, rng: np.random.Generator) -> np.ndarray:
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(grid, grid, indexing="ij")
    body = ((x - subject.cx) / (subject.rx * shrink)) ** 2 + ((y - subject.cy) / (subject.ry * shrink)) ** 2 <= 1.0
    image = np.full((size, size), _AIR_HU, dtype=np.float32)
    image[body] = subject.tissue
    if label == "lesion":
        lesion = (x - subject.lx) ** 2 + (y - subject.ly) ** 2 <= (subject.lr * shrink) ** 2
        image[lesion & body] = _LESION_HU
    image += rng.normal(0.0, _NOISE_HU, size=image.shape).astype(np.float32)
    return image


def draw_slice(rng: np.random.Generator, label: str, size: int) -> np.ndarray:
    """One random 2D image of class ``label`` (HU, shape (size, size), indexed [x, y])."""
    return _render(_draw_subject(rng), label, size, 1.0, rng)


def _draw_volume(rng: np.random.Generator, label: str, size: int, slices: int) -> np.ndarray:
    subject = _draw_subject(rng)
    # The body narrows a little towards the ends; the lesion stays visible on every slice.
    shrinks = 1.0 - 0.15 * np.abs(np.linspace(-1, 1, slices)) if slices > 1 else np.ones(1)
    return np.stack([_render(subject, label, size, float(s), rng) for s in shrinks], axis=-1)


def _affine(spacing: tuple[float, float, float]) -> np.ndarray:
    return np.diag([spacing[0], spacing[1], spacing[2], 1.0])


def _split_of(index: int, count: int, fractions: tuple[float, float, float]) -> str:
    n_train = int(round(count * fractions[0]))
    n_val = int(round(count * fractions[1]))
    if index < n_train:
        return "train"
    return "val" if index < n_train + n_val else "test"


def make_real_dataset(
    out: str | os.PathLike[str],
    *,
    per_class: int = 40,
    size: int = 32,
    slices: int = 1,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
) -> Dataset:
    """Write a real dataset: one volume per subject, ``per_class`` subjects per label.

    Splits are assigned per class (stratified) by subject, in ``fractions`` (train, val, test).

    Args:
        out: the dataset folder (created).
        per_class: subjects per class.
        size: in-plane size in pixels.
        slices: axial slices per volume (1 gives (size, size, 1) volumes).
        seed: same seed, same images.
        fractions: shares of train, val and test subjects.
        spacing: voxel size in mm.

    Returns:
        The dataset as read back through the contract.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for label in LABELS:
        for index in range(per_class):
            sample_id = f"real-{label}-{index:04d}"
            volume = _draw_volume(rng, label, size, slices)
            rel = f"images/{sample_id}.nii.gz"
            write_nifti(out / rel, volume, _affine(spacing), descrip="controlled real phantom")
            rows.append(
                {
                    "sample_id": sample_id,
                    "subject_id": f"sub-{label}-{index:04d}",
                    "label": label,
                    "split": _split_of(index, per_class, fractions),
                    "path": rel,
                    "origin": "real",
                    "sha256": sha256_file(out / rel),
                }
            )
    write_manifest(out, pd.DataFrame(rows))
    return read_dataset(out)


def make_synthetic_dataset(
    out: str | os.PathLike[str],
    real: Dataset,
    kind: SyntheticKind,
    *,
    per_class: int = 40,
    seed: int = 1,
    copy_noise_hu: float = 3.0,
) -> Dataset:
    """Write a synthetic dataset derived from ``real`` whose evaluation verdict is known.

    Kinds:
        ``identical``: every real training slice copied exactly (``per_class`` ignored).
        ``noisy_copies``: every real training slice plus slight noise (``copy_noise_hu``).
        ``independent``: fresh draws from the real distribution (same generator, other seed).
        ``one_per_class``: one fresh image per class, repeated ``per_class`` times.
        ``white_noise``: uniform noise over the real intensity range.
        ``swapped``: fresh draws whose labels are swapped (lesion images labelled normal and vice versa).

    Images are single-slice NIfTI files (H, W, 1) in HU on the real grid, like ``medsynth generate``
    writes them.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first, affine = read_nifti(real.image_path(real.manifest.iloc[0]))
    size = first.shape[0]
    images: list[tuple[np.ndarray, str]] = []
    if kind in ("identical", "noisy_copies"):
        for _, row in real.subset(split="train").iterrows():
            volume, _ = read_nifti(real.image_path(row))
            for z in range(volume.shape[2]):
                image = volume[:, :, z]
                if kind == "noisy_copies":
                    image = image + rng.normal(0.0, copy_noise_hu, size=image.shape).astype(np.float32)
                images.append((image, str(row["label"])))
    elif kind in ("independent", "swapped"):
        swap = {LABELS[0]: LABELS[1], LABELS[1]: LABELS[0]}
        for label in LABELS:
            for _ in range(per_class):
                images.append((draw_slice(rng, label, size), swap[label] if kind == "swapped" else label))
    elif kind == "one_per_class":
        for label in LABELS:
            image = draw_slice(rng, label, size)
            images.extend((image, label) for _ in range(per_class))
    elif kind == "white_noise":
        for label in LABELS:
            for _ in range(per_class):
                images.append((rng.uniform(_AIR_HU, _LESION_HU, size=(size, size)).astype(np.float32), label))
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}; choose one of {', '.join(SYNTHETIC_KINDS)}")
    rows = []
    for index, (image, label) in enumerate(images):
        sample_id = f"syn-{index:05d}"
        rel = f"images/{sample_id}.nii.gz"
        write_nifti(out / rel, image[:, :, None], affine, descrip=f"SYNTHETIC controlled {kind}")
        rows.append(
            {
                "sample_id": sample_id,
                "subject_id": sample_id,
                "label": label,
                "split": "train",
                "path": rel,
                "origin": "synthetic",
                "sha256": sha256_file(out / rel),
                "generator_run_id": f"controlled-{kind}",
                "seed": str(seed),
            }
        )
    write_manifest(out, pd.DataFrame(rows))
    return read_dataset(out)
