"""Size-matched, subject-counted references: a perfect generator reads like held-out real data."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.sections.fidelity import SpaceFeatures, fidelity_in_space


def _cohort(rng: np.random.Generator, subjects: int, slices: int, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Feature vectors of ``subjects`` volumes of ``slices`` slices: a subject's slices share its anatomy."""
    anatomy = rng.normal(0.0, 1.0, (subjects, 16))
    vectors = np.repeat(anatomy, slices, axis=0) + rng.normal(0.0, 0.5, (subjects * slices, 16))
    return vectors, np.repeat([f"{tag}-{index}" for index in range(subjects)], slices)


@pytest.mark.parametrize("slices", [1, 8])
def test_a_perfect_generator_reads_like_the_reference_at_matched_size(slices: int) -> None:
    # A perfect generator draws every image independently from the real image distribution, and it
    # delivers ten times more images than there are held-out subjects. With 8 slices per subject
    # the held-out slices are also clustered, as volumes are.
    config = EvaluateConfig(kid_subsets=5, match_repeats=20)
    matched_fid, coverage, recall, full_fid = [], [], [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        train, train_groups = _cohort(rng, 60, slices, "train")
        holdout, holdout_groups = _cohort(rng, 30, slices, "holdout")
        synthetic, _ = _cohort(rng, 300, 1, "perfect")
        section, _ = fidelity_in_space(
            SpaceFeatures(
                train=train,
                synthetic=synthetic,
                holdout=holdout,
                train_labels=np.zeros(len(train)),
                synthetic_labels=np.zeros(len(synthetic)),
                train_groups=train_groups,
                holdout_groups=holdout_groups,
            ),
            config,
            None,
        )
        matched = section["matched"]
        assert matched["n"] == matched["n_holdout_subjects"] == 30
        matched_fid.append(section["ratios"]["fid"])
        coverage.append(section["ratios"]["coverage"])
        recall.append(section["ratios"]["recall"])
        full_fid.append(section["fid"] / section["reference"]["fid"])
    assert np.mean(matched_fid) == pytest.approx(1.0, abs=0.1)
    assert np.mean(coverage) == pytest.approx(1.0, abs=0.1)
    assert np.mean(recall) == pytest.approx(1.0, abs=0.1)
    # Unmatched, the larger synthetic set reads as much better than real data.
    assert np.mean(full_fid) < 0.6


def test_matched_figures_are_null_with_a_reason_when_too_few_subjects_are_held_out() -> None:
    rng = np.random.default_rng(0)
    train, train_groups = _cohort(rng, 30, 4, "train")
    holdout, holdout_groups = _cohort(rng, 4, 4, "holdout")  # 16 images but 4 subjects: not more than k=5
    synthetic, _ = _cohort(rng, 50, 1, "synthetic")
    section, _ = fidelity_in_space(
        SpaceFeatures(train, synthetic, holdout, np.zeros(120), np.zeros(50), train_groups, holdout_groups),
        EvaluateConfig(kid_subsets=2, match_repeats=2),
        None,
    )
    assert section["matched"]["n"] == 4
    assert section["matched"]["coverage"] is None and "held-out subjects 4" in section["matched"]["coverage_reason"]
    assert section["ratios"]["coverage"] is None and section["ratios"]["coverage_reason"]
