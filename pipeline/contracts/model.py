"""The model contract: ``MODEL_DIR/model.json``, written by train and read by every later stage.

``model.json`` records what a generator is (architecture, label map, preprocessing spec), how it was
trained (resolved config, seed, steps, DP record) and where it came from (training-data digest,
MLflow run ids). :func:`read_model_meta` is the one place that parses it; its errors name the file,
the key and the fix. docs/contracts.md describes every key.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core.errors import InputError
from pipeline.core.files import atomic_write_json, sha256_file

__all__ = [
    "MODEL_JSON",
    "CHECKPOINT",
    "FORMAT_VERSION",
    "MAX_IMAGE_VOXELS",
    "PREPROCESS_KEYS",
    "check_image_size",
    "ModelMeta",
    "read_model_meta",
    "write_model_meta",
    "LOSSES_CSV",
    "LOSSES_PNG",
    "SAMPLES_DIR",
    "SELECTED_GRID",
    "read_losses",
    "training_record",
]

MODEL_JSON = "model.json"
CHECKPOINT = "checkpoint.pt"
# Per-step training statistics (one row per optimizer step, the same steps as the checkpoint).
LOSSES_CSV = "losses.csv"
LOSSES_PNG = "losses.png"
SAMPLES_DIR = "samples"
# The exported (selected) generator's sample grid, beside the grids written during training.
SELECTED_GRID = "selected.png"
FORMAT_VERSION = 1
# Points per series in the training record's loss curves (each the mean of a window of steps).
CURVE_POINTS = 120
# The largest generator output a model may describe: 2^26 voxels (8192 x 8192, or 406^3) of float32
# is 256 MiB per image, before the network's feature maps multiply it. Checked before anything is
# allocated: a size far beyond any scanner's otherwise dies deep in torch after minutes.
MAX_IMAGE_VOXELS = 1 << 26
# The keys of ``preprocess`` that pipeline.imaging.preprocess.Preprocessor reads, and their kinds.
PREPROCESS_KEYS: dict[str, str] = {
    "spatial_dims": "int",
    "orientation": "str",
    "spacing": "numbers",
    "image_size": "ints",
    "slice_spacing": "number",
    "intensity": "str",
    "window": "pair",
    "percentiles": "pair",
    "min_foreground": "number",
}


def check_image_size(size: list[int], spatial_dims: int | None = None) -> str | None:
    """Why ``size`` cannot be a generator's output grid (None when it can).

    Args:
        size: voxels per axis.
        spatial_dims: 2 or 3, when known: the number of axes must match.
    """
    if not size or any(not isinstance(side, int) or isinstance(side, bool) or side < 1 for side in size):
        return "must list positive whole numbers of voxels"
    if spatial_dims is not None and len(size) != spatial_dims:
        return f"has {len(size)} axes, spatial_dims says {spatial_dims}"
    voxels = math.prod(size)
    if voxels > MAX_IMAGE_VOXELS:
        return f"is {voxels} voxels per image, above the limit of {MAX_IMAGE_VOXELS} (2^26)"
    return None


def _check_kind(value: Any, kind: str) -> bool:
    def number(item: Any) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item)

    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str) and bool(value)
    if kind == "number":
        return number(value)
    if kind == "pair":
        return isinstance(value, list) and len(value) == 2 and all(number(item) for item in value)
    if kind == "ints":
        return isinstance(value, list) and bool(value) and all(isinstance(item, int) and not isinstance(item, bool) for item in value)
    return isinstance(value, list) and bool(value) and all(number(item) for item in value)  # "numbers"


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
    steps_planned: int | None = Field(
        None,
        ge=1,
        description="The step budget (`model.max_steps`) of the run that wrote the file; null: convergence "
        "(`max_steps: auto`) or the time budget is the plan.",
    )
    converged: bool = Field(
        False,
        description="`max_steps: auto`: training stopped because the selection criterion stopped improving "
        "(the plan reached; not an early stop).",
    )
    selected_step: int | None = Field(
        None,
        ge=0,
        description="The step whose EMA generator (and discriminator) the checkpoint exports: the best by the "
        "held-out selection criterion; null: the last step (selection off).",
    )
    selection: dict[str, Any] | None = Field(
        None,
        description="Model selection on the validation split: criterion, selected step, the best scores and "
        "every evaluation (step, fid, label_accuracy, real_accuracy, criterion, augment_p).",
    )
    augmentation: dict[str, Any] | None = Field(
        None,
        description="Discriminator augmentation: mode (ada or fixed), ops, and for ADA the target and the "
        "probability p over time ([step, p] pairs, the last one the final p).",
    )
    stopped_early: bool = Field(
        False,
        description="True when the weights are not the planned result: training stopped (time cap, Ctrl-C, "
        "divergence) or has not finished before `steps_planned`. Later stages must not use them silently.",
    )
    stop_reason: str | None = Field(None, description="Why training stopped short of the plan (null when it did not).")
    images_seen: int = Field(0, ge=0, description="Real images shown to the discriminator.")
    train_seconds: float = Field(0.0, ge=0, description="Wall-clock training time, summed over resumes.")
    world_size: int = Field(1, ge=1, description="Processes that trained it (DDP).")
    n_train_volumes: int = Field(..., ge=0, description="Real training volumes.")
    n_train_images: int = Field(..., ge=0, description="Real training images (slices in 2D).")
    config: dict[str, Any] = Field(..., description="The resolved `model:` section.")
    preprocess: dict[str, Any] = Field(..., description="Preprocessing spec (grid, orientation, intensity mapping).")
    dp: dict[str, Any] | None = Field(None, description="Differential-privacy record, None without DP.")
    initialized_from: dict[str, Any] | None = Field(
        None,
        description="`model.init_from`: the source model's checkpoint SHA-256, steps, training-data digest and DP "
        "epsilon; null: random initialisation.",
    )
    train_dataset_digest: str | None = Field(None, description="Digest of the dataset it was trained on.")
    checkpoint_sha256: str | None = Field(
        None, description="SHA-256 of the checkpoint.pt this file describes (null: written before the first checkpoint)."
    )

    @field_validator("image_size")
    @classmethod
    def _size_is_allocatable(cls, value: list[int]) -> list[int]:
        problem = check_image_size(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("preprocess")
    @classmethod
    def _preprocess_is_complete(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, kind in PREPROCESS_KEYS.items():
            if key not in value:
                raise ValueError(f"missing key '{key}'")
            if not _check_kind(value[key], kind):
                raise ValueError(f"key '{key}' is not a valid {kind.replace('ints', 'list of whole numbers')}")
        problem = check_image_size(value["image_size"], value["spatial_dims"])
        if problem is not None:
            raise ValueError(f"key 'image_size' {problem}")
        return value

    @model_validator(mode="after")
    def _one_grid(self) -> "ModelMeta":
        if len(self.image_size) != self.spatial_dims:
            raise ValueError(f"image_size has {len(self.image_size)} axes, spatial_dims is {self.spatial_dims}")
        return self

    def label_index(self) -> dict[str, int]:
        """Class name -> label id (the generator's and discriminator's integer input)."""
        return {label: index for index, label in enumerate(self.labels)}

    @property
    def steps_done(self) -> int:
        """Optimizer steps done (the ``steps`` key)."""
        return self.steps


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
        message = str(first["msg"]).removeprefix("Value error, ")
        problem = "is missing" if first["type"] == "missing" else f"is not valid ({message})"
        raise InputError(
            f"{path}: key '{key}' {problem}. Fix: pass a MODEL_DIR written by `medsynth train` "
            "(re-run train if the file was edited)."
        ) from None


def write_model_meta(model_dir: str | os.PathLike[str], meta: ModelMeta) -> Path:
    """Write ``MODEL_DIR/model.json`` atomically, recording the SHA-256 of the checkpoint beside it.

    Train writes the checkpoint first and this file second, so the digest names the weights this
    file describes; generate, evaluate and export refuse a checkpoint that no longer matches it.
    """
    checkpoint = Path(model_dir) / CHECKPOINT
    meta.checkpoint_sha256 = sha256_file(checkpoint) if checkpoint.is_file() else None
    return atomic_write_json(Path(model_dir) / MODEL_JSON, meta.model_dump(mode="json"))


def read_losses(model_dir: str | os.PathLike[str]) -> dict[str, list[float]]:
    """``MODEL_DIR/losses.csv`` as columns (``step`` first); empty when the file is absent or unreadable.

    Written by train (one row per step, appended at every checkpoint); a model trained before the
    file existed simply has no loss curves.
    """
    path = Path(model_dir) / LOSSES_CSV
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    if not rows:
        return {}
    columns: dict[str, list[float]] = {name: [] for name in rows[0]}
    for row in rows:
        try:
            values = {name: float(row[name]) for name in columns}
        except (TypeError, ValueError):
            continue  # a line cut short by a crash while appending
        for name, value in values.items():
            columns[name].append(value)
    return columns


def _windowed(steps: list[float], values: list[float], points: int) -> tuple[list[int], list[float | None]]:
    """Means of ``values`` over ``points`` equal windows of steps (non-finite values left out)."""
    size = max(1, math.ceil(len(values) / points))
    out_steps: list[int] = []
    out_values: list[float | None] = []
    for start in range(0, len(values), size):
        window = [value for value in values[start : start + size] if math.isfinite(value)]
        out_steps.append(int(steps[min(start + size, len(steps)) - 1]))
        out_values.append(round(sum(window) / len(window), 5) if window else None)
    return out_steps, out_values


def training_record(model_dir: str | os.PathLike[str], meta: ModelMeta | None = None) -> dict[str, Any]:
    """How a model's training went, as the report and the data card show it.

    Args:
        model_dir: the MODEL_DIR.
        meta: its ``model.json`` (read when not given).

    Returns:
        ``steps_done``, ``steps_planned``, ``stopped_early``, ``stop_reason``, ``converged``,
        ``selected_step``, ``selection`` (the selected step's scores), ``augment_p`` (ADA's final
        probability, None otherwise), ``train_seconds``,
        ``loss_curves`` (``step`` and one list per loss, each point the mean of a window of steps;
        empty without ``losses.csv``) and ``sample_grid`` (the last grid's file name inside the
        MODEL_DIR and its PNG as a data URI, or None).
    """
    model_dir = Path(model_dir)
    meta = meta if meta is not None else read_model_meta(model_dir)
    losses = read_losses(model_dir)
    curves: dict[str, list[Any]] = {}
    if losses.get("step"):
        for name in ("loss_d", "loss_g"):
            if name in losses:
                curves["step"], curves[name] = _windowed(losses["step"], losses[name], CURVE_POINTS)
    # The exported generator's grid when selection chose a step; else the last grid of training.
    selected = model_dir / SAMPLES_DIR / SELECTED_GRID
    grids = [selected] if selected.is_file() else sorted((model_dir / SAMPLES_DIR).glob("step_*.png"))
    grid = None
    if grids:
        encoded = base64.b64encode(grids[-1].read_bytes()).decode("ascii")
        grid = {"file": f"{SAMPLES_DIR}/{grids[-1].name}", "data_uri": f"data:image/png;base64,{encoded}"}
    return {
        "steps_done": meta.steps,
        "steps_planned": meta.steps_planned,
        "stopped_early": meta.stopped_early,
        "stop_reason": meta.stop_reason,
        "converged": meta.converged,
        "selected_step": meta.selected_step,
        "selection": (meta.selection or {}).get("best"),
        "augment_p": ((meta.augmentation or {}).get("p_history") or [[None, None]])[-1][1],
        "train_seconds": meta.train_seconds,
        "loss_curves": curves,
        "sample_grid": grid,
    }
