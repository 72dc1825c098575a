"""Generate a synthetic dataset from a trained model's EMA generator.

Every file says it is synthetic (NIfTI ``descrip`` = ``synthetic (medsynth <run id>)``) and can be
traced to its generator (manifest columns ``generator_run_id``, ``seed``, ``model_digest``).
Images are written in modality units (HU for CT) on the model grid: 2D images as (x, y, 1)
volumes whose affine carries the model's spacing (and the training data's slice spacing).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.contracts.dataset import Dataset, read_dataset, write_manifest
from pipeline.contracts.model import read_model_meta
from pipeline.core.errors import InputError
from pipeline.core.files import sha256_file, write_nifti
from pipeline.models.config import GenerateConfig
from pipeline.models.grid import save_sample_grid
from pipeline.core.paths import is_inside, refuse_escaping_folders
from pipeline.imaging.model_dir import load_generator, sample, select_device, verify_checkpoint
from pipeline.imaging.preprocess import Preprocessor
from pipeline.tracking import NullTracker, Tracker

__all__ = ["run", "synthetic_descrip", "GRID_NAME"]

GRID_NAME = "samples.png"


def synthetic_descrip(run_id: str | None) -> str:
    """The NIfTI ``descrip`` of a synthetic image (fits the 80-byte field)."""
    return f"synthetic (medsynth {run_id or 'untracked'})"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def run(
    model_dir: Path,
    out: Path,
    config: GenerateConfig,
    tracker: Tracker = NullTracker(),
) -> Dataset:
    """Write ``config.per_class`` images per class to the dataset folder ``out``.

    Args:
        model_dir: a MODEL_DIR written by ``train``.
        out: the synthetic dataset folder (created; files of an earlier run are overwritten).
        config: the ``generate:`` section (per_class, seed, batch_size, device).
        tracker: where to record params, the output dataset and a sample grid.

    Returns:
        The written :class:`~pipeline.contracts.dataset.Dataset` (``origin=synthetic``, ``split=train``).
    """
    model_dir, out = Path(model_dir), Path(out)
    meta = read_model_meta(model_dir)
    refuse_escaping_folders(out, ("images",))
    previous = _previous_synthetic_files(out)
    preprocessor = Preprocessor(meta.preprocess)
    device = select_device(config.device)
    generator = load_generator(model_dir, device=device)
    labels: list[str] = list(meta.labels)
    run_id = meta.mlflow_run_id
    model_digest = verify_checkpoint(model_dir, meta)
    tag = run_id[:8] if run_id else "local"

    tracker.log_params(
        {
            "generate.per_class": config.per_class,
            "generate.seed": config.seed,
            "generate.batch_size": config.batch_size,
            "generate.model_run_id": run_id or "",
            "generate.model_digest": model_digest,
        }
    )
    tracker.set_tags({"medsynth.generator_run_id": run_id or "", "medsynth.model_digest": model_digest})

    class_ids = torch.arange(len(labels)).repeat_interleave(config.per_class)
    images = sample(generator, class_ids, seed=config.seed, batch_size=config.batch_size)
    values = preprocessor.to_intensity(images.numpy())
    affine = preprocessor.grid_affine()
    descrip = synthetic_descrip(run_id)
    rows = []
    for index, class_id in enumerate(class_ids.tolist()):
        label = labels[class_id]
        sample_id = f"syn-{tag}-s{config.seed}-{_safe(label)}-{index % config.per_class:05d}"
        rel = f"images/{sample_id}.nii.gz"
        volume = values[index, 0]
        if volume.ndim == 2:
            volume = volume[:, :, None]
        write_nifti(out / rel, np.asarray(volume, dtype=np.float32), affine, descrip=descrip)
        rows.append(
            {
                "sample_id": sample_id,
                "subject_id": sample_id,  # every synthetic image is its own (non-existent) subject
                "label": label,
                "split": "train",
                "path": rel,
                "origin": "synthetic",
                "sha256": sha256_file(out / rel),
                "generator_run_id": run_id or "",
                "seed": config.seed,
                "model_digest": model_digest,
                "spacing": "x".join(f"{value:g}" for value in affine_spacing(affine)),
                "shape": "x".join(str(side) for side in volume.shape),
            }
        )
    manifest = pd.DataFrame(rows).astype(str)
    write_manifest(out, manifest)
    for stale in previous - set(manifest["path"]):
        if is_inside((out / stale).parent, out):  # never follow a link out of the dataset to delete
            (out / stale).unlink(missing_ok=True)  # images of an earlier, larger run into the same folder
    dataset = read_dataset(out)

    per_grid = min(config.per_class, 8)
    picks = torch.cat([torch.arange(c * config.per_class, c * config.per_class + per_grid) for c in range(len(labels))])
    grid = save_sample_grid(images[picks], labels, out / GRID_NAME, per_grid)
    tracker.log_artifact(grid, "samples")
    tracker.log_dataset(dataset, context="output", name=out.name)
    tracker.log_metrics({"generated_images": len(rows)})
    return dataset


def _previous_synthetic_files(out: Path) -> set[str]:
    """Paths listed by an earlier synthetic manifest in ``out``; refuses to write over a real dataset."""
    if not (out / "manifest.csv").is_file():
        return set()
    previous = read_dataset(out, check_files=False).manifest
    if (previous["origin"] != "synthetic").any():
        raise InputError(
            f"{out}: holds a dataset with real images. Fix: choose another --out folder for synthetic images."
        )
    return set(previous["path"])


def affine_spacing(affine: np.ndarray) -> list[float]:
    """Voxel sizes (mm) of an affine's three axes."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)).round(4).tolist()
