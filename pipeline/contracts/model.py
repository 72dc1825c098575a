"""The model contract: ``MODEL_DIR/model.json``, written by train and read by every later stage.

``model.json`` records what a generator is (architecture, label map, preprocessing spec), how it was
trained (resolved config, seed, steps, DP record) and where it came from (training-data digest,
MLflow run ids). :func:`read_model_meta` is the one place that parses it; its errors name the file,
the key and the fix. docs/contracts.md describes every key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.errors import InputError
from pipeline.core.files import atomic_write_json

__all__ = [
    "MODEL_JSON",
    "CHECKPOINT",
    "FORMAT_VERSION",
    "ModelMeta",
    "read_model_meta",
    "write_model_meta",
]

MODEL_JSON = "model.json"
CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1


class ModelMeta(BaseModel):
    """``model.json``: one trained (or training) generator.

    ``config`` is the resolved ``model:`` section the weights were trained with; ``preprocess`` is
    the spec :class:`pipeline.imaging.preprocess.Preprocessor` applies to real images so that every
    stage sees them on the generator's grid and intensity scale.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format_version: int = Field(FORMAT_VERSION, description="Version of this file's layout.")
    medsynth_version: str = Field(..., description="medsynth version that wrote the model.")
    spatial_dims: int = Field(..., ge=2, le=3, description="2 (slices) or 3 (volumes).")
    image_size: list[int] = Field(..., description="Generator output size in voxels.")
    spacing: list[float] = Field(..., description="Voxel spacing (mm) of the generator's grid.")
    labels: list[str] = Field(..., min_length=1, description="Class names; index i is label id i.")
    latent_dim: int = Field(..., ge=1, description="Length of the noise vector.")
    mlflow_run_id: str | None = Field(None, description="MLflow run that first trained the model.")
    mlflow_run_ids: list[str] = Field(default_factory=list, description="Every MLflow run that trained it (resumes).")
    seed: int = Field(..., description="Seed of weights, data order, noise and augmentation.")
    steps: int = Field(0, ge=0, description="Optimizer steps done.")
    images_seen: int = Field(0, ge=0, description="Real images shown to the discriminator.")
    train_seconds: float = Field(0.0, ge=0, description="Wall-clock training time, summed over resumes.")
    world_size: int = Field(1, ge=1, description="Processes that trained it (DDP).")
    n_train_volumes: int = Field(..., ge=0, description="Real training volumes.")
    n_train_images: int = Field(..., ge=0, description="Real training images (slices in 2D).")
    config: dict[str, Any] = Field(..., description="The resolved `model:` section.")
    preprocess: dict[str, Any] = Field(..., description="Preprocessing spec (grid, orientation, intensity mapping).")
    dp: dict[str, Any] | None = Field(None, description="Differential-privacy record, None without DP.")
    train_dataset_digest: str | None = Field(None, description="Digest of the dataset it was trained on.")

    def label_index(self) -> dict[str, int]:
        """Class name -> label id (the generator's and discriminator's integer input)."""
        return {label: index for index, label in enumerate(self.labels)}


def read_model_meta(model_dir: str | os.PathLike[str]) -> ModelMeta:
    """Parse and check ``MODEL_DIR/model.json``.

    Raises:
        InputError: missing, unreadable, not JSON, written by a newer medsynth, or a key missing
            or of the wrong type (the message names the key).
    """
    path = Path(model_dir) / MODEL_JSON
    if not path.is_file():
        raise InputError(f"{path}: not found. Fix: pass a MODEL_DIR written by `medsynth train`.")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({type(exc).__name__}). Fix: re-run `medsynth train`.") from None
    if not isinstance(payload, dict):
        raise InputError(f"{path}: the top level must be an object. Fix: re-run `medsynth train`.")
    version = payload.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise InputError(
            f"{path}: format_version {version} is newer than this medsynth reads ({FORMAT_VERSION}). "
            "Fix: upgrade medsynth, or re-train with this version."
        )
    try:
        return ModelMeta.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        problem = "is missing" if first["type"] == "missing" else f"is not valid ({first['msg']})"
        raise InputError(
            f"{path}: key '{key}' {problem}. Fix: pass a MODEL_DIR written by `medsynth train` "
            "(re-run train if the file was edited)."
        ) from None


def write_model_meta(model_dir: str | os.PathLike[str], meta: ModelMeta) -> Path:
    """Write ``MODEL_DIR/model.json`` atomically."""
    return atomic_write_json(Path(model_dir) / MODEL_JSON, meta.model_dump(mode="json"))
