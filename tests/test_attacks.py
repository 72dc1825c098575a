"""Privacy attacks: TPR at a fixed FPR against brute force; the re-identification attack on controlled cases."""

from __future__ import annotations

import numpy as np
import pytest

from _controlled import make_real_dataset, make_synthetic_dataset
from pipeline.evaluate.attacks import tpr_at_fpr
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.sections.reidentification import reidentification_block
from pipeline.imaging.images import ImageSet, load_image_sets


def _brute_force(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float:
    """Best TPR over every threshold (each observed score and +inf) whose FPR does not exceed ``fpr``."""
    best = 0.0
    for threshold in [*np.unique(np.concatenate([members, nonmembers])), np.inf]:
        if (nonmembers >= threshold).mean() <= fpr + 1e-12:
            best = max(best, float((members >= threshold).mean()))
    return best


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
def test_tpr_at_fpr_matches_brute_force_with_and_without_ties(fpr: float) -> None:
    rng = np.random.default_rng(0)
    for trial in range(60):
        n_members, n_nonmembers = rng.integers(1, 40), rng.integers(1, 120)
        if trial % 2:  # coarse scores: many ties within and across the groups
            members = rng.integers(0, 6, n_members).astype(float)
            nonmembers = rng.integers(0, 5, n_nonmembers).astype(float)
        else:
            members = rng.normal(0.7, 1.0, n_members)
            nonmembers = rng.normal(0.0, 1.0, n_nonmembers)
        assert tpr_at_fpr(members, nonmembers, fpr) == pytest.approx(_brute_force(members, nonmembers, fpr), abs=0)


def test_tpr_at_fpr_reads_exact_operating_points() -> None:
    nonmembers = np.arange(100, dtype=float)  # 0..99
    members = np.array([99.5, 98.5, 95.0, 89.5, 50.0])
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.4  # one false positive allowed (99): threshold above 98
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.2  # nothing at or above 99 may be flagged: only 99.5
    assert tpr_at_fpr(members, nonmembers, 0.1) == 0.8  # ten allowed: threshold above 89
    # A whole block of tied non-members cannot be split to reach the FPR exactly.
    assert tpr_at_fpr(np.array([1.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0, 0.0]), 0.25) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        tpr_at_fpr(np.array([]), nonmembers, 0.1)
    with pytest.raises(ValueError):
        tpr_at_fpr(members, nonmembers, 1.5)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageSet, ImageSet]:
    """A cohort of 4-slice volumes (40 training, 20 + 20 held-out subjects) and exact copies of its training slices."""
    root = tmp_path_factory.mktemp("reid")
    real = make_real_dataset(root / "real", per_class=40, size=32, slices=4, seed=0, fractions=(0.5, 0.25, 0.25))
    copies = make_synthetic_dataset(root / "copies", real, "identical")
    real_set, copies_set, _ = load_image_sets(real, copies)
    return real_set, copies_set


def test_reidentification_ranks_true_copies_of_training_patients_first(phantoms: tuple[ImageSet, ImageSet]) -> None:
    real, copies = phantoms
    train, holdout = real.split("train"), real.split("val", "test")
    result = reidentification_block(train, holdout, copies, EvaluateConfig(bootstrap=200), None)
    block = result.block
    assert block["positives"] == "two images of one training subject"
    # The network recognises patients it never saw: slices of one held-out volume pair up.
    assert block["verification_auc"] > 0.75
    assert block["auc"] > 0.95 and block["auc_ci_low"] > 0.9
    assert block["tpr_at_1pct_fpr"] > 0.8
    # The closest matches are the copies' own training patients, shown as image pairs.
    shown = result.pairs
    assert len(shown) == 8 and [pair["score"] for pair in shown] == sorted((p["score"] for p in shown), reverse=True)
    copied_subject = dict(zip(train.sample_ids.astype(str), train.subject_ids.astype(str)))
    by_id = dict(zip(copies.sample_ids.astype(str), range(len(copies))))
    for pair in shown:
        copy = copies.images[by_id[pair["synthetic_id"]]]
        assert np.array_equal(pair["synthetic"], copy[0]) and pair["train"].shape == pair["synthetic"].shape
        # An exact copy matches an image of the subject it was copied from.
        source = next(i for i, image in enumerate(train.images) if np.array_equal(image, copy))
        assert copied_subject[pair["train_id"]] == train.subject_ids[source]


def test_reidentification_reads_chance_on_held_out_real_images(phantoms: tuple[ImageSet, ImageSet]) -> None:
    real, _ = phantoms
    # Held-out real images in the role of synthetic ones: patients neither generator nor network saw.
    result = reidentification_block(
        real.split("train"), real.split("test"), real.split("val"), EvaluateConfig(bootstrap=200), None
    )
    block = result.block
    # Exchangeable by construction; the spread of this AUC over cohorts and seeds is about +-0.1.
    assert abs(block["auc"] - 0.5) < 0.15
    assert block["tpr_at_10pct_fpr"] < 0.35


def test_reidentification_without_a_baseline_is_null_with_the_reason(phantoms: tuple[ImageSet, ImageSet]) -> None:
    real, copies = phantoms
    result = reidentification_block(
        real.split("train"), real.split("test"), copies, EvaluateConfig(), "too few held-out"
    )
    assert result.block["auc"] is None and result.block["auc_reason"] == "too few held-out"
    assert result.pairs == [] and result.synthetic_scores is None
