"""`medsynth evaluate`: exit codes, MLflow lineage and metrics; small-data nulls; user extractors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.core.errors import InputError
from pipeline.evaluate import run
from pipeline.evaluate.config import EvaluateConfig
from _controlled import make_real_dataset, make_synthetic_dataset

FAST = {
    "classifier_steps": 60,
    "classifier_batch_size": 32,
    "utility_seeds": 1,
    "bootstrap": 100,
    "kid_subsets": 5,
    "ms_ssim_pairs": 20,
    "match_repeats": 1,
    "num_threads": 1,
}


def _evaluate(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code)


def test_cli_reports_gates_exit_codes_and_mlflow_lineage(
    mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.contracts.dataset import read_dataset
    from pipeline.tracking import get_run, list_runs

    real = make_real_dataset(
        mlflow_store / "real", per_class=12, size=32, slices=3, seed=0, fractions=(0.5, 0.25, 0.25)
    )
    synthetic = make_synthetic_dataset(mlflow_store / "synthetic", real, "noisy_copies", seed=1)
    config = mlflow_store / "evaluate.yaml"
    config.write_text(yaml.safe_dump({"name": "evaltest", "evaluate": {**FAST, "seed": 7}}), encoding="utf-8")
    argv = [
        "evaluate",
        "--real",
        str(real.root),
        "--synthetic",
        str(synthetic.root),
        "-c",
        str(config),
        "--no-progress",
    ]

    # A failed gate: the report is written and the command exits 1; --report-only leaves the verdict to the reader.
    assert _evaluate([*argv, "--out", str(mlflow_store / "report"), "--report-only"]) == 0
    out = capsys.readouterr().out
    assert "privacy FAIL" in out and "memorization_rate 1" in out
    assert _evaluate([*argv, "--out", str(mlflow_store / "strict")]) == 1
    assert "gate(s) failed: privacy" in capsys.readouterr().err
    assert (mlflow_store / "strict" / "report.html").is_file()

    report = json.loads((mlflow_store / "strict" / "report.json").read_text())
    # Slices of 3-slice volumes: ids carry the slice, counts are per slice.
    assert report["inputs"]["real"]["images"] == 3 * report["inputs"]["real"]["files"]
    assert all("#z" in entry["nearest_train_sample_id"] for entry in report["privacy"]["flagged"])
    # Export re-measures distances with the evaluate stage's own seed stream and preprocessing, so it
    # finds the same nearest training image at the same distance (up to float32 rounding: these
    # near-copies lie ~0.005 apart on a [-1, 1] scale, where the order of a float32 sum shows).
    from pipeline.export.privacy import measured_distances

    measured = measured_distances(real, synthetic, None, report, mlflow_store / "strict" / "report.json")
    assert len(measured) == len(synthetic.manifest)
    for entry in report["privacy"]["flagged"]:
        distance, nearest = measured[entry["sample_id"]]
        assert nearest == entry["nearest_train_sample_id"] and distance == pytest.approx(entry["distance"], rel=0.05)
    runs = list_runs("evaltest")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    run_entity = get_run(report["mlflow"]["run_id"])
    metrics = run_entity.data.metrics
    for key in (
        "fid",
        "kid",
        "precision",
        "recall",
        "density",
        "coverage",
        "ms_ssim",
        "memorization_rate",
        "dcr_synthetic_to_train",
        "dcr_holdout_to_train",
        "mia_auc",
        "synthetic_label_accuracy",
    ):
        assert metrics[key] == pytest.approx(_headline(report, key)), key
    assert run_entity.data.tags["gate.privacy"] == "fail"
    assert run_entity.data.params["evaluate.classifier_steps"] == "60"
    inputs = {i.dataset.digest: i for i in run_entity.inputs.dataset_inputs}
    assert set(inputs) == {read_dataset(real.root).digest[:32], read_dataset(synthetic.root).digest[:32]}
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run_entity.info.run_id, "report")}
    assert artifacts == {"report/report.html", "report/report.json"}
    found = client.search_runs([run_entity.info.experiment_id], "metrics.mia_auc > 0.6")
    assert {r.info.run_id for r in found} == {r.info.run_id for r in runs}


def _headline(report: dict, key: str) -> float:
    for section in ("fidelity", "diversity", "privacy", "utility"):
        if key in report[section]:
            return report[section][key]
    raise KeyError(key)


def test_too_few_held_out_images_give_nulls_with_reasons(tmp_path: Path) -> None:
    real = make_real_dataset(tmp_path / "real", per_class=8, size=32, seed=0, fractions=(0.75, 0.125, 0.125))
    synthetic = make_synthetic_dataset(tmp_path / "synthetic", real, "independent", per_class=8, seed=1)
    report = run(real.root, synthetic.root, tmp_path / "report", EvaluateConfig(**FAST))
    privacy = report["privacy"]
    assert privacy["n_holdout"] == 4
    for key in ("memorization_rate", "dcr_holdout_to_train", "mia_auc"):
        assert privacy[key] is None
        assert "held-out" in privacy[f"{key}_reason"] and "min_holdout" in privacy[f"{key}_reason"]
    assert report["gates"]["privacy"] == "not_run" == privacy["gate"]
    assert report["gates"]["fidelity"] == "not_run"
    assert report["fidelity"]["fid"] is not None  # synthetic vs train still measured
    assert report["fidelity"]["reference"]["fid"] is None and report["fidelity"]["reference"]["fid_reason"]
    assert (
        report["utility"]["augmentation_gain"] is None and "test split" in report["utility"]["augmentation_gain_reason"]
    )
    html = (tmp_path / "report" / "report.html").read_text()
    assert "NOT_RUN" in html and "min_holdout" in html


def test_a_user_supplied_torchscript_extractor_becomes_the_headline_space(tmp_path: Path) -> None:
    class Extractor(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            pooled = torch.nn.functional.avg_pool2d(images, 4)
            return pooled.flatten(1)

    weights = tmp_path / "extractor.pt"
    torch.jit.save(torch.jit.script(Extractor()), str(weights))
    real = make_real_dataset(tmp_path / "real", per_class=16, size=32, seed=0, fractions=(0.5, 0.25, 0.25))
    synthetic = make_synthetic_dataset(tmp_path / "synthetic", real, "white_noise", per_class=10, seed=1)
    report = run(real.root, synthetic.root, tmp_path / "report", EvaluateConfig(**FAST, feature_weights=weights))
    assert report["fidelity"]["feature_space"] == "user:extractor.pt"
    assert list(report["feature_spaces"]) == ["user:extractor.pt", "trained-cnn", "random-cnn"]
    assert "64-d" in report["feature_spaces"]["user:extractor.pt"]
    assert set(report["fidelity"]["cross_checks"]) == {"trained-cnn", "random-cnn"}
    assert report["gates"]["fidelity"] == "fail"

    not_torchscript = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, not_torchscript)
    with pytest.raises(InputError, match="evaluate.feature_weights"):
        run(real.root, synthetic.root, tmp_path / "again", EvaluateConfig(**FAST, feature_weights=not_torchscript))


def test_config_refuses_a_missing_weights_file_and_bad_thresholds(tmp_path: Path) -> None:
    from pipeline.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {"feature_weights": str(tmp_path / "none.pt")}}), encoding="utf-8")
    with pytest.raises(InputError, match="evaluate.feature_weights"):
        load_config(path)
    path.write_text(yaml.safe_dump({"evaluate": {"gates": {"max_mia_auc": 0.3}}}), encoding="utf-8")
    with pytest.raises(InputError, match="evaluate.gates.max_mia_auc"):
        load_config(path)
