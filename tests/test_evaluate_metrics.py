"""The evaluate stage's metric functions, on arrays with known answers (fast, no files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluate.diversity import (
    ms_ssim_pairs,
    ms_ssim_settings,
    same_class_pairs,
)
from pipeline.evaluate.fidelity import fid, kid, prdc, standardize
from pipeline.evaluate.config import GateThresholds
from pipeline.evaluate.gates import Check, gate_status
from pipeline.imaging.neighbours import kth_neighbour_radius, nearest
from pipeline.evaluate.privacy import (
    auc,
    closest_records,
    distance_attack_scores,
    memorization,
)
from pipeline.evaluate.utility import (
    balanced_accuracy,
    bootstrap_weights,
    interval,
    roc_auc,
)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_nearest_matches_brute_force_and_excludes_self(rng: np.random.Generator) -> None:
    reference = rng.normal(size=(300, 16))
    queries = rng.normal(size=(50, 16))
    distances, indices = nearest(queries, reference, k=3)
    brute = np.linalg.norm(queries[:, None] - reference[None], axis=2)
    np.testing.assert_array_equal(indices, np.argsort(brute, axis=1)[:, :3])
    np.testing.assert_allclose(distances, np.sort(brute, axis=1)[:, :3], rtol=1e-6)
    radius = kth_neighbour_radius(reference, 2)
    self_brute = np.linalg.norm(reference[:, None] - reference[None], axis=2)
    np.fill_diagonal(self_brute, np.inf)
    np.testing.assert_allclose(radius, np.sort(self_brute, axis=1)[:, 1], rtol=1e-6)


def test_fid_is_zero_for_identical_sets_and_agrees_with_monai(rng: np.random.Generator) -> None:
    from monai.metrics import FIDMetric

    real = rng.normal(size=(400, 8))
    assert fid(real, real) == pytest.approx(0.0, abs=1e-8)
    shifted = real + 2.0
    assert fid(real, shifted) == pytest.approx(4.0 * 8, rel=1e-6)  # |delta mu|^2, equal covariances
    other = rng.normal(size=(400, 8)) * 1.5 + 0.3
    monai_value = float(FIDMetric()(torch.from_numpy(other), torch.from_numpy(real)))
    assert fid(real, other) == pytest.approx(monai_value, rel=1e-6)


def test_fid_stays_finite_when_there_are_fewer_images_than_dimensions(rng: np.random.Generator) -> None:
    value = fid(rng.normal(size=(20, 64)), rng.normal(size=(15, 64)))
    assert np.isfinite(value) and value > 0


def test_kid_is_near_zero_for_one_distribution_and_large_for_another(rng: np.random.Generator) -> None:
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
    same, same_std, size = kid(a, b, subsets=20, subset_size=100, seed=0)
    assert size == 100
    assert abs(same) < 3 * same_std + 0.01
    different, _, _ = kid(a, b + 1.0, subsets=20, subset_size=100, seed=0)
    assert different > 20 * abs(same) and different > 0.1
    _, _, small = kid(a[:30], b, subsets=5, subset_size=100, seed=0)
    assert small == 30  # capped at the smaller set: small data still works


def test_prdc_identical_disjoint_and_collapsed(rng: np.random.Generator) -> None:
    real = rng.normal(size=(400, 8))
    same = prdc(real, real.copy(), k=5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = prdc(real, real + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    collapsed = prdc(real, np.repeat(real[:1], 100, axis=0), k=5)
    assert collapsed["precision"] == 1.0  # the one image is realistic...
    assert collapsed["recall"] == 0.0  # ...but covers nothing of the real variety
    assert collapsed["coverage"] < 0.05
    independent = prdc(real, rng.normal(size=(400, 8)), k=5)
    assert independent["density"] == pytest.approx(1.0, abs=0.2)
    assert independent["coverage"] > 0.9


def test_standardize_uses_the_reference_statistics(rng: np.random.Generator) -> None:
    reference = rng.normal(3.0, 2.0, size=(1000, 4))
    scaled_reference, scaled_other = standardize(reference, reference + 2.0)
    np.testing.assert_allclose(scaled_reference.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(scaled_other.mean(0), 2.0 / reference.std(0), rtol=1e-9)


def test_ms_ssim_settings_fit_monai_at_small_sizes() -> None:
    assert ms_ssim_settings((256, 256)).kernel_size == 11 and len(ms_ssim_settings((256, 256)).weights) == 5
    at64 = ms_ssim_settings((64, 64))
    assert (at64.kernel_size, len(at64.weights)) == (7, 4)
    assert sum(at64.weights) == pytest.approx(1.0)
    images = np.random.default_rng(1).uniform(-1, 1, size=(6, 1, 32, 32)).astype(np.float32)
    for size in ((32, 32), (16, 16)):
        settings = ms_ssim_settings(size)
        crop = np.ascontiguousarray(images[:, :, : size[0], : size[1]])
        values = ms_ssim_pairs(crop, np.array([[0, 0], [0, 1]]), settings)
        assert values[0] == pytest.approx(1.0, abs=1e-5)
        assert values[1] < 0.5


def test_same_class_pairs_are_same_class_and_cross_subject(rng: np.random.Generator) -> None:
    labels = np.array(["a"] * 10 + ["b"] * 10 + ["c"])
    groups = np.repeat(np.arange(7), 3)
    pairs = same_class_pairs(labels, groups, 20, rng)
    assert pairs["c"].shape == (0, 2)
    for label in ("a", "b"):
        assert len(pairs[label]) == 20
        assert (labels[pairs[label]] == label).all()
        assert (groups[pairs[label][:, 0]] != groups[pairs[label][:, 1]]).all()


def test_memorization_and_closest_records() -> None:
    train = np.eye(4, 16, dtype=np.float32)
    copies = train + 0.001
    close = closest_records(copies, train, scale=4.0)
    np.testing.assert_array_equal(close.index, [0, 1, 2, 3])
    holdout_dcr = np.linspace(0.2, 1.0, 100)
    rate, threshold, flags = memorization(close.distance, holdout_dcr, 5.0)
    assert rate == 1.0 and flags.all()
    assert threshold == pytest.approx(np.percentile(holdout_dcr, 5.0))
    rate, _, _ = memorization(np.linspace(0.2, 1.0, 1000), holdout_dcr, 5.0)
    assert rate == pytest.approx(0.05, abs=0.01)  # an honest generator reads at the percentile


def test_auc_matches_sklearn_and_distance_attack_detects_copies(rng: np.random.Generator) -> None:
    from sklearn.metrics import roc_auc_score

    positive, negative = rng.normal(1.0, 1.0, 80), rng.normal(0.0, 1.0, 120)
    positive[:5] = negative[:5]  # ties count half
    expected = roc_auc_score(np.r_[np.ones(80), np.zeros(120)], np.r_[positive, negative])
    assert auc(positive, negative) == pytest.approx(expected)
    members, nonmembers = rng.normal(size=(50, 32)), rng.normal(size=(50, 32))
    synthetic = members + rng.normal(0.0, 0.01, size=members.shape)
    scores_in = distance_attack_scores(members, synthetic)
    scores_out = distance_attack_scores(nonmembers, synthetic)
    assert auc(scores_in, scores_out) == 1.0


def test_weighted_utility_metrics_match_sklearn(rng: np.random.Generator) -> None:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    truth = rng.integers(0, 3, 90)
    proba = rng.dirichlet(np.ones(3), 90)
    proba[np.arange(90), truth] += 0.3
    proba /= proba.sum(1, keepdims=True)
    predicted = proba.argmax(1)
    assert balanced_accuracy(truth, predicted) == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert roc_auc(truth, proba, np.arange(3)) == pytest.approx(roc_auc_score(truth, proba, multi_class="ovr"))
    weights = rng.integers(0, 3, size=(4, 90)).astype(float)
    for row, w in enumerate(weights):
        assert balanced_accuracy(truth, predicted, weights)[row] == pytest.approx(
            balanced_accuracy_score(truth, predicted, sample_weight=w)
        )
    binary = (truth > 0).astype(int)
    two = np.stack([1 - proba[:, 0], proba[:, 0]], axis=1)
    for row, w in enumerate(weights):
        assert roc_auc(binary, two, np.array([0, 1]), weights)[row] == pytest.approx(
            roc_auc_score(binary, two[:, 1], sample_weight=w)
        )


def test_bootstrap_draws_whole_subjects(rng: np.random.Generator) -> None:
    groups = np.repeat(["s1", "s2", "s3", "s4"], [1, 2, 3, 4])
    weights = bootstrap_weights(groups, 500, rng)
    assert weights.shape == (500, 10)
    for name in ("s2", "s3", "s4"):
        members = weights[:, groups == name]
        assert (members == members[:, :1]).all()  # every image of a subject gets the subject's draw count
    assert (
        weights[:, groups == "s1"].sum(1)
        + weights[:, groups == "s2"][:, 0]
        + weights[:, groups == "s3"][:, 0]
        + weights[:, groups == "s4"][:, 0]
        == 4
    ).all()
    low, high = interval(rng.normal(0.0, 1.0, 10_000))
    assert low == pytest.approx(-1.96, abs=0.1) and high == pytest.approx(1.96, abs=0.1)


def test_gate_status_rules() -> None:
    passed = Check(name="a", value=1.0, comparison=">=", threshold=0.5, passed=True, meaning="")
    failed = Check(name="b", value=0.1, comparison=">=", threshold=0.5, passed=False, meaning="")
    missing = Check(
        name="c", value=None, comparison=">=", threshold=0.5, passed=None, meaning="", reason="too few images"
    )
    unsure = Check(name="d", value=0.6, comparison="<=", threshold=0.65, verdict="inconclusive", meaning="")
    assert gate_status([passed]) == "pass"
    # A mandatory check that did not run, or could not tell, keeps the gate from passing.
    assert gate_status([passed, missing]) == "inconclusive"
    assert gate_status([passed, unsure]) == "inconclusive"
    assert gate_status([passed, failed, unsure]) == "fail"
    assert gate_status([missing]) == "not_run"
    assert unsure.passed is None and passed.verdict == "pass" and failed.verdict == "fail"


def _attack(auc: float, se: float, *, gated: bool = True, powered: bool = True) -> dict:
    """An attack's figures as attack_figures writes them (bounds from the standard error)."""
    return {
        "auc": auc, "auc_ci_low": auc - 1.96 * se, "auc_ci_high": auc + 1.96 * se, "auc_se": se,
        "auc_lower": auc - 1.96 * se, "auc_upper": auc + 1.645 * se, "tpr_at_1pct_fpr": 0.0,
        "tpr_at_10pct_fpr": 0.1, "detectable_auc": 0.65 + 0.84 * se, "powered": powered,
        "subjects_needed": 60, "gated": gated,
    }


def _mia(attacks: dict, **limits) -> list[Check]:
    from pipeline.evaluate.config import GateThresholds
    from pipeline.evaluate.gates import privacy_checks

    section = {"memorization_excess": None, "memorization_excess_reason": "not in this test", "mia_attacks": attacks,
               "n_holdout_subjects": 32}
    return privacy_checks(section, GateThresholds(**limits), None)[1:]


def test_mia_check_fails_on_evidence_passes_with_power_else_inconclusive() -> None:
    # Above the limit but the interval includes chance: inconclusive, never a pass.
    (check,) = _mia({"blackbox_pixel": _attack(0.70, 0.12, powered=False)})
    assert check.verdict == "inconclusive" and check.passed is None and "about 60 held-out subjects" in check.power
    # Above the limit and above chance: fail on evidence.
    (check,) = _mia({"blackbox_pixel": _attack(0.75, 0.05)})
    assert check.verdict == "fail" and check.passed is False and "tells training patients" in check.finding
    # Within the limit with power: pass; the same estimate without power: inconclusive.
    assert _mia({"blackbox_pixel": _attack(0.52, 0.03)})[0].verdict == "pass"
    assert _mia({"blackbox_pixel": _attack(0.52, 0.03, powered=False)})[0].verdict == "inconclusive"
    # Powered but the upper bound crosses the limit: inconclusive.
    assert _mia({"blackbox_pixel": _attack(0.62, 0.03)})[0].verdict == "inconclusive"
    # Each gated attack is its own check; ungated cross-checks never decide.
    checks = _mia({"blackbox_pixel": _attack(0.5, 0.03), "whitebox_discriminator": _attack(0.8, 0.05),
                   "blackbox_feature_x": _attack(0.95, 0.02, gated=False)})
    assert [(c.name, c.verdict) for c in checks] == [
        ("mia_auc_blackbox_pixel", "pass"), ("mia_auc_whitebox_discriminator", "fail")
    ]
    # No interval (the bootstrap gave no spread): it ran but cannot tell.
    no_spread = {"auc": 0.7, "auc_ci_low": None, "auc_ci_high": None, "auc_se": None, "gated": True}
    assert _mia({"blackbox_pixel": no_spread})[0].verdict == "inconclusive"
    # No gated attack at all: not run.
    assert _mia({})[0].verdict == "not_run"


def _cohort(rng: np.random.Generator, subjects: int, slices: int, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Images of subjects: a subject centre plus per-slice noise (slices of one subject are correlated)."""
    centres = rng.normal(0.0, 1.0, (subjects, dim))
    owner = np.repeat(np.arange(subjects), slices)
    return (centres[owner] + rng.normal(0.0, 0.5, (owner.size, dim))).astype(np.float32), owner


def test_memorization_test_reads_no_excess_on_honest_draws_and_fails_planted_copies() -> None:
    from pipeline.evaluate.config import EvaluateConfig
    from pipeline.evaluate.gates import privacy_checks
    from pipeline.evaluate.privacy import memorization_test
    from pipeline.evaluate.sections.privacy import memorization_figures

    config = EvaluateConfig()
    verdicts = {"honest": [], "copies": []}
    excess = {"honest": [], "copies": []}
    for seed in range(12):
        rng = np.random.default_rng(seed)
        train, _ = _cohort(rng, 60, 6)
        holdout, owner = _cohort(rng, 40, 6)
        honest, _ = _cohort(rng, 200, 1)
        copies = honest.copy()
        copies[:60] = train[rng.choice(train.shape[0], 60, replace=False)] + rng.normal(0, 0.05, (60, 64))
        holdout_dcr = closest_records(holdout, train).distance
        for name, synthetic in (("honest", honest), ("copies", copies)):
            test = memorization_test(closest_records(synthetic, train).distance, holdout_dcr, owner, None, 5.0, 0.05)
            section = {**memorization_figures(test, config), "mia_attacks": {}, "n_holdout_subjects": 40}
            verdicts[name].append(privacy_checks(section, config.gates, None)[0].verdict)
            excess[name].append(test.excess)
            # The null rate is measured, not assumed: held-out images below their leave-one-out thresholds.
            assert 0.0 <= test.null_rate <= 0.3 and test.excess_ci[0] <= test.excess <= test.excess_ci[1]
    assert "fail" not in verdicts["honest"] and abs(np.mean(excess["honest"])) < 0.03
    assert verdicts["copies"] == ["fail"] * 12 and np.mean(excess["copies"]) > 0.25


def test_memorization_power_states_a_detectable_excess_that_shrinks_with_held_out_subjects() -> None:
    from pipeline.evaluate.privacy import memorization_power, memorization_test

    rng = np.random.default_rng(3)
    train, _ = _cohort(rng, 90, 6)
    synthetic, _ = _cohort(rng, 200, 1)
    synthetic_dcr = closest_records(synthetic, train).distance
    stated = {}
    for subjects in (10, 80):
        holdout, owner = _cohort(rng, subjects, 6)
        test = memorization_test(synthetic_dcr, closest_records(holdout, train).distance, owner, None, 5.0, 0.05)
        stated[subjects] = memorization_power(test, 0.07)
    assert stated[80].detectable < stated[10].detectable
    assert not stated[10].powered and stated[10].subjects_needed > 10
    assert stated[80].powered or stated[80].subjects_needed > 80


def test_attack_figures_report_tpr_at_low_fpr_as_brute_force_counts(rng: np.random.Generator) -> None:
    from pipeline.evaluate.config import EvaluateConfig
    from pipeline.evaluate.sections.privacy import attack_figures

    members, nonmembers = rng.normal(0.8, 1.0, 150), rng.normal(0.0, 1.0, 200)
    groups = np.concatenate([np.repeat(np.arange(50), 3), 100 + np.repeat(np.arange(50), 4)]).astype(str)
    weights = bootstrap_weights(groups, 200, rng)
    figures = attack_figures(members, nonmembers, weights, 50, 50, EvaluateConfig())
    for key, fpr in (("tpr_at_1pct_fpr", 0.01), ("tpr_at_10pct_fpr", 0.10)):
        # Brute force: every threshold; the best TPR among those whose FPR stays within the budget.
        best = max(
            float((members > t).mean())
            for t in np.concatenate([nonmembers, members, [np.inf]])
            if (nonmembers > t).mean() <= fpr + 1e-12
        )
        assert figures[key] == pytest.approx(best)
    assert figures["auc"] == pytest.approx(auc(members, nonmembers))
    assert figures["auc_lower"] < figures["auc"] < figures["auc_upper"]
    assert figures["detectable_auc"] > GateThresholds().max_mia_auc and isinstance(figures["powered"], bool)


def test_classifiers_trained_side_by_side_match_sequential_training(rng: np.random.Generator) -> None:
    from pipeline.evaluate.networks import TrainingJob, predict_proba, train_classifiers

    images = rng.uniform(-1, 1, size=(40, 1, 16, 16)).astype(np.float32)
    labels = np.arange(40) % 2
    images[labels == 1, :, 6:10, 6:10] = 1.0
    jobs = [TrainingJob(images, labels, seed) for seed in (0, 1, 0)]
    settings = {"feature_dim": 16, "steps": 15, "batch_size": 8, "lr": 2e-3}
    threads_before = torch.get_num_threads()
    parallel = train_classifiers(jobs, 2, workers=2, **settings)
    sequential = train_classifiers(jobs, 2, workers=1, **settings)
    assert torch.get_num_threads() == threads_before
    outputs = [predict_proba(model, images) for model in parallel + sequential]
    np.testing.assert_allclose(outputs[0], outputs[3], atol=1e-6)  # same seed: same model, threads or not
    np.testing.assert_allclose(outputs[0], outputs[2], atol=1e-6)
    assert not np.allclose(outputs[0], outputs[1])  # another seed: another model


def test_prdc_sizes_real_balls_by_other_subjects_for_slices(rng: np.random.Generator) -> None:
    # 40 subjects x 8 near-identical "slices": without subjects, each slice's 5 nearest neighbours
    # are its own volume's slices, the balls shrink to nothing and independent data reads 0.
    centres = rng.normal(size=(40, 8))
    real = np.repeat(centres, 8, axis=0) + rng.normal(0.0, 0.01, size=(320, 8))
    groups = np.repeat(np.arange(40), 8)
    fresh = np.repeat(rng.normal(size=(40, 8)), 8, axis=0) + rng.normal(0.0, 0.01, size=(320, 8))
    fresh_groups = np.repeat(np.arange(40, 80), 8)
    naive = prdc(real, fresh, k=5)
    assert naive["precision"] < 0.05 and naive["coverage"] < 0.05
    aware = prdc(real, fresh, k=5, real_groups=groups, fake_groups=fresh_groups)
    assert aware["precision"] > 0.8 and aware["recall"] > 0.8 and aware["coverage"] > 0.8
    # The radius is the distance to the 5th nearest other subject (its closest slice).
    radius = kth_neighbour_radius(real, 5, groups)
    brute = np.linalg.norm(real[:, None] - real[None], axis=2)
    per_subject = brute.reshape(320, 40, 8).min(axis=2)
    per_subject[np.arange(320), groups] = np.inf
    np.testing.assert_allclose(radius, np.sort(per_subject, axis=1)[:, 4], rtol=1e-6)
    assert np.isnan(kth_neighbour_radius(real[:16], 5, groups[:16])).all()  # one other subject only: no ball


def test_density_counts_subjects_not_slices(rng: np.random.Generator) -> None:
    centres = rng.normal(size=(60, 8))
    groups = np.repeat(np.arange(60), 6)
    real = np.repeat(centres, 6, axis=0) + rng.normal(0.0, 0.01, size=(360, 8))
    fresh = rng.normal(size=(300, 8))
    per_subject = prdc(real, fresh, k=5, real_groups=groups)
    single = prdc(centres, fresh, k=5)  # the same real distribution, one image per subject
    assert per_subject["density"] == pytest.approx(single["density"], rel=0.2)
    assert per_subject["precision"] == pytest.approx(single["precision"], abs=0.1)
    # Unique groups are the plain per-image definition.
    assert prdc(centres, fresh, k=5, real_groups=np.arange(60)) == single
