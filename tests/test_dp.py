"""Differentially private training: the account, resume, the budget stop, the record downstream, the canary audit.

Everything is real: phantom NIfTI files, tiny real torch training with Opacus' DPOptimizer and
accountants, the real evaluate and export stages, and canary subjects inserted into training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.contracts.model import read_model_meta
from pipeline.core.errors import InputError
from pipeline.models.config import DPConfig, ModelConfig
from test_models import make_phantom_dataset, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("dp") / "real", subjects=10)


def dp_config(**changes) -> ModelConfig:
    dp = DPConfig(**{"epsilon": 10.0, "subjects_per_step": 2, "slices_per_subject": 2, **changes.pop("dp", {})})
    return tiny_config(dp=dp, r1_every=3, sample_every=0, **changes)


def test_the_accounted_epsilon_is_opacus_own_for_the_same_run(phantom_data: Path, tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from pipeline.models import train

    summary = train.run(phantom_data, tmp_path / "model", dp_config(max_steps=5), seed=0)
    dp = read_model_meta(tmp_path / "model").dp
    # The phantom set's train split holds 4 subjects: sample rate 2 / 4, delta auto 1 / (10 x 4).
    assert (dp["n_subjects"], dp["sample_rate"], dp["delta"], dp["steps"]) == (4, 0.5, 0.025, 5)
    assert dp["privacy_unit"] == "subject" and dp["accountant"] == "rdp" and dp["budget_exhausted"] is False
    # Opacus' own accountant, and its RDP analysis called directly, for (q, sigma, steps, delta).
    accountant = RDPAccountant()
    for _ in range(5):
        accountant.step(noise_multiplier=dp["noise_multiplier"], sample_rate=0.5)
    assert dp["epsilon"] == pytest.approx(accountant.get_epsilon(delta=0.025), abs=1e-5)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=0.5, noise_multiplier=dp["noise_multiplier"], steps=5, orders=orders)
    assert dp["epsilon"] == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp, delta=0.025)[0], abs=1e-5)
    # The noise was calibrated so that the planned steps spend the target, not more.
    assert 9.5 <= dp["epsilon"] <= 10.0
    assert summary.privacy is not None and "per subject" in summary.privacy


def test_the_spent_epsilon_is_logged_to_mlflow(mlflow_store: Path, phantom_data: Path, tmp_path: Path) -> None:
    from pipeline import tracking
    from pipeline.models import train

    public = make_phantom_dataset(tmp_path / "public", subjects=6, seed=4)
    train.run(public, tmp_path / "public_model", tiny_config(max_steps=1, sample_every=0), seed=0)
    start = str(tmp_path / "public_model")
    with tracking.stage_run("train", "dp-test") as tracker:
        config = dp_config(max_steps=2, log_model=False, init_from=start)
        train.run(phantom_data, tmp_path / "model", config, seed=0, tracker=tracker)
    dp = read_model_meta(tmp_path / "model").dp
    run = tracking.get_run(tracker.run_id)
    assert run.data.metrics["dp_epsilon"] == pytest.approx(dp["epsilon"], abs=1e-5)
    assert run.data.metrics["dp_delta"] == pytest.approx(dp["delta"])
    assert run.data.metrics["epsilon"] == pytest.approx(dp["epsilon"], abs=1e-5)  # the per-step curve's last point
    assert run.data.params["model.dp.epsilon"] == "10.0" and run.data.params["model.dp.accountant"] == "rdp"
    # The start's folder could name a site or a person: MLflow says only that there was one.
    assert run.data.params["model.init_from.given"] == "True"
    assert not any(start in value for value in run.data.params.values())


def test_resume_continues_the_same_account_and_weights(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train
    from pipeline.models.dp import epsilon_of

    def config(steps: int, noise: float) -> ModelConfig:
        return dp_config(max_steps=steps, checkpoint_every=1, dp={"epsilon": 50.0, "noise_multiplier": noise})

    # Two sessions with different noise: the account holds both phases and composes them.
    train.run(phantom_data, tmp_path / "two", config(2, 1.0), seed=0)
    state = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert state["dp"]["history"] == [[1.0, 0.5, 2]]
    train.run(phantom_data, tmp_path / "two", config(4, 1.5), seed=0, resume=True)
    two = read_model_meta(tmp_path / "two").dp
    assert two["history"] == [[1.0, 0.5, 2.0], [1.5, 0.5, 2.0]] and two["steps"] == 4
    assert two["epsilon"] == pytest.approx(epsilon_of([(1.0, 0.5, 2), (1.5, 0.5, 2)], two["delta"], "rdp"), abs=1e-6)

    # The same config resumed: the same account and bit-identical weights as a run never interrupted.
    straight = train.run(phantom_data, tmp_path / "straight", config(4, 1.5), seed=0)
    train.run(phantom_data, tmp_path / "resumed", config(2, 1.5), seed=0)
    resumed = train.run(phantom_data, tmp_path / "resumed", config(4, 1.5), seed=0, resume=True)
    assert resumed.start_step == 2 and resumed.weights_digest == straight.weights_digest
    assert read_model_meta(tmp_path / "resumed").dp == read_model_meta(tmp_path / "straight").dp
    assert two["epsilon"] > read_model_meta(tmp_path / "straight").dp["epsilon"]  # less noise in its first phase


def test_dp_on_off_across_a_resume_is_refused(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train

    train.run(phantom_data, tmp_path / "plain", tiny_config(max_steps=1, sample_every=0), seed=0)
    with pytest.raises(InputError, match="without differential privacy"):
        train.run(phantom_data, tmp_path / "plain", dp_config(max_steps=2), seed=0, resume=True)
    train.run(phantom_data, tmp_path / "private", dp_config(max_steps=1), seed=0)
    with pytest.raises(InputError, match="trained with differential privacy"):
        train.run(phantom_data, tmp_path / "private", tiny_config(max_steps=2, sample_every=0), seed=0, resume=True)


def test_a_run_over_budget_stops_and_says_so(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train

    # Too little noise for the budget: epsilon 2 is spent after about 10 of the 40 planned steps.
    config = dp_config(max_steps=40, checkpoint_every=5, dp={"epsilon": 2.0, "noise_multiplier": 2.0})
    summary = train.run(phantom_data, tmp_path / "model", config, seed=0)
    meta = read_model_meta(tmp_path / "model")
    assert summary.stopped_by == "privacy_budget" and 1 <= summary.steps < 40
    assert meta.stopped_early is True and meta.stop_reason.startswith(f"privacy budget reached at step {meta.steps}")
    assert meta.dp["budget_exhausted"] is True and meta.dp["stop_reason"] == meta.stop_reason
    assert meta.dp["epsilon"] <= 2.0
    from pipeline.models.dp import epsilon_of

    one_more = epsilon_of([(2.0, 0.5, meta.steps + 1)], meta.dp["delta"], "rdp")
    assert one_more > 2.0  # it stopped exactly where the next step would have overspent
    assert summary.lines()[0].startswith("STOPPED EARLY: privacy budget reached")


def test_frozen_features_train_only_the_discriminator_heads(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.core.seeds import stream_seed
    from pipeline.imaging.model_dir import build_discriminator, build_generator
    from pipeline.models import train
    from pipeline.models.dp import HEAD_PREFIXES

    train.run(phantom_data, tmp_path / "model", dp_config(max_steps=3, dp={"frozen_features": True}), seed=0)
    meta = read_model_meta(tmp_path / "model")
    trained = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=False)["discriminator"]
    torch.manual_seed(stream_seed(0, "init"))  # the initial weights, drawn as training draws them
    build_generator(meta)
    initial = build_discriminator(meta).state_dict()
    originals = [name for name in initial if name.endswith(".original") or name.endswith(".bias")]
    frozen = [name for name in originals if not name.startswith(HEAD_PREFIXES)]
    heads = [name for name in originals if name.startswith(HEAD_PREFIXES)]
    assert frozen and heads
    assert all(torch.equal(trained[name], initial[name]) for name in frozen)
    assert any(not torch.equal(trained[name], initial[name]) for name in heads)


def test_fine_tuning_from_a_public_model_starts_from_its_weights_and_states_it(
    phantom_data: Path, tmp_path: Path
) -> None:
    from pipeline.models import train
    from pipeline.models.dp import PUBLIC_START

    public_data = make_phantom_dataset(tmp_path / "public", subjects=10, seed=7)  # other patients: "public"
    train.run(public_data, tmp_path / "public_model", tiny_config(max_steps=3, sample_every=0), seed=0)
    public = torch.load(tmp_path / "public_model" / "checkpoint.pt", weights_only=True)
    private_dir = tmp_path / "private"
    config = dp_config(max_steps=2, init_from=str(tmp_path / "public_model"))
    train.run(phantom_data, private_dir, config, seed=0)
    meta = read_model_meta(private_dir)
    started = meta.initialized_from
    assert started["checkpoint_sha256"] == read_model_meta(tmp_path / "public_model").checkpoint_sha256
    assert started["steps"] == 3 and started["dp_epsilon"] is None
    assert started["train_dataset_digest"] != meta.train_dataset_digest
    # A path could name a person or a site: model.json identifies the start by its checkpoint only.
    assert str(tmp_path / "public_model") not in (private_dir / "model.json").read_text()
    assert meta.dp["assumptions"][-1] == PUBLIC_START.format(sha=started["checkpoint_sha256"][:16])
    assert meta.dp["steps"] == 2 and meta.dp["epsilon"] <= 10.0  # the account covers this run's steps
    # Two noisy steps move the weights, but from the public model's, not from a random start.
    tuned = torch.load(private_dir / "checkpoint.pt", weights_only=True)
    moved = [(tuned["ema"][name] - public["ema"][name]).abs().max().item() for name in public["ema"]]
    assert max(moved) > 0
    fresh = train.run(phantom_data, tmp_path / "fresh", dp_config(max_steps=2), seed=0)
    assert fresh.steps == 2
    fresh_ema = torch.load(tmp_path / "fresh" / "checkpoint.pt", weights_only=True)["ema"]
    name = next(name for name in public["ema"] if name.endswith("weight") or name.endswith(".original"))
    distance_to_public = (tuned["ema"][name] - public["ema"][name]).norm()
    assert distance_to_public < (fresh_ema[name] - public["ema"][name]).norm()
    # A resume keeps the record and the assumption (the checkpoint already carries the start) ...
    train.run(phantom_data, private_dir, dp_config(max_steps=3, init_from=config.init_from), seed=0, resume=True)
    resumed = read_model_meta(private_dir)
    assert resumed.initialized_from == started and resumed.dp["assumptions"] == meta.dp["assumptions"]
    # ... and refuses a config that now says another start.
    with pytest.raises(InputError, match="training started from the model with checkpoint .* model.init_from now is null"):
        train.run(phantom_data, private_dir, dp_config(max_steps=4), seed=0, resume=True)


def test_a_start_that_cannot_be_used_is_refused_naming_the_key(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train

    train.run(phantom_data, tmp_path / "same_data", tiny_config(max_steps=1, sample_every=0), seed=0)
    # Trained on the private data itself: its weights would carry the patients outside the account.
    with pytest.raises(InputError, match=r"model.init_from: .* was trained \(or started from a model trained\) on this run's"):
        train.run(phantom_data, tmp_path / "a", dp_config(max_steps=1, init_from=str(tmp_path / "same_data")), seed=0)
    # Without DP, fine-tuning on the same data is ordinary warm-starting ...
    train.run(phantom_data, tmp_path / "b", tiny_config(max_steps=1, sample_every=0, init_from=str(tmp_path / "same_data")), seed=0)
    # ... and a public fine-tune of that model still carries the private patients: refused under DP, down the chain.
    public = make_phantom_dataset(tmp_path / "public", subjects=6, seed=3)
    train.run(public, tmp_path / "relay", tiny_config(max_steps=1, sample_every=0, init_from=str(tmp_path / "same_data")), seed=0)
    assert read_model_meta(tmp_path / "relay").initialized_from["train_dataset_digest"] == read_model_meta(tmp_path / "same_data").train_dataset_digest
    with pytest.raises(InputError, match=r"was trained \(or started from a model trained\) on this run's training data"):
        train.run(phantom_data, tmp_path / "f", dp_config(max_steps=1, init_from=str(tmp_path / "relay")), seed=0)
    with pytest.raises(InputError, match="model.init_from: .* model.g_width = 8, this run has 16"):
        train.run(phantom_data, tmp_path / "c", tiny_config(max_steps=1, g_width=16, init_from=str(tmp_path / "same_data")), seed=0)
    with pytest.raises(InputError, match=r"model.init_from: .* preprocessed its images differently \(window"):
        config = tiny_config(max_steps=1, window=[-100.0, 200.0], init_from=str(tmp_path / "same_data"))
        train.run(phantom_data, tmp_path / "d", config, seed=0)
    # A start whose checkpoint changed since its model.json (a copy overwritten, a disk error) is bad input.
    import shutil

    shutil.copytree(tmp_path / "same_data", tmp_path / "tampered")
    (tmp_path / "tampered" / "checkpoint.pt").write_bytes(b"not weights")
    with pytest.raises(InputError, match="model.init_from: .*checkpoint.pt does not match the checksum recorded"):
        train.run(phantom_data, tmp_path / "g", tiny_config(max_steps=1, init_from=str(tmp_path / "tampered")), seed=0)
    with pytest.raises(InputError, match="model.init_from: .*model.json not found"):
        train.run(phantom_data, tmp_path / "e", tiny_config(max_steps=1, init_from=str(tmp_path / "nowhere")), seed=0)


def test_a_start_model_that_is_not_there_is_refused_before_training(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.registry import stage

    config = load_config(REPO / "configs" / "dp.yaml", {"model.init_from": str(tmp_path / "absent")})
    with pytest.raises(InputError, match=r"key 'model.init_from': .*absent/model.json not found\. Fix: train"):
        stage("train").check_inputs(config, {})
    from pipeline.workflow import tracked_params

    params = tracked_params(config)
    assert params["model.init_from.given"] is True and "model.init_from" not in params
    # The start's content is an input of train: another public model re-runs training.
    digest_absent = stage("train").digest(config, {"ingested": tmp_path})
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "checkpoint.pt").write_bytes(b"weights")
    assert stage("train").digest(config, {"ingested": tmp_path}) != digest_absent


def test_dp_config_is_checked_at_the_edge(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train

    with pytest.raises(ValueError, match="dp needs spacing"):
        tiny_config(spacing=None, dp=DPConfig())
    with pytest.raises(ValueError, match="dp needs max_steps"):
        tiny_config(max_steps=None, max_minutes=1.0, dp=DPConfig())
    with pytest.raises(InputError, match="model.dp.delta"):
        train.run(phantom_data, tmp_path / "m", dp_config(dp={"delta": 0.5}), seed=0)
    # Anything that reads the training images outside the noisy update is refused, naming the key.
    with pytest.raises(ValueError, match=r"dp needs every planned key set, not auto \(window"):
        tiny_config(window="auto", dp=DPConfig())
    with pytest.raises(ValueError, match="dp cannot use augment: ada"):
        tiny_config(augment="ada", dp=DPConfig())


def test_dp_under_ddp_is_refused_with_a_clear_message() -> None:
    from pipeline.models.dp import PrivateTraining

    with pytest.raises(InputError, match="not under torchrun"):
        PrivateTraining.create(dp_config(), ["a", "a", "b"], world_size=2, seed=0)


def test_report_and_card_show_epsilon_delta_and_the_privacy_unit(tmp_path: Path) -> None:
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
    config = ModelConfig(spatial_dims=2, image_size=[32, 32], spacing=[10.0, 10.0], intensity="ct",
                         window=[-160.0, 240.0], percentiles=[1.0, 99.0], augment=["translation", "cutout"],
                         max_steps=3, max_minutes=None, batch_size=8, d_width=4,
                         sample_every=0, log_model=False, device="cpu", r1_gamma=0.0,
                         dp=DPConfig(epsilon=8.0, subjects_per_step=2))
    # Started from a model of other (public) patients: the card names that start beside the account.
    public = make_phantom_dataset(tmp_path / "public", subjects=6, seed=9)
    train.run(public, tmp_path / "public_model", config.model_copy(update={"dp": None}), seed=0)
    config = config.model_copy(update={"init_from": str(tmp_path / "public_model")})
    train.run(tmp_path / "real", tmp_path / "model", config, seed=0)
    meta = read_model_meta(tmp_path / "model")
    generate.run(tmp_path / "model", tmp_path / "synthetic", GenerateConfig(per_class=6, seed=3))
    gated = EvaluateConfig.model_validate({
        "classifier_steps": 20, "bootstrap": 20, "kid_subsets": 5, "ms_ssim_pairs": 10, "min_holdout": 2,
        "min_test_subjects": 2, "match_repeats": 1, "feature_dim": 16, "num_threads": 1, "gates": {"max_epsilon": 9.0},
    })
    report = evaluate.run(tmp_path / "real", tmp_path / "synthetic", tmp_path / "report", gated, model_dir=tmp_path / "model")
    assert report["privacy"]["epsilon"] == pytest.approx(meta.dp["epsilon"]) and report["privacy"]["delta"] == meta.dp["delta"]
    checks = [check for check in report["gates"]["checks"]["privacy"] if check["name"] == "epsilon"]
    assert checks and checks[0]["verdict"] == "pass" and checks[0]["threshold"] == 9.0

    export.run(tmp_path / "real", tmp_path / "synthetic", tmp_path / "report", tmp_path / "out", ExportConfig(dicom=False),
               model_dir=tmp_path / "model", allow_failed_gates=True)
    card = (tmp_path / "out" / "data_card.md").read_text()
    from pipeline.export.card import format_number

    assert f"epsilon {format_number(meta.dp['epsilon'])}, delta {format_number(meta.dp['delta'])}" in card
    assert "privacy unit: subject" in card and "RDP accountant" in card
    assert "Poisson sampling" in card  # the accountant's assumptions are listed
    public_sha = read_model_meta(tmp_path / "public_model").checkpoint_sha256
    assert f"| initial weights | fine-tuned from the model with checkpoint SHA-256 `{public_sha}` (3 steps" in card
    assert "were trained on data that holds none of the training subjects (public data)" in card
    facts = json.loads((tmp_path / "out" / "export.json").read_text())
    assert facts["generation"]["model"]["dp"]["privacy_unit"] == "subject"


# ------------------------------------------------------------------------------------------------
# The canary audit
# ------------------------------------------------------------------------------------------------


def test_the_audit_bound_is_a_valid_lower_bound_of_a_separating_attack() -> None:
    from pipeline.evaluate.dp_audit import clopper_pearson, epsilon_lower_bound

    low, high = clopper_pearson(0, 200, 0.05)
    assert low == 0.0 and 0.015 < high < 0.02  # the exact interval: 1 - 0.025 ** (1 / 200)
    separated = epsilon_lower_bound(np.arange(200) + 1000.0, np.arange(200), delta=1e-5)
    # 200 per side, perfectly separated: log(TPR_low / FPR_high) with the confidence split over 800 tests.
    assert 2.5 < separated.epsilon_lower_bound < 4.5 and separated.tpr == 1.0 and separated.fpr == 0.0
    identical = epsilon_lower_bound(np.zeros(50), np.zeros(50), delta=1e-5)
    assert identical.epsilon_lower_bound == 0.0


def test_canary_audit_lower_bound_stays_below_the_accounted_epsilon(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from dp_tradeoff import add_canaries, audit

    from pipeline.models import train

    data = make_phantom_dataset(tmp_path / "real", subjects=8)
    members, non_members = add_canaries(data, tmp_path / "outside", count=6, seed=0)
    assert len(members) == len(non_members) == 6
    config = dp_config(max_steps=6, dp={"epsilon": 4.0, "subjects_per_step": 4})
    train.run(data, tmp_path / "model", config, seed=0)
    dp = read_model_meta(tmp_path / "model").dp
    assert dp["n_subjects"] == 4 + 6  # the canaries are subjects like the others
    result = audit(tmp_path / "model", data, tmp_path / "outside", members, dp["delta"])
    assert result["members"] == result["non_members"] == 6
    assert 0.0 <= result["epsilon_lower_bound"] <= dp["epsilon"] <= 4.0
