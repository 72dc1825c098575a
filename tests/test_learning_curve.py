"""Learning curves: real-only vs real+synthetic classifiers at a few real training sizes, and their report.

Tiny images and real (short) classifier training; the whole evaluate stage renders the curve.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.contracts.dataset import read_dataset
from pipeline.evaluate import run
from pipeline.evaluate.augmentation import Recipe, mixed_training_set
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.learning_curve import ClassifierRecipe, learning_curve, paired_comparison, subject_subset
from pipeline.imaging.images import ImageSet
from _controlled import make_real_dataset, make_synthetic_dataset

TINY = ClassifierRecipe(feature_dim=16, steps=30, batch_size=16, lr=2e-3, workers=1)


def _images(labels: list[str], subjects: list[str], split: str, seed: int) -> ImageSet:
    """Flat 16x16 images whose brightness says the class ("a" dark, "b" bright), with noise."""
    rng = np.random.default_rng(seed)
    level = np.where(np.asarray(labels) == "a", -0.4, 0.4)[:, None, None, None]
    images = (level + rng.normal(0, 0.3, (len(labels), 1, 16, 16))).astype(np.float32)
    return ImageSet(
        images=images,
        labels=np.asarray(labels, dtype=object),
        sample_ids=np.asarray([f"{split}-{i}" for i in range(len(labels))], dtype=object),
        subject_ids=np.asarray(subjects, dtype=object),
        splits=np.full(len(labels), split, dtype=object),
    )


def test_subsets_draw_whole_subjects_per_class() -> None:
    # 6 subjects per class, 2 images each: a subset of 3 per class holds 6 subjects' 12 images.
    labels = ["a", "a", "b", "b"] * 6
    subjects = [f"s{i // 2}" for i in range(24)]
    train = _images(labels, subjects, "train", 0)
    mask = subject_subset(train, ["a", "b"], 3, np.random.default_rng(0))
    chosen = train.select(mask)
    assert mask.sum() == 12
    assert {label: np.unique(chosen.subject_ids[chosen.labels == label]).size for label in "ab"} == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="fewer than 7"):
        subject_subset(train, ["a", "b"], 7, np.random.default_rng(0))


def test_the_ratio_caps_synthetic_images_per_class_and_the_filter_drops_rejected_ones() -> None:
    real_ids = np.array([0, 0, 1, 1, 1])
    synthetic_ids = np.array([0] * 10 + [1] * 10)
    real = np.zeros((5, 1, 4, 4), np.float32)
    synthetic = np.ones((20, 1, 4, 4), np.float32)
    _, ids, added = mixed_training_set(real, real_ids, synthetic, synthetic_ids, Recipe(1.0), np.random.default_rng(0))
    assert added == 5 and (ids[5:] == 0).sum() == 2 and (ids[5:] == 1).sum() == 3
    keep = np.arange(20) % 2 == 0
    _, ids, added = mixed_training_set(real, real_ids, synthetic, synthetic_ids, Recipe(None, True), np.random.default_rng(0), keep)
    assert added == 10
    _, _, added = mixed_training_set(real, real_ids, synthetic, synthetic_ids, Recipe(), np.random.default_rng(0))
    assert added == 20


def test_the_gain_interval_resamples_seeds_so_one_lucky_draw_is_not_a_gain() -> None:
    # Seed 0's augmented classifier is far better, seed 1's far worse: the mean gain is 0 and the
    # interval, drawing seeds per resample, spans both signs.
    resamples = 400
    real = np.full((2, resamples), 0.7)
    augmented = np.stack([np.full(resamples, 0.9), np.full(resamples, 0.5)])
    result = paired_comparison(real, augmented, real[:, 0], augmented[:, 0], np.random.default_rng(0))
    assert result["gain"] == pytest.approx(0.0)
    assert result["gain_ci_low"] < 0 < result["gain_ci_high"] and result["verdict"] == "no measurable gain"
    # A gain in every seed and resample is a measurable gain.
    result = paired_comparison(real, real + 0.1, real[:, 0], real[:, 0] + 0.1, np.random.default_rng(0))
    assert result["gain_ci_low"] == pytest.approx(0.1) and result["verdict"] == "measurable gain"


def test_curve_trains_both_arms_per_size_and_skips_sizes_the_split_cannot_fill() -> None:
    # 8 subjects per class with 2 images each; synthetic images carry the same brightness signal.
    labels = ["a", "a", "b", "b"] * 8
    train = _images(labels, [f"t{i // 2}" for i in range(32)], "train", 0)
    test = _images(["a", "b"] * 12, [f"x{i}" for i in range(24)], "test", 1)
    synthetic = _images(["a", "b"] * 20, [f"s{i}" for i in range(40)], "synthetic", 2)
    curve = learning_curve(
        ["a", "b"], train, test, synthetic, sizes=[2, 4, 16], seeds=[0, 1], recipe=Recipe(), classifier=TINY,
        bootstrap=200, bootstrap_seed=0,
    )
    assert [point["per_class"] for point in curve["points"]] == [2, 4]
    assert curve["skipped"] == [{"per_class": 16, "reason": "the training split has 8 subjects in its smallest class"}]
    for point in curve["points"]:
        assert point["n_real_images"] == 4 * point["per_class"] and point["n_synthetic_added"] == 40
        for arm in ("real_only", "real_plus_synthetic"):
            figures = point[arm]
            assert figures["ci_low"] <= figures["ci_high"]
            # The signal is easy: every arm reads the test split far above chance.
            assert figures["balanced_accuracy"] > 0.7
        gain = point["real_plus_synthetic"]["balanced_accuracy"] - point["real_only"]["balanced_accuracy"]
        assert point["gain"] == pytest.approx(gain) and point["gain_ci_low"] <= point["gain_ci_high"]
        assert point["verdict"] in ("measurable gain", "measurable loss", "no measurable gain")
    assert curve["seeds"] == 2 and "real images +" in curve["recipe"]


def test_evaluate_writes_the_curve_into_report_json_and_plots_it_in_report_html(tmp_path: Path) -> None:
    make_real_dataset(tmp_path / "real", per_class=16, size=16, seed=0, fractions=(0.5, 0.25, 0.25))
    make_synthetic_dataset(tmp_path / "synthetic", read_dataset(tmp_path / "real"), "independent", per_class=12, seed=1)
    config = EvaluateConfig(
        classifier_steps=20, classifier_batch_size=16, utility_seeds=2, bootstrap=50, kid_subsets=5,
        ms_ssim_pairs=10, match_repeats=1, num_threads=1, feature_dim=16, reid_steps=5, min_holdout=4,
        min_test_subjects=4, k_nearest=2, learning_curve=True, learning_curve_sizes=[2, 4, 64],
    )
    report = run(tmp_path / "real", tmp_path / "synthetic", tmp_path / "report", config)
    curve = report["utility"]["learning_curve"]
    assert [point["per_class"] for point in curve["points"]] == [2, 4]
    assert curve["skipped"][0]["per_class"] == 64 and "generator" in curve
    assert json.loads((tmp_path / "report" / "report.json").read_text())["utility"]["learning_curve"] == curve
    html = (tmp_path / "report" / "report.html").read_text()
    assert 'id="learning-curve"' in html and 'alt="learning curve" src="data:image/png;base64,' in html
    assert "64 subjects per class not measured" in html

    # Off by default: no curve, no section.
    assert EvaluateConfig().learning_curve is False


def test_sizes_are_validated_with_the_key_named() -> None:
    with pytest.raises(ValueError, match="learning_curve_sizes"):
        EvaluateConfig(learning_curve_sizes=[0, 4])
    assert EvaluateConfig(learning_curve_sizes=[8, 4, 4]).learning_curve_sizes == [4, 8]


def test_auc_by_ranks_equals_the_pairwise_definition_and_scales_to_all_pairs_of_held_out_slices() -> None:
    # The utility's AUC (also the re-identification verification AUC over all held-out pairs): ties
    # count half, bootstrap weights per resample. By ranks it needs O(resamples x N) memory: 300,000
    # scores with 30,000 positives (a pairwise matrix would hold 8e9 entries) take well under a second.
    from pipeline.evaluate.utility import roc_auc

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 12, 200).astype(float)
    truth = (rng.random(200) < 0.4).astype(int)
    weights = rng.integers(0, 3, (5, 200)).astype(float)
    pos, neg = truth == 1, truth == 0
    wins = (scores[pos][:, None] > scores[neg][None, :]) + 0.5 * (scores[pos][:, None] == scores[neg][None, :])
    expected = np.einsum("bi,ij,bj->b", weights[:, pos], wins, weights[:, neg]) / (
        weights[:, pos].sum(1) * weights[:, neg].sum(1)
    )
    proba = np.stack([-scores, scores], axis=1)
    assert np.allclose(roc_auc(truth, proba, np.array([0, 1]), weights), expected)
    many = rng.normal(size=300_000)
    labels = (np.arange(300_000) % 10 == 0).astype(int)
    many[labels == 1] += 1.0
    value = roc_auc(labels, np.stack([-many, many], axis=1), np.array([0, 1]))
    assert 0.74 < float(value) < 0.78  # AUC of a unit shift between two normals: Phi(1 / sqrt 2) = 0.760


def test_every_lever_trains_a_real_plus_synthetic_classifier_that_reads_the_test_split() -> None:
    # Filter, ratio and pre-train + fine-tune through the same curve code as the default recipe.
    labels = ["a", "a", "b", "b"] * 4
    train = _images(labels, [f"t{i // 2}" for i in range(16)], "train", 0)
    test = _images(["a", "b"] * 8, [f"x{i}" for i in range(16)], "test", 1)
    synthetic = _images(["a", "b"] * 10, [f"s{i}" for i in range(20)], "synthetic", 2)
    for recipe in (Recipe(1.0, True), Recipe(None, False, True)):
        curve = learning_curve(
            ["a", "b"], train, test, synthetic, sizes=[2], seeds=[0], recipe=recipe, classifier=TINY,
            bootstrap=50, bootstrap_seed=0,
        )
        point = curve["points"][0]
        # Ratio 1 admits at most as many synthetic images per class as real ones (4); the filter may drop some.
        assert point["n_synthetic_added"] <= (8 if recipe.synthetic_ratio else 20)
        assert point["real_plus_synthetic"]["balanced_accuracy"] > 0.7
    assert "pre-train, fine-tune" in Recipe(None, False, True).describe()
