"""Fingerprint and plan: each demo family, the issue's 0..1000 ring family, explicit keys, the CLI, train with auto.

Everything is real: cohorts written by ``pipeline.demo`` and ingested by ``pipeline.ingest``, hand-made
NIfTI cohorts, a real MLflow sqlite store, a few steps of real training.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _plan_cohorts import ring_cohort
from pipeline.imaging.levels import network_levels
from pipeline.models.config import ModelConfig
from pipeline.planning.record import PLAN_JSON, PREPROCESSED_PNG
from pipeline.planning.stage import plan_training


def _divisible(size: list[int]) -> bool:
    step = 2 ** network_levels(size)
    return all(side % step == 0 for side in size)


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ring_cohort(tmp_path_factory.mktemp("ring") / "data", subjects=24)


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three demo families, 12 subjects each, ingested."""
    from pipeline import ingest
    from pipeline.demo import make_cohort
    from pipeline.ingest.config import IngestConfig

    out = {}
    for family in ("ct-abdomen", "mr-brain", "xray-chest"):
        root = tmp_path_factory.mktemp(family)
        make_cohort(root / "raw", subjects=12, seed=0, family=family)
        sources = [path for path in (root / "raw" / "dicom", root / "raw" / "nifti") if path.is_dir()]
        ingest.run(sources, root / "ingested", IngestConfig(workers=1), labels=root / "raw" / "labels.csv",
                   private=root / "private", seed=0)
        out[family] = root / "ingested"
    return out


def test_plan_on_each_family(families: dict[str, Path]) -> None:
    plans = {family: plan_training(path, ModelConfig(device="cpu")) for family, path in families.items()}
    for family, result in plans.items():
        config, fp = result.config, result.plan.fingerprint
        assert config.auto_keys == ["max_steps"], family  # convergence: the train stage's stopping rule
        assert config.spatial_dims == 2, family
        assert max(config.image_size) <= 64 and _divisible(config.image_size), (family, config.image_size)
        native = min(fp.spacing[0]["median"], fp.spacing[1]["median"])
        assert config.spacing[0] >= native, family  # never finer than the data
        # The grid covers the foreground field of view: the body fills most of the canvas, none is cut.
        guards = {guard.name: guard for guard in result.guards.guards}
        assert guards["canvas"].status == "pass" and guards["canvas"].value > 0.6, (family, guards["canvas"])
        assert guards["cut_off"].status == "pass" and guards["cut_off"].value < 0.05, family
        assert guards["clipping"].status == "pass", family
        assert all(item.reason for item in result.plan.values.values())
    ct, mr, xray = plans["ct-abdomen"], plans["mr-brain"], plans["xray-chest"]
    assert ct.config.intensity == "ct" and ct.config.augment == ["translation", "cutout"]
    low, high = ct.config.window
    # Fat (about -100 HU) to liver (about 60 HU) inside the window, and narrower than the foreground's
    # [0.5, 99.5] HU percentiles, whose gas and bone tails would halve the soft-tissue contrast.
    intensity = ct.plan.fingerprint.intensity
    assert -400 < low < -100 and 60 < high < 400, (low, high)
    assert high - low < 0.75 * (intensity["p99.5"] - intensity["p0.5"]), (low, high, intensity)
    assert mr.plan.fingerprint.modality == "MR" and mr.config.intensity == "mr"
    assert "brightness" in mr.config.augment
    assert xray.plan.fingerprint.single_frame == 1.0 and xray.config.intensity == "mr"
    assert "single-frame" in xray.plan.values["spatial_dims"].reason


def test_plan_on_the_ring_family_picks_its_size_spacing_and_intensity(ring: Path, tmp_path: Path) -> None:
    result = plan_training(ring, ModelConfig(device="cpu"))
    config, fp = result.config, result.plan.fingerprint
    assert fp.modality == "" and not fp.is_ct  # 0..1000 without a modality: no HU air, no absolute scale
    assert config.spacing == [1.0, 1.0] and config.image_size == [64, 64]  # native 1 mm, 64 mm field of view
    assert config.intensity == "mr" and config.percentiles == [0.5, 99.5]
    assert config.max_steps == "auto" and 5.0 <= config.max_minutes <= 30.0 and config.batch_size <= 32
    assert [guard.status for guard in result.guards.guards[:3]] == ["pass", "pass", "pass"]
    assert result.guards.guards[3].status in ("pass", "not_run")

    # The same cohort as 2D (x, y) NIfTI files, the shape a single-frame X-ray is ingested as.
    flat = ring_cohort(tmp_path / "flat", subjects=12, two_d=True)
    flat_result = plan_training(flat, ModelConfig(device="cpu"))
    assert flat_result.config.image_size == [64, 64] and flat_result.plan.fingerprint.single_frame == 1.0


def test_explicit_keys_win_and_are_marked(ring: Path) -> None:
    result = plan_training(ring, ModelConfig(device="cpu", spacing=[2.0, 2.0], batch_size=8, max_steps=50))
    values = result.plan.values
    assert values["spacing"].source == "config" and result.config.spacing == [2.0, 2.0]
    assert values["image_size"].source == "plan" and result.config.image_size == [32, 32]  # 58 mm at 2 mm
    assert result.config.batch_size == 8 and result.config.max_steps == 50
    assert values["intensity"].source == "plan"
    # A given grid and auto spacing: the spacing fits the field of view into it.
    fitted = plan_training(ring, ModelConfig(device="cpu", image_size=[32, 32]))
    assert fitted.plan.values["spacing"].source == "plan" and 1.7 <= fitted.config.spacing[0] <= 2.0


def test_plan_cli_writes_the_plan_and_exits_2_on_a_fired_guard(ring: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "plan", "--data", str(ring), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "image_size" in done.stdout and "Preprocessing guards" in done.stdout
    document = json.loads(out.read_text())
    assert document["plan"]["image_size"]["value"] == [64, 64] and document["plan"]["image_size"]["reason"]
    assert document["fingerprint"]["n_subjects"] > 0

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  spacing: [5.0, 5.0]\n  image_size: [64, 48]\n  intensity: ct\n  window: [-160, 240]\n")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "plan", "--data", str(ring), "-c", str(bad)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "model.spacing" in done.stderr and "model.intensity" in done.stderr


def test_train_with_auto_writes_the_plan_beside_the_model(ring: Path, tmp_path: Path, mlflow_store: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.contracts.model import read_model_meta
    from pipeline.models import train

    config = ModelConfig(
        latent_dim=16, embed_dim=4, max_steps=3, checkpoint_every=3, sample_every=0, sample_per_class=2,
        num_threads=1, device="cpu", log_model=False, select_every=0,
    )
    model_dir = tmp_path / "model"
    with tracking.stage_run("train", "medsynth-test") as tracker:
        train.run(ring, model_dir, config, seed=0, tracker=tracker)
    assert (model_dir / PLAN_JSON).is_file() and (model_dir / PREPROCESSED_PNG).is_file()
    meta = read_model_meta(model_dir)
    plan = json.loads((model_dir / PLAN_JSON).read_text())
    assert meta.config["image_size"] == plan["plan"]["image_size"]["value"] == [64, 64]
    assert meta.preprocess["intensity"] == "mr"
    run = MlflowClient().get_run(tracker.run_id)
    assert run.data.params["plan.source.image_size"] == "plan"
    assert run.data.params["model.image_size"] == "[64, 64]"  # the planned value, not `auto`
    artifacts = {item.path for item in MlflowClient().list_artifacts(tracker.run_id, "plan")}
    assert {"plan/plan.json", "plan/preprocessed.png"} <= artifacts
