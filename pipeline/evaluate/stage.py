"""The evaluate stage: real + synthetic datasets -> report.json + report.html (+ MLflow).

:func:`run` reads both datasets (and the generator's ``model.json``), brings the images onto one
grid (:mod:`pipeline.imaging.images`), evaluates them (:func:`pipeline.evaluate.evaluation.evaluate_sets`),
assembles the :class:`pipeline.contracts.report.Report`, writes it (:mod:`pipeline.evaluate.report`)
and logs it to the tracker.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contracts.dataset import Dataset, read_dataset, verify_files
from pipeline.contracts.model import ModelMeta, read_model_meta, training_record
from pipeline.planning.record import plan_record
from pipeline.contracts.report import SCHEMA, GateName, Report, headline_figures
from pipeline.core.errors import InputError
from pipeline.core.torch_state import torch_threads
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.evaluation import evaluate_sets
from pipeline.evaluate.report import write_report
from pipeline.evaluate.seeds import purpose_seed
from pipeline.imaging.images import ImageSet, load_image_sets
from pipeline.imaging.model_dir import verify_checkpoint
from pipeline.tracking import NullTracker, Tracker

__all__ = ["run"]


def run(
    real: Path,
    synthetic: Path,
    out: Path,
    config: EvaluateConfig,
    model_dir: Path | None = None,
    tracker: Tracker = NullTracker(),
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``synthetic`` against ``real`` and write ``out/report.json`` and ``out/report.html``.

    Args:
        real: real dataset folder (the generator's training data: train/val/test splits).
        synthetic: synthetic dataset folder.
        out: report folder (created).
        config: the ``evaluate`` section.
        model_dir: the generator's folder: its preprocessing, discriminator (white-box attack) and
            DP record are used. None: default preprocessing, black-box attacks only.
        tracker: where metrics, artifacts and dataset lineage go.
        progress: show a progress bar on stderr.

    Returns:
        The report exactly as written to report.json (``Report.model_validate`` gives it typed).

    Raises:
        InputError: unreadable datasets, model folder or feature extractor.
    """
    _check_out(Path(out))
    real_dataset, synthetic_dataset = read_dataset(real), read_dataset(synthetic)
    model_dir = Path(model_dir) if model_dir is not None else None
    model = read_model_meta(model_dir) if model_dir is not None else None
    verify_files(real_dataset, flag="--real")
    verify_files(synthetic_dataset, flag="--synthetic")
    if model is not None and model_dir is not None:
        verify_checkpoint(model_dir, model)
    real_set, synthetic_set, preprocessing = load_image_sets(
        real_dataset,
        synthetic_dataset,
        model_dir=model_dir,
        seed=purpose_seed(config, "subsample"),
        max_images=config.max_images,
    )
    _require_finite(real_set, real_dataset)
    _require_finite(synthetic_set, synthetic_dataset)
    with torch_threads(config.num_threads):
        evaluation = evaluate_sets(real_set, synthetic_set, config, model_dir=model_dir, model=model, progress=progress)
    report = Report.model_validate(
        {
            "schema": SCHEMA,
            "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **evaluation.sections,
            "inputs": {
                "real": _counts(real_dataset, "real", real_set),
                "synthetic": _counts(synthetic_dataset, "synthetic", synthetic_set),
                "model": _model_inputs(model, model_dir, real_dataset),
            },
            # How the evaluated generator's training went (steps done/planned, early stop, loss curves).
            **(
                {"training": training_record(model_dir, model)}
                if model is not None and model_dir is not None
                else {"training": None, "training_reason": "evaluated without --model: no training record"}
            ),
            "preprocessing": preprocessing,
            # The training plan (model/plan.json: planned keys with reasons, guards, preprocessed grid).
            **_plan_entry(model_dir),
            "mlflow": {
                "run_id": tracker.run_id,
                "experiment_id": tracker.experiment_id,
                "model_run_id": model.mlflow_run_id if model is not None else None,
            },
            "config": config.model_dump(mode="json"),
        }
    )
    json_path, html_path = write_report(out, report, evaluation.evidence)
    _track(tracker, report, real_dataset, synthetic_dataset, (json_path, html_path))
    return report.as_dict()


def _check_out(out: Path) -> None:
    """Refuse a report folder that cannot be written, before the (long) evaluation rather than after it."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder. Fix: pass --out a new or existing folder.")
    existing = next((path for path in out.parents if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"{out}: cannot be created: {existing} is a file. Fix: pass --out a folder path.")


def _require_finite(image_set: ImageSet, dataset: Dataset) -> None:
    """Refuse images with NaN or infinite voxels: every metric (FID's matrix square root first) breaks on them."""
    bad = ~np.isfinite(image_set.images.reshape(len(image_set), -1)).all(axis=1)
    if not bad.any():
        return
    sample_id = str(image_set.sample_ids[int(np.argmax(bad))]).split("#z")[0]
    matches = np.flatnonzero(dataset.manifest["sample_id"].to_numpy() == sample_id)
    row = f" row {int(matches[0]) + 2}" if len(matches) else ""
    raise InputError(
        f"{dataset.root / 'manifest.csv'}{row}: image of sample {sample_id} holds NaN or infinite values "
        f"({int(bad.sum())} image(s) of {len(image_set)} do). Fix: re-create the image(s) (re-run the stage that "
        "wrote them) or remove the row(s)."
    )


def _counts(dataset: Dataset, origin: str, image_set: ImageSet) -> dict[str, Any]:
    """``inputs.real`` / ``inputs.synthetic``: the dataset's name, digest, and files and images per split and class."""
    rows = dataset.subset(origin=origin)
    files = rows.groupby(["split", "label"]).size()
    images: dict[str, dict[str, int]] = {}
    for split, label in zip(image_set.splits, image_set.labels):
        images.setdefault(str(split), {}).setdefault(str(label), 0)
        images[str(split)][str(label)] += 1
    return {
        "name": Path(dataset.root).resolve().name,
        "digest": dataset.digest,
        "files": int(len(rows)),
        "images": int(len(image_set)),
        "files_per_split_and_class": {
            str(split): {str(label): int(n) for (s, label), n in files.items() if s == split}
            for split in sorted(set(rows["split"]))
        },
        "images_per_split_and_class": images,
    }


def _model_inputs(model: ModelMeta | None, model_dir: Path | None, real: Dataset) -> dict[str, Any] | None:
    """``inputs.model``: which generator was evaluated, and whether it was trained on this real dataset."""
    if model is None or model_dir is None:
        return None
    return {
        "name": model_dir.resolve().name,
        "mlflow_run_id": model.mlflow_run_id,
        "train_dataset_digest": model.train_dataset_digest,
        "train_dataset_matches_real": model.train_dataset_digest in (None, real.digest),
        "spatial_dims": model.spatial_dims,
        "labels": model.labels,
    }


def _track(
    tracker: Tracker, report: Report, real: Dataset, synthetic: Dataset, written: tuple[Path, Path]
) -> None:
    """Dataset lineage, the headline figures as metrics, the gates as tags, the report files as artifacts."""
    tracker.log_dataset(real, context="evaluation-real")
    tracker.log_dataset(synthetic, context="evaluation-synthetic")
    tracker.log_metrics(headline_figures(report))
    tracker.set_tags(
        {
            **{f"gate.{gate.value}": report.gates.status(gate) for gate in GateName},
            "real_dataset_sha256": real.digest,
            "synthetic_dataset_sha256": synthetic.digest,
            "feature_space": report.fidelity.feature_space,
        }
    )
    for path in written:
        tracker.log_artifact(path, artifact_path="report")


def _plan_entry(model_dir: Path | None) -> dict[str, Any]:
    """The report's ``plan`` (model/plan.json as rows), or null with the reason there is none."""
    if model_dir is None:
        return {"plan": None, "plan_reason": "evaluated without --model: no training plan"}
    record = plan_record(model_dir)
    if record is None:
        return {"plan": None, "plan_reason": "the model folder has no plan.json (written by an older medsynth, or not by medsynth train)"}
    return {"plan": record}
