"""Utility: balanced label accuracy, the harm check's minimum of test subjects, seed-averaged intervals; seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.seeds import stream_seed
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.networks import ConvNet
from pipeline.evaluate.seeds import PURPOSES, purpose_seed
from pipeline.evaluate.sections.utility import _arm, _label_accuracy, train_all, utility_section
from pipeline.evaluate.utility import bootstrap_weights
from pipeline.imaging.images import ImageSet

FAST = EvaluateConfig(classifier_steps=20, utility_seeds=2, bootstrap=200, num_threads=1, feature_dim=16)


def _images(labels: list[str], subjects: list[str], split: str, seed: int) -> ImageSet:
    """Flat images whose brightness says the class ("a" dark, "b" bright), with noise."""
    rng = np.random.default_rng(seed)
    level = np.where(np.asarray(labels) == "a", -0.5, 0.5)[:, None, None, None]
    images = (level + rng.normal(0, 0.2, (len(labels), 1, 16, 16))).astype(np.float32)
    count = len(labels)
    return ImageSet(
        images=images,
        labels=np.asarray(labels, dtype=object),
        sample_ids=np.asarray([f"{split}-{i}" for i in range(count)], dtype=object),
        subject_ids=np.asarray(subjects, dtype=object),
        splits=np.full(count, split, dtype=object),
    )


def _always_first_class() -> ConvNet:
    """A real classifier that reads every image as the first class (its head ignores the features)."""
    model = ConvNet(2, (16, 16), 16, n_classes=2, seed=0).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([1.0, 0.0]))
    return model


def test_label_accuracy_is_balanced_so_a_class_mix_does_not_flatter_a_one_class_reader() -> None:
    # 90 % of the synthetic images claim class "a": plain accuracy would read 0.9 for a classifier
    # that answers "a" to everything, balanced accuracy reads chance (0.5), as on held-out images.
    synthetic = _images(["a"] * 90 + ["b"] * 10, [f"s{i}" for i in range(100)], "synthetic", 0)
    holdout = _images(["a", "b"] * 10, [f"h{i // 2}" for i in range(20)], "val", 1)
    result: dict = {}
    _label_accuracy(result, [_always_first_class()], synthetic, holdout, ["a", "b"], FAST)
    assert result["synthetic_label_accuracy"] == pytest.approx(0.5)
    assert result["real_holdout_accuracy"] == pytest.approx(0.5)
    assert "balanced accuracy" in result["label_accuracy_metric"]
    assert result["synthetic_label_accuracy_ratio"] is None  # chance on held-out: the ratio says nothing
    assert "chance" in result["synthetic_label_accuracy_ratio_reason"]


def test_the_harm_check_needs_enough_test_subjects() -> None:
    labels = ["a", "b"] * 12
    train = _images(labels, [f"t{i}" for i in range(24)], "train", 0)
    synthetic = _images(labels, [f"s{i}" for i in range(24)], "synthetic", 2)
    # 8 test images of 4 subjects: an interval over 4 subjects cannot show harm.
    test = _images(["a", "b"] * 4, [f"x{i // 2}" for i in range(8)], "test", 3)
    trained = train_all(["a", "b"], train, test, synthetic, FAST)
    assert trained.augmented == [] and "min_test_subjects" in trained.augmented_reason
    utility = utility_section(trained, ["a", "b"], train, test, test, synthetic, FAST)
    assert utility["augmentation_gain"] is None and utility["augmentation_verdict"] == "not run"
    assert "4 subjects" in utility["augmentation_gain_reason"] and "needs 10" in utility["augmentation_gain_reason"]
    assert utility["augmentation_gain_ci_low"] is None and utility["augmentation_gain_ci_low_reason"]

    # With the minimum lowered to what the split holds, the comparison runs.
    enough = FAST.model_copy(update={"min_test_subjects": 4})
    trained = train_all(["a", "b"], train, test, synthetic, enough)
    utility = utility_section(trained, ["a", "b"], train, test, test, synthetic, enough)
    assert utility["augmentation_gain"] is not None and utility["real_only"]["n_test_subjects"] == 4


def test_the_gain_interval_averages_seeds_in_every_resample_like_its_point_estimate() -> None:
    # Two training seeds: one reads every test image right, one every image wrong. The point
    # estimate is their mean, 0.5, whatever subjects are drawn, so its interval is [0.5, 0.5]; a
    # resample drawing one seed would spread over [0, 1].
    truth = np.array([0, 1] * 10)
    right = np.eye(2)[truth]
    wrong = np.eye(2)[1 - truth]
    weights = bootstrap_weights(np.arange(20) // 2, 300, np.random.default_rng(0))
    entry, balanced, _ = _arm("real train", [right, wrong], truth, np.arange(2), weights)
    assert entry["balanced_accuracy"] == 0.5
    assert entry["balanced_accuracy_ci_low"] == entry["balanced_accuracy_ci_high"] == 0.5
    assert np.allclose(balanced, 0.5)


@pytest.mark.parametrize("seed", [0, 1, 11, 41, 12345])
def test_every_purpose_draws_its_own_seed_stream(seed: int) -> None:
    config = EvaluateConfig(seed=seed)
    drawn = {(purpose, index): purpose_seed(config, purpose, index) for purpose in PURPOSES for index in range(4)}
    assert len(set(drawn.values())) == len(drawn)  # no two purposes (or indices) share a seed
    classifiers = {purpose_seed(config, "classifier", index) for index in range(4)}
    assert purpose_seed(config, "random_space") not in classifiers
    # The export stage re-derives the subsample stream without importing evaluate (see export/privacy.py).
    assert purpose_seed(config, "subsample") == stream_seed(seed, "subsample", 0)
    with pytest.raises(KeyError, match="unknown seed purpose"):
        purpose_seed(config, "no-such-purpose")
