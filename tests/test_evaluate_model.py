"""`evaluate --model`: the model's preprocessing, the white-box (discriminator) attack, the DP record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.evaluate import run
from pipeline.evaluate.config import EvaluateConfig, GateThresholds
from _controlled import make_real_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.models import generate, train
    from pipeline.models.config import GenerateConfig, ModelConfig

    root = tmp_path_factory.mktemp("evaluate-model")
    make_real_dataset(root / "real", per_class=16, size=32, seed=0, fractions=(0.5, 0.25, 0.25))
    train.run(
        root / "real",
        root / "model",
        ModelConfig(
            image_size=[32, 32],
            spacing=[1.0, 1.0],
            window=[-200.0, 200.0],
            max_steps=15,
            batch_size=16,
            g_width=8,
            d_width=8,
            latent_dim=16,
            sample_every=0,
            log_model=False,
            checkpoint_every=100,
            num_threads=1,
        ),
        seed=0,
    )
    generate.run(root / "model", root / "synthetic", GenerateConfig(per_class=12, seed=3))
    return root


def test_model_preprocessing_whitebox_attack_and_dp_record(trained: Path) -> None:
    model_json = trained / "model" / "model.json"
    meta = json.loads(model_json.read_text())
    assert meta["dp"] is None
    config = EvaluateConfig(
        classifier_steps=40,
        utility_seeds=1,
        bootstrap=100,
        kid_subsets=5,
        ms_ssim_pairs=10,
        match_repeats=1,
        num_threads=1,
    )
    report = run(trained / "real", trained / "synthetic", trained / "report", config, model_dir=trained / "model")
    assert report["preprocessing"]["kind"] == "model"
    assert report["preprocessing"]["spec"] == meta["preprocess"]
    attacks = report["privacy"]["mia_attacks"]
    assert {"blackbox_pixel", "whitebox_discriminator"} <= set(attacks)
    assert attacks["whitebox_discriminator"]["gated"] is True
    assert report["privacy"]["mia_auc"] == max(a["auc"] for a in attacks.values() if a["gated"])
    assert report["privacy"]["epsilon"] is None
    assert report["privacy"]["epsilon_reason"] == "the model was trained without differential privacy"
    assert report["inputs"]["model"]["train_dataset_matches_real"] is True
    assert report["mlflow"]["model_run_id"] == meta["mlflow_run_id"]

    # A DP-trained model's accountant figures are reported and, with max_epsilon set, gated.
    meta["dp"] = {"epsilon": 3.5, "delta": 1e-5}
    model_json.write_text(json.dumps(meta))
    strict = config.model_copy(update={"gates": GateThresholds(max_epsilon=1.0)})
    report = run(trained / "real", trained / "synthetic", trained / "report-dp", strict, model_dir=trained / "model")
    assert report["privacy"]["epsilon"] == 3.5 and report["privacy"]["delta"] == 1e-5
    checks = {check["name"]: check for check in report["gates"]["checks"]["privacy"]}
    assert checks["epsilon"]["passed"] is False and checks["epsilon"]["threshold"] == 1.0
    assert report["gates"]["privacy"] == "fail"
