"""Hand-made cohorts for the planning tests: another family than the phantom CT.

``ring_cohort``: the issue's failing example. 64 x 64 slices at 1 mm, intensities 0..1000 with no
recorded modality (NIfTI): a textured disc of tissue, and in class ``lesion`` a bright ring
(a rim-enhancing lesion) at a random place inside it. Stored as (x, y, 1) volumes or, with
``two_d``, as 2D (x, y) NIfTI files, the shape ingest gives a single-frame X-ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.contracts.dataset import write_manifest
from pipeline.core.files import sha256_file, write_nifti

SIDE = 64
SPACING = 1.0


def ring_image(rng: np.random.Generator, lesion: bool) -> np.ndarray:
    """One 64 x 64 image in 0..1000: a disc of tissue (~500) and, for a lesion, a bright ring (~900)."""
    xx, yy = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
    cx, cy = SIDE / 2 + rng.uniform(-3, 3), SIDE / 2 + rng.uniform(-3, 3)
    radius = rng.uniform(22, 27)
    body = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
    image = np.where(body, 450.0 + rng.normal(0, 25, (SIDE, SIDE)), 20.0 + rng.normal(0, 5, (SIDE, SIDE)))
    if lesion:
        angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0, radius - 10)
        lx, ly = cx + distance * np.cos(angle), cy + distance * np.sin(angle)
        r = np.sqrt((xx - lx) ** 2 + (yy - ly) ** 2)
        image = np.where((r > 2.5) & (r < 5.5), 900.0 + rng.normal(0, 20, (SIDE, SIDE)), image)
    return np.clip(image, 0.0, 1000.0).astype(np.float32)


def ring_cohort(root: Path, subjects: int = 40, seed: int = 0, two_d: bool = False) -> Path:
    """Write a dataset folder (manifest + NIfTI) of ``subjects`` ring images, 60/20/20 split by subject."""
    rng = np.random.default_rng(seed)
    affine = np.diag([-SPACING, -SPACING, SPACING, 1.0])
    rows = []
    for index in range(subjects):
        label = ("normal", "lesion")[index % 2]
        image = ring_image(rng, label == "lesion")
        data = image if two_d else image[:, :, None]
        rel = f"images/sub-{index:03d}.nii.gz"
        write_nifti(root / rel, data, affine)
        fraction = index / subjects
        split = "train" if fraction < 0.6 else ("val" if fraction < 0.8 else "test")
        rows.append(
            {"sample_id": f"img-{index:03d}", "subject_id": f"sub-{index:03d}", "label": label, "split": split,
             "path": rel, "origin": "real", "sha256": sha256_file(root / rel), "modality": ""}
        )
    write_manifest(root, pd.DataFrame(rows))
    return root
