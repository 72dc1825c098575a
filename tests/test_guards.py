"""Preprocessing guards: each fires on a crafted bad config and stays quiet on good ones.

The bad configs are the issue's failing example (the CT demo's 5 mm grid and HU window on a 0..1000
family of 64 x 64 slices at 1 mm) and a grid that cuts the anatomy off; the good ones are the plan's.
Real NIfTI cohorts, real preprocessing, a real sklearn probe, real (tiny) training.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from _plan_cohorts import ring_cohort
from pipeline.core.errors import InputError
from pipeline.models.config import ModelConfig
from pipeline.planning.record import PLAN_JSON, PREPROCESSED_PNG, plan_lines, plan_record
from pipeline.planning.stage import plan_training, prepare_training

# The CT demo's recipe (configs/demo.yaml), as a new user would try it on another family.
DEMO_RECIPE = dict(spatial_dims=2, image_size=[64, 48], spacing=[5.0, 5.0], intensity="ct", window=[-160.0, 240.0])


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ring_cohort(tmp_path_factory.mktemp("ring") / "data", subjects=40)


def _status(result) -> dict[str, str]:
    return {guard.name: guard.status for guard in result.guards.guards}


def test_the_demo_recipe_on_the_ring_family_fires_clipping_canvas_and_class_signal(ring: Path) -> None:
    result = plan_training(ring, ModelConfig(device="cpu", **DEMO_RECIPE))
    status = _status(result)
    assert status["clipping"] == "fail"  # 0..1000 through a -160..240 HU window: all tissue saturates
    assert status["canvas"] == "fail"  # a 64 mm field of view in 5 mm pixels: ~13 pixels
    assert status["class_signal"] == "fail"  # the ring separates the source images, not the preprocessed ones
    assert result.guards.probe["source"] >= 0.75 and result.guards.probe["preprocessed"] < 0.7
    message = result.failure()
    assert "model.intensity" in message and "model.spacing" in message


def test_each_guard_alone(ring: Path) -> None:
    # Only the window is wrong: clipping fires, the canvas is fine.
    window_only = _status(plan_training(ring, ModelConfig(device="cpu", intensity="ct", window=[-160.0, 240.0])))
    assert window_only["clipping"] == "fail" and window_only["canvas"] == "pass" and window_only["cut_off"] == "pass"
    # Only the spacing is wrong: the canvas guard fires, intensities are fine.
    coarse = _status(plan_training(ring, ModelConfig(device="cpu", spacing=[5.0, 5.0], image_size=[64, 48])))
    assert coarse["canvas"] == "fail" and coarse["clipping"] == "pass"
    # A grid smaller than the field of view cuts the anatomy off.
    cut = plan_training(ring, ModelConfig(device="cpu", spacing=[1.0, 1.0], image_size=[32, 32]))
    assert _status(cut)["cut_off"] == "fail" and cut.guards.guards[2].value > 0.3
    # Percentiles that saturate the foreground.
    narrow = _status(plan_training(ring, ModelConfig(device="cpu", percentiles=[60.0, 70.0])))
    assert narrow["clipping"] == "fail"


def test_guards_stay_quiet_on_the_plan(ring: Path, tmp_path: Path) -> None:
    result = plan_training(ring, ModelConfig(device="cpu"))
    assert result.failure() is None
    assert set(_status(result).values()) <= {"pass", "not_run"}
    flat = plan_training(ring_cohort(tmp_path / "flat", subjects=16, two_d=True), ModelConfig(device="cpu"))
    assert flat.failure() is None


def test_train_stops_with_the_fix_or_warns_as_asked(ring: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(InputError, match="model.spacing"):
        prepare_training(ring, out, ModelConfig(device="cpu", **DEMO_RECIPE))
    # The plan and the grid are written first, so the user can look at what went wrong.
    assert (out / PLAN_JSON).is_file() and (out / PREPROCESSED_PNG).is_file()
    record = plan_record(out)  # what report.html and the data card show
    assert {row["key"]: row["source"] for row in record["rows"]}["spacing"] == "config"
    assert {guard["name"]: guard["status"] for guard in record["guards"]}["canvas"] == "fail"
    assert record["grid"]["data_uri"].startswith("data:image/png;base64,")
    resolved = prepare_training(ring, tmp_path / "warned", ModelConfig(device="cpu", guards="warn", **DEMO_RECIPE))
    assert resolved.spacing == [5.0, 5.0] and resolved.auto_keys == ["max_steps"]
    assert any("fired" in line for line in plan_lines(tmp_path / "warned"))
    skipped = prepare_training(ring, tmp_path / "off", ModelConfig(device="cpu", guards="off", **DEMO_RECIPE))
    assert skipped.window == [-160.0, 240.0]


def test_cli_train_exits_2_before_training(ring: Path, tmp_path: Path) -> None:
    config = tmp_path / "demo-recipe.yaml"
    config.write_text(
        "model:\n  spatial_dims: 2\n  image_size: [64, 48]\n  spacing: [5.0, 5.0]\n  intensity: ct\n"
        "  window: [-160, 240]\n  device: cpu\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--data", str(ring), "--out", str(tmp_path / "model"),
         "-c", str(config), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )
    assert done.returncode == 2, done.stderr
    assert "preprocessing guard(s) fired" in done.stderr and "model.guards: warn" in done.stderr
    assert not (tmp_path / "model" / "checkpoint.pt").exists()
