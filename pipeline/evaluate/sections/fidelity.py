"""The ``fidelity`` section: synthetic vs real training images in one feature space.

FID, KID and precision/recall/density/coverage of the synthetic set, the same figures for the
held-out real images (the real-vs-real reference), recall and coverage at matched sizes, the ratios
the gates read, and the figures per class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.fidelity import fid, kid, prdc
from pipeline.evaluate.sections.common import put, number, ratio, units
from pipeline.evaluate.seeds import purpose_seed
from pipeline.imaging.neighbours import kth_neighbour_radius

__all__ = ["SpaceFeatures", "fidelity_in_space", "PRDC_KEYS"]

PRDC_KEYS: tuple[str, ...] = ("precision", "recall", "density", "coverage")


@dataclass(frozen=True)
class SpaceFeatures:
    """One feature space's vectors of the compared sets, with the labels and subjects behind them.

    ``holdout`` and ``holdout_groups`` are None when there is no usable real-vs-real baseline.
    Subjects matter because slices of one volume are not independent: k-NN balls of real images are
    sized by other subjects' images.
    """

    train: np.ndarray
    synthetic: np.ndarray
    holdout: np.ndarray | None
    train_labels: np.ndarray
    synthetic_labels: np.ndarray
    train_groups: np.ndarray
    holdout_groups: np.ndarray | None


def fidelity_in_space(
    features: SpaceFeatures, config: EvaluateConfig, holdout_reason: str | None
) -> tuple[dict[str, Any], dict[str, dict[str, float | None]]]:
    """FID/KID/PRDC of synthetic vs real train, the real-vs-real reference, matched ratios, per class.

    Returns:
        The section and, for report.html, the PRDC bars of the synthetic set and of the reference.
    """
    train, holdout, synthetic = features.train, features.holdout, features.synthetic
    k = config.k_nearest
    result: dict[str, Any] = {}
    radii = kth_neighbour_radius(train, k, features.train_groups) if train.shape[0] > k else None
    _fill_distribution(result, train, synthetic, config, radii, features.train_groups, None)
    reference: dict[str, Any] = {
        "n_real": int(train.shape[0]),
        "n_compared": int(holdout.shape[0]) if holdout is not None else 0,
    }
    if holdout is not None:
        _fill_distribution(reference, train, holdout, config, radii, features.train_groups, features.holdout_groups)
    else:
        for key in ("fid", "kid", *PRDC_KEYS):
            put(reference, key, None, holdout_reason)
    result["reference"] = reference
    matched = _matched(features, config, radii, holdout_reason)
    result["matched"] = matched
    ratios: dict[str, Any] = {}
    for key in ("precision", "density"):
        put(ratios, key, ratio(result.get(key), reference.get(key)), holdout_reason or f"reference {key} is 0")
    for key in ("recall", "coverage"):
        put(
            ratios,
            key,
            ratio(matched.get(key), matched.get(f"reference_{key}")),
            holdout_reason or f"reference {key} is 0",
        )
    result["ratios"] = ratios
    per_class: dict[str, Any] = {}
    for label in sorted(set(features.train_labels.tolist())):
        entry: dict[str, Any] = {}
        members = features.train_labels == label
        _fill_distribution(
            entry,
            train[members],
            synthetic[features.synthetic_labels == label],
            config,
            None,
            features.train_groups[members],
            None,
        )
        per_class[str(label)] = entry
    result["per_class"] = per_class
    bars = {
        "synthetic": {key: result.get(key) for key in PRDC_KEYS},
        "held-out real (reference)": {key: reference.get(key) for key in PRDC_KEYS},
    }
    return result, bars


def _fill_distribution(
    target: dict[str, Any],
    real: np.ndarray,
    fake: np.ndarray,
    config: EvaluateConfig,
    radii: np.ndarray | None,
    real_groups: np.ndarray | None,
    fake_groups: np.ndarray | None,
) -> None:
    """FID, KID and PRDC of ``fake`` against ``real`` into ``target`` (nulls with reasons when too few)."""
    target["n_real"], target["n_compared"] = int(real.shape[0]), int(fake.shape[0])
    few = f"needs at least 2 images per side (real {real.shape[0]}, compared {fake.shape[0]})"
    if real.shape[0] >= 2 and fake.shape[0] >= 2:
        put(target, "fid", fid(real, fake), None)
        mean, std, size = kid(
            real,
            fake,
            subsets=config.kid_subsets,
            subset_size=config.kid_subset_size,
            seed=purpose_seed(config, "kid"),
        )
        put(target, "kid", mean, None)
        target["kid_std"] = number(std)
        target["kid_subset_size"] = size
    else:
        put(target, "fid", None, few)
        put(target, "kid", None, few)
    k = config.k_nearest
    real_units, fake_units = units(real, real_groups), units(fake, fake_groups)
    if real_units > k and fake_units > k:
        for key, value in prdc(real, fake, k, radii, real_groups, fake_groups).items():
            put(target, key, value, None)
    else:
        reason = (
            f"k-NN manifolds need more than k={k} subjects per side (real {real_units}, compared {fake_units}); "
            "lower evaluate.k_nearest or add subjects"
        )
        for key in PRDC_KEYS:
            put(target, key, None, reason)


def _matched(
    features: SpaceFeatures, config: EvaluateConfig, radii: np.ndarray | None, holdout_reason: str | None
) -> dict[str, Any]:
    """Recall and coverage grow with the compared set's size: compare at one size, averaged over draws."""
    train, holdout, synthetic = features.train, features.holdout, features.synthetic
    train_groups, holdout_groups = features.train_groups, features.holdout_groups
    k = config.k_nearest
    result: dict[str, Any] = {}
    n = min(synthetic.shape[0], holdout.shape[0]) if holdout is not None else 0
    result["n"] = int(n)
    too_few = holdout is None or min(units(train, train_groups), units(holdout, holdout_groups)) <= k
    if too_few or n <= k or radii is None:
        reason = holdout_reason or f"needs more than k={k} images in each compared set"
        for key in ("recall", "coverage", "reference_recall", "reference_coverage"):
            put(result, key, None, reason)
        return result
    rng = np.random.default_rng(purpose_seed(config, "matched"))
    sums = {"recall": 0.0, "coverage": 0.0, "reference_recall": 0.0, "reference_coverage": 0.0}
    for _ in range(config.match_repeats):
        fake = prdc(train, synthetic[rng.choice(synthetic.shape[0], n, replace=False)], k, radii, train_groups)
        pick = rng.choice(holdout.shape[0], n, replace=False)
        groups = holdout_groups[pick] if holdout_groups is not None else None
        ref = prdc(train, holdout[pick], k, radii, train_groups, groups)
        sums["recall"] += fake["recall"]
        sums["coverage"] += fake["coverage"]
        sums["reference_recall"] += ref["recall"]
        sums["reference_coverage"] += ref["coverage"]
    for key, total in sums.items():
        put(result, key, total / config.match_repeats, None)
    return result
