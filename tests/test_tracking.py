"""Tracking writes real runs into a real (temporary) sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.config import flatten, load_config
from pipeline.contracts.dataset import read_dataset, write_manifest
from pipeline.core.files import sha256_file, write_nifti

REPO = Path(__file__).resolve().parents[1]


def _dataset(root: Path):
    rows = []
    for i in range(3):
        rel = f"img{i}.nii.gz"
        write_nifti(root / rel, np.full((4, 4, 2), i, np.float32), np.eye(4))
        rows.append(dict(sample_id=f"s{i}", subject_id=f"p{i}", label="a", split="train", path=rel,
                         origin="real", sha256=sha256_file(root / rel)))
    write_manifest(root, pd.DataFrame(rows))
    return read_dataset(root)


def test_stage_run_logs_params_metrics_dataset_and_nested_runs(mlflow_store: Path, tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / "smoke.yaml")
    dataset = _dataset(tmp_path / "ds")
    with tracking.stage_run("run", config.experiment_name, params={"name": config.name}) as parent:
        with tracking.stage_run("ingest", config.experiment_name, params=flatten(config.model_dump(mode="json"))) as child:
            child.log_metrics({"images": 3, "skipped": None}, step=0)
            child.log_dataset(dataset, context="output")
            artifact = tmp_path / "note.txt"
            artifact.write_text("hello")
            child.log_artifact(artifact, "notes")
    run = tracking.get_run(child.run_id)
    assert run.data.params["generate.per_class"] == str(config.generate.per_class)
    assert run.data.metrics["images"] == 3.0
    assert "skipped" not in run.data.metrics
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.tags[tracking.STAGE_TAG] == "ingest"
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.digest == dataset.digest[:32]
    tags = {tag.key: tag.value for tag in inputs[0].tags}
    assert tags["mlflow.data.context"] == "output"
    assert tags["sha256"] == dataset.digest
    assert tags["n_images"] == "3"
    # The store really is the temp sqlite file, and artifacts landed beside it.
    assert (mlflow_store / "mlflow.db").stat().st_size > 0
    assert list(mlflow_store.rglob("note.txt"))
    assert {r.info.run_id for r in tracking.list_runs(config.experiment_name)} == {parent.run_id, child.run_id}


def test_null_tracker_accepts_everything(tmp_path: Path) -> None:
    tracker = tracking.NullTracker()
    tracker.log_params({"a": 1})
    tracker.log_metrics({"m": 1.0}, step=1)
    tracker.log_dataset(_dataset(tmp_path), context="training")
    assert tracker.run_id is None
