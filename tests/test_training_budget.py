"""Training budgets: early stops recorded and shown, Ctrl-C resumable, thread choice, CPU-sized defaults.

Everything is real: phantom NIfTI files, tiny real torch training, the real evaluate and export
stages, and a real `medsynth train` subprocess sent SIGINT.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.contracts.model import LOSSES_CSV, LOSSES_PNG, read_losses, read_model_meta, training_record
from pipeline.models.budget import ETA_WARN_SECONDS, SMALL_MODEL_WORK, choose_threads, eta_warning, step_work
from pipeline.models.config import ModelConfig
from test_models import make_phantom_dataset, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("budget") / "real")


# ------------------------------------------------------------------------------------------------
# model.json: the stop record, and files written before it existed
# ------------------------------------------------------------------------------------------------


def test_a_finished_run_is_not_marked_and_its_losses_are_kept_per_step(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train

    summary = train.run(phantom_data, tmp_path / "model", tiny_config(max_steps=5, checkpoint_every=2), seed=0)
    meta = read_model_meta(tmp_path / "model")
    assert (meta.steps, meta.steps_done, meta.steps_planned) == (5, 5, 5)
    assert meta.stopped_early is False and meta.stop_reason is None
    assert summary.stopped_early is False and not any("STOPPED EARLY" in line for line in summary.lines())
    losses = read_losses(tmp_path / "model")
    assert losses["step"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert losses["loss_d"][-1] == pytest.approx(summary.losses["loss_d"], rel=1e-5)
    assert (tmp_path / "model" / LOSSES_PNG).stat().st_size > 0


def test_an_old_model_json_without_the_stop_record_still_reads(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train

    train.run(phantom_data, tmp_path / "model", tiny_config(max_steps=2), seed=0)
    path = tmp_path / "model" / "model.json"
    payload = json.loads(path.read_text())
    for key in ("steps_planned", "stopped_early", "stop_reason"):
        del payload[key]
    path.write_text(json.dumps(payload))
    (tmp_path / "model" / LOSSES_CSV).unlink()
    meta = read_model_meta(tmp_path / "model")
    assert meta.stopped_early is False and meta.stop_reason is None and meta.steps_planned is None
    record = training_record(tmp_path / "model", meta)
    assert record["steps_done"] == 2 and record["loss_curves"] == {} and record["stopped_early"] is False


def test_a_diverged_run_marks_the_kept_checkpoint(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train
    from pipeline.models.train import TrainingDiverged

    # A learning rate this large sends the losses to inf/NaN within a few steps.
    config = tiny_config(max_steps=200, checkpoint_every=1, sample_every=0, lr_d=1e12, lr_g=1e12, r1_gamma=0.0)
    with pytest.raises(TrainingDiverged):
        train.run(phantom_data, tmp_path / "model", config, seed=0)
    meta = read_model_meta(tmp_path / "model")
    assert meta.stopped_early is True and meta.stop_reason.startswith("diverged at step")
    assert f"the checkpoint of step {meta.steps} is kept" in meta.stop_reason
    assert read_losses(tmp_path / "model")["step"][-1] == meta.steps  # the file ends at the kept checkpoint


# ------------------------------------------------------------------------------------------------
# An early stop by the time cap: model.json, report.html and the data card all say so
# ------------------------------------------------------------------------------------------------


def test_time_cap_early_stop_is_recorded_and_shown_in_report_and_card(tmp_path: Path) -> None:
    from pipeline import evaluate, export, ingest
    from pipeline.demo import make_cohort
    from pipeline.evaluate.config import EvaluateConfig
    from pipeline.export.config import ExportConfig
    from pipeline.ingest.config import IngestConfig
    from pipeline.models import generate, train
    from pipeline.models.config import GenerateConfig

    make_cohort(tmp_path / "raw", subjects=8, seed=5)
    ingest.run([tmp_path / "raw" / "dicom", tmp_path / "raw" / "nifti"], tmp_path / "real", IngestConfig(workers=1),
               labels=tmp_path / "raw" / "labels.csv", private=tmp_path / "private")
    config = ModelConfig(image_size=[32, 32], spacing=[10.0, 10.0], max_steps=1000, max_minutes=1e-6, batch_size=8,
                         sample_every=0, log_model=False, device="cpu")
    summary = train.run(tmp_path / "real", tmp_path / "model", config, seed=0)
    assert summary.stopped_by == "max_minutes" and summary.stopped_early is True
    assert summary.lines()[0].startswith("STOPPED EARLY: time budget max_minutes=1e-06 reached")

    meta = read_model_meta(tmp_path / "model")
    assert meta.stopped_early is True and meta.steps_planned == 1000 and 1 <= meta.steps < 1000
    assert meta.stop_reason == f"time budget max_minutes=1e-06 reached at step {meta.steps} of 1000"
    assert len(read_losses(tmp_path / "model")["step"]) == meta.steps

    generate.run(tmp_path / "model", tmp_path / "synthetic", GenerateConfig(per_class=6, seed=3))
    report = evaluate.run(tmp_path / "real", tmp_path / "synthetic", tmp_path / "report", EvaluateConfig(
        classifier_steps=20, bootstrap=20, kid_subsets=5, ms_ssim_pairs=10, min_holdout=2, min_test_subjects=2,
        match_repeats=1, feature_dim=16, num_threads=1,
    ), model_dir=tmp_path / "model")
    training = report["training"]
    assert training["stopped_early"] is True and training["stop_reason"] == meta.stop_reason
    assert (training["steps_done"], training["steps_planned"]) == (meta.steps, 1000)
    assert training["loss_curves"]["step"][-1] == meta.steps
    assert training["sample_grid"]["data_uri"].startswith("data:image/png;base64,")
    html = (tmp_path / "report" / "report.html").read_text()
    assert f"STOPPED EARLY: {meta.stop_reason}." in html
    assert f"{meta.steps} / 1000" in html and "<polyline" in html and training["sample_grid"]["file"] in html

    export.run(tmp_path / "real", tmp_path / "synthetic", tmp_path / "report", tmp_path / "out", ExportConfig(dicom=False),
               model_dir=tmp_path / "model", allow_failed_gates=True)
    card = (tmp_path / "out" / "data_card.md").read_text()
    assert f"**STOPPED EARLY: {meta.stop_reason}.**" in card
    assert f"| steps done / planned | {meta.steps} / 1000 |" in card
    assert "WARNING: the generator stopped early" in card
    facts = json.loads((tmp_path / "out" / "export.json").read_text())
    assert facts["training"]["stopped_early"] is True and "data_uri" not in json.dumps(facts["training"])


# ------------------------------------------------------------------------------------------------
# Ctrl-C: a real `medsynth train` process sent SIGINT leaves a checkpoint that resumes exactly
# ------------------------------------------------------------------------------------------------


def test_ctrl_c_before_the_first_checkpoint_leaves_a_resumable_checkpoint(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train

    model = tmp_path / "model"
    section = {
        "image_size": [32, 32], "spacing": [10.0, 10.0], "latent_dim": 16, "embed_dim": 4, "batch_size": 8,
        "max_steps": 100_000, "checkpoint_every": 50_000, "sample_every": 1, "sample_per_class": 2,
        "log_model": False, "device": "cpu",
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"name": "ctrl-c", "seed": 0, "model": section}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--data", str(phantom_data), "--out", str(model),
         "-c", str(config_file), "--no-progress"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        # sample_every 1: a grid per step shows that training is in its loop, long before step 50,000.
        while not list((model / "samples").glob("step_*.png")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        assert not (model / "checkpoint.pt").exists()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    meta = read_model_meta(model)
    assert (model / "checkpoint.pt").is_file() and meta.steps >= 1
    assert meta.stopped_early is True and meta.stop_reason.startswith(f"interrupted (Ctrl-C) at step {meta.steps}")
    assert read_losses(model)["step"][-1] == meta.steps

    # --resume continues exactly: the same weights as a run that was never interrupted.
    total = meta.steps + 2
    resumed_config = ModelConfig(**{**section, "max_steps": total, "sample_every": 0})
    resumed = train.run(phantom_data, model, resumed_config, seed=0, resume=True)
    straight = train.run(phantom_data, tmp_path / "straight", resumed_config, seed=0)
    assert resumed.weights_digest == straight.weights_digest
    after = read_model_meta(model)
    assert after.stopped_early is False and after.stop_reason is None and after.steps == total
    assert read_losses(model)["step"] == [float(step) for step in range(1, total + 1)]


# ------------------------------------------------------------------------------------------------
# Threads and CPU-sized defaults
# ------------------------------------------------------------------------------------------------


def test_thread_choice_follows_the_model_size_not_the_load() -> None:
    # The CPU-sized recipe the plan gives a 64 x 64 grid on a CPU.
    assert choose_threads(ModelConfig(image_size=[64, 64], batch_size=32)) == 1
    demo = ModelConfig(**yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["model"])
    assert choose_threads(demo) == 1  # auto: the demo's model is small, one thread whatever the machine
    large = ModelConfig(image_size=[128, 128], g_width=32, d_width=32, batch_size=64)
    assert step_work(large) > SMALL_MODEL_WORK and choose_threads(large) is None  # torch's default
    assert choose_threads(ModelConfig(num_threads=3)) == 3
    assert choose_threads(ModelConfig(num_threads=None)) is None
    with pytest.raises(ValueError, match="num_threads"):
        ModelConfig(num_threads=0)


def test_auto_threads_train_on_one_thread_and_model_json_records_it(phantom_data: Path, tmp_path: Path) -> None:
    import torch

    from pipeline.models import train

    outside = torch.get_num_threads()
    summary = train.run(phantom_data, tmp_path / "model", tiny_config(max_steps=2, num_threads="auto"), seed=0)
    assert summary.num_threads == 1 and torch.get_num_threads() == outside
    assert read_model_meta(tmp_path / "model").config["num_threads"] == 1


def test_eta_warnings_name_the_fix() -> None:
    config = ModelConfig(max_steps=100_000, max_minutes=None)
    slow = eta_warning(config, "cpu", steps_done=10, seconds_per_step=0.5, train_seconds=5.0)
    assert slow is not None and "needs about 13.9 h more" in slow and "Fix: fewer steps" in slow
    assert eta_warning(config, "cuda", 10, 0.5, 5.0) is None  # a long GPU run is a plan, not an accident
    assert eta_warning(ModelConfig(), "cpu", 10, 0.05, 0.5) is None
    capped = eta_warning(ModelConfig(max_steps=1200, max_minutes=5.0), "cpu", 10, 1.0, 10.0)
    assert capped is not None and "beyond model.max_minutes=5" in capped and "near step 300" in capped


def test_a_plan_beyond_the_time_cap_warns_while_training(
    phantom_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.models import train

    config = tiny_config(max_steps=10_000_000, max_minutes=0.03, sample_every=0, checkpoint_every=10_000)
    with caplog.at_level(logging.WARNING, logger="pipeline.models.train"):
        summary = train.run(phantom_data, tmp_path / "model", config, seed=0)
    assert summary.stopped_early is True
    assert len(summary.warnings) == 1 and "beyond model.max_minutes=0.03" in summary.warnings[0]
    assert any(summary.warnings[0] in record.getMessage() for record in caplog.records)
    assert f"  warning: {summary.warnings[0]}" in summary.lines()


def test_the_default_recipe_trains_within_an_hour_on_the_cpu(tmp_path: Path) -> None:
    """The default networks on the plan's CPU batch at 64 x 64: the measured step time x the most steps the plan gives is under an hour."""
    from pipeline.models import train
    from pipeline.planning.plan import MAX_STEPS

    data = make_phantom_dataset(tmp_path / "real")
    defaults = ModelConfig()
    measured = ModelConfig(
        spatial_dims=2, image_size=[64, 64], spacing=[5.0, 5.0], intensity="ct", window=[-160.0, 240.0],
        batch_size=32, augment="ada", max_steps=12, max_minutes=None, device="cpu", sample_every=0,
        log_model=False, guards="off",
    )
    assert (measured.g_width, measured.d_width, measured.latent_dim) == (defaults.g_width, defaults.d_width, defaults.latent_dim)
    summary = train.run(data, tmp_path / "model", measured, seed=0)
    eta = summary.seconds_per_step * MAX_STEPS
    assert 0 < eta < ETA_WARN_SECONDS, f"default recipe: {summary.seconds_per_step:.3f} s/step -> {eta / 60:.0f} min"
    assert eta_warning(measured.model_copy(update={"max_steps": MAX_STEPS}), "cpu", 0, summary.seconds_per_step, 0.0) is None


# ------------------------------------------------------------------------------------------------
# medsynth run: an early-stopped model stops the run (exit 1) unless accepted, and is never skipped
# ------------------------------------------------------------------------------------------------


def test_run_refuses_an_early_stopped_model_unless_accepted_and_never_skips_it(tmp_path: Path) -> None:
    from pipeline.demo import make_cohort

    root = tmp_path / "run"
    make_cohort(root / "raw", subjects=12, seed=5)
    config = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    config.update(run_root=str(root), sources=[str(root / "raw" / "dicom"), str(root / "raw" / "nifti")],
                  labels=str(root / "raw" / "labels.csv"))
    config.setdefault("model", {}).update(max_steps=100_000, max_minutes=0.01)
    config_path = tmp_path / "capped.yaml"
    config_path.write_text(yaml.safe_dump(config))
    environment = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", "run", "-c", str(config_path), "--no-progress", *extra],
                              cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)

    first = run()
    assert first.returncode == 1, first.stderr[-2000:]
    assert "stopped early" in first.stderr and "accept_early_stop" in first.stderr and "Traceback" not in first.stderr
    assert read_model_meta(root / "model").stopped_early
    assert not (root / "synthetic").exists()  # nothing downstream was built on the short model
    record = json.loads((root / "stages.json").read_text())
    assert record["stages"]["train"]["finished"] is False

    second = run()  # same inputs: train is not skipped (it resumes, and stops short again)
    assert second.returncode == 1 and "[train] unchanged" not in second.stdout

    accepted = run("--accept-early-stop")
    assert "stopped early" not in accepted.stderr.lower() or accepted.returncode != 1
    assert (root / "synthetic" / "manifest.csv").is_file(), accepted.stderr[-2000:]
    report = json.loads((root / "report" / "report.json").read_text())
    assert report["training"]["stopped_early"] is True  # the report shows what was accepted
