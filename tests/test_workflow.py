"""End to end: `medsynth run -c smoke` on a phantom cohort, with a real MLflow store.

Checks what the exported dataset promises (synthetic only in train, excluded samples absent, a card that
holds the report's numbers), the MLflow lineage (parent run, one nested run per stage, dataset inputs and
outputs), that no planted PHI value appears anywhere outside raw/ and private/ — MLflow store and console
included — and that a second run skips every unchanged stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import scan_for_markers
from pipeline.demo import make_cohort

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path):
    import shutil

    work = tmp_path_factory.mktemp("e2e")
    shutil.copy(_migrated_store, work / "mlflow.db")
    root = work / "runs" / "smoke"
    cohort = make_cohort(root / "raw", subjects=12, seed=5)
    config = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    config.update(run_root=str(root), sources=[str(root / "raw" / "dicom"), str(root / "raw" / "nifti")],
                  labels=str(root / "raw" / "labels.csv"))
    config_path = work / "smoke.yaml"
    config_path.write_text(yaml.safe_dump(config))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    try:
        first = _run(["run", "-c", str(config_path), "--no-progress"], cwd=work)
        second = _run(["run", "-c", str(config_path), "--no-progress"], cwd=work)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return dict(work=work, root=root, cohort=cohort, first=first, second=second, uri=f"sqlite:///{work / 'mlflow.db'}")


def test_run_succeeds_and_prints_where_things_are(smoke_run) -> None:
    first = smoke_run["first"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    assert "medsynth ui" in first.stdout and smoke_run["uri"] in first.stdout
    assert "data_card.md" in first.stdout and "report.html" in first.stdout


def test_exported_dataset_keeps_synthetic_in_train_and_drops_excluded(smoke_run) -> None:
    export = smoke_run["root"] / "export"
    manifest = pd.read_csv(export / "manifest.csv", dtype=str, keep_default_na=False)
    assert set(manifest["origin"]) == {"real", "synthetic"}
    assert set(manifest.loc[manifest["origin"] == "synthetic", "split"]) == {"train"}
    assert {"val", "test"} <= set(manifest.loc[manifest["origin"] == "real", "split"])
    excluded = pd.read_csv(export / "excluded.csv", dtype=str, keep_default_na=False)
    assert not set(excluded.get("sample_id", [])) & set(manifest["sample_id"])
    synthetic = manifest[manifest["origin"] == "synthetic"]
    assert synthetic["generator_run_id"].str.len().min() > 0


def test_data_card_has_every_section_and_the_reports_numbers(smoke_run) -> None:
    card = (smoke_run["root"] / "export" / "data_card.md").read_text()
    report = json.loads((smoke_run["root"] / "report" / "report.json").read_text())
    assert card.startswith("---\n")
    for heading in ("Provenance", "Composition", "Generation", "Fidelity", "Privacy", "Utility", "Intended use",
                    "Limitations", "reproduce"):
        assert heading.lower() in card.lower(), heading
    for section, key in (("privacy", "memorization_rate"), ("privacy", "mia_auc"), ("fidelity", "fid")):
        value = report[section][key]
        if isinstance(value, float):
            assert f"{value:.3f}" in card or f"{value:.3g}" in card or f"{value:.4f}" in card, (section, key, value)
    assert report["privacy"]["gate"] == report["gates"]["privacy"]


def test_mlflow_holds_parent_and_nested_stage_runs_with_lineage(smoke_run) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(smoke_run["uri"])
    try:
        client = MlflowClient()
        experiment = client.get_experiment_by_name("smoke")
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        parents = [r for r in runs if r.data.tags.get("medsynth.stage") == "run"]
        assert len(parents) == 2  # two `medsynth run` invocations
        first_parent = min(parents, key=lambda r: r.info.start_time)
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first_parent.info.run_id]
        stages = {r.data.tags["medsynth.stage"]: r for r in children}
        assert set(stages) == {"ingest", "train", "generate", "evaluate", "export"}
        contexts = {
            stage: {t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
            for stage, run in stages.items()
        }
        assert "output" in contexts["ingest"]
        assert "output" in contexts["export"] and len(stages["export"].inputs.dataset_inputs) >= 3
        assert stages["train"].data.params  # the resolved config
        assert "mia_auc" in stages["evaluate"].data.metrics and "mia_auc" in first_parent.data.metrics
        # The parent run alone answers "did it pass, and where is the evidence".
        report = json.loads((smoke_run["root"] / "report" / "report.json").read_text())
        for gate in ("fidelity", "diversity", "privacy", "utility"):
            assert first_parent.data.tags[f"gate.{gate}"] == report["gates"][gate]
        logged = {f.path for folder in ("report", "export") for f in client.list_artifacts(first_parent.info.run_id, folder)}
        assert {"report/report.json", "report/report.html", "export/data_card.md"} <= logged
    finally:
        mlflow.set_tracking_uri(None)


def test_no_planted_phi_outside_raw_and_private(smoke_run) -> None:
    markers = smoke_run["cohort"].planted_phi
    root, work = smoke_run["root"], smoke_run["work"]
    findings = []
    for child in root.iterdir():
        if child.name in ("raw", "private"):
            continue
        findings += scan_for_markers(child, markers) if child.is_dir() else []
    findings += scan_for_markers(work / "mlruns", markers) if (work / "mlruns").exists() else []
    db = (work / "mlflow.db").read_bytes().lower()
    findings += [("mlflow.db", m) for m in markers if m.lower().encode() in db]
    console = (smoke_run["first"].stdout + smoke_run["first"].stderr).lower()
    findings += [("console", m) for m in markers if m.lower() in console]
    assert findings == []


def test_second_run_skips_unchanged_stages(smoke_run) -> None:
    second = smoke_run["second"]
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("unchanged") >= 5


def test_a_run_whose_gates_did_not_all_pass_exits_1_unless_accepted(smoke_run) -> None:
    """The smoke run's gates do not all pass (12 subjects): without the smoke config's allowance, exit 1."""
    work = smoke_run["work"]
    report = json.loads((smoke_run["root"] / "report" / "report.json").read_text())
    assert any(report["gates"][gate] != "pass" for gate in ("fidelity", "diversity", "privacy", "utility"))
    config = yaml.safe_load((work / "smoke.yaml").read_text())
    config.setdefault("export", {}).update(allow_failed_gates=False, accept_inconclusive=False)
    strict = work / "strict.yaml"
    strict.write_text(yaml.safe_dump(config))
    os.environ["MLFLOW_TRACKING_URI"] = smoke_run["uri"]
    try:
        result = _run(["run", "-c", str(strict), "--no-progress"], cwd=work)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "gate" in result.stderr and "Fix:" in result.stderr
