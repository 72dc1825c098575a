"""The ``fidelity`` section: synthetic vs real training images in one feature space.

FID, KID and precision/recall/density/coverage of the synthetic set, the same figures for the
held-out real images (the real-vs-real reference), the same figures again with both sides drawn at
one size counted in held-out subjects (``matched``), the ratios the gates read, and the figures per
class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.fidelity import fid, gaussian_fit, kid, prdc
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
    # Recall, coverage and FID depend on the number and independence of the compared images: they
    # are read at matched size (see _matched). Precision and density are means over the compared
    # images, so the full sets give the same expectation with less noise.
    for key in ("recall", "coverage", "fid"):
        put(
            ratios,
            key,
            ratio(matched.get(key), matched.get(f"reference_{key}")),
            holdout_reason or matched.get(f"reference_{key}_reason") or f"matched reference {key} is 0",
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


def _one_per_subject(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One randomly chosen image index per subject, subjects in a random order."""
    _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    order = rng.permutation(codes.size)  # the first image of each subject in a random order is a random one
    _, first = np.unique(codes[order], return_index=True)
    return rng.permutation(order[first])


def _matched(
    features: SpaceFeatures, config: EvaluateConfig, radii: np.ndarray | None, holdout_reason: str | None
) -> dict[str, Any]:
    """Synthetic and held-out real images against the training split at one size, counted in subjects.

    FID, KID, recall and coverage depend on how many images are compared, and on how independent
    they are: the slices of one volume are near-copies of each other, so all slices of 30 held-out
    subjects span less of the real distribution than 30 x 16 independent images would. A generator
    draws each image independently; the real draw that matches it is one image per subject. So each
    repeat takes one random image of every held-out subject (n = the number of held-out subjects)
    and n random synthetic images, and the figures are averaged over ``match_repeats`` repeats. A
    perfect generator then reads exactly like the reference, in expectation.
    """
    train, holdout, synthetic = features.train, features.holdout, features.synthetic
    train_groups = features.train_groups
    holdout_groups = features.holdout_groups
    k = config.k_nearest
    result: dict[str, Any] = {}
    subjects = units(holdout, holdout_groups) if holdout is not None else 0
    n = min(subjects, synthetic.shape[0])
    result["n"] = int(n)
    result["n_holdout_subjects"] = int(subjects)
    result["repeats"] = config.match_repeats
    result["rule"] = (
        "per repeat: one random image of each held-out subject and as many random synthetic images, "
        "both against all training images; figures averaged over the repeats"
    )
    keys = ("fid", "kid", "precision", "recall", "density", "coverage")
    too_few = holdout is None or units(train, train_groups) <= k
    if too_few or n <= k or radii is None:
        reason = holdout_reason or (
            f"needs more than k={k} held-out subjects and synthetic images (held-out subjects {subjects}, "
            f"synthetic images {synthetic.shape[0]})"
        )
        for key in keys:
            put(result, key, None, reason)
            put(result, f"reference_{key}", None, reason)
        return result
    groups = holdout_groups if holdout_groups is not None else np.arange(holdout.shape[0])
    rng = np.random.default_rng(purpose_seed(config, "matched"))
    train_fit = gaussian_fit(train)
    # KID's subsets are spread over the repeats: as many kernel evaluations as one full KID. At
    # n <= kid_subset_size one subset is the whole draw, and more would repeat it.
    subsets = 1 if n <= config.kid_subset_size else max(1, -(-config.kid_subsets // config.match_repeats))
    sums = dict.fromkeys([*keys, *(f"reference_{key}" for key in keys)], 0.0)
    for repeat in range(config.match_repeats):
        pick_real = _one_per_subject(groups, rng)[:n]
        pick_fake = rng.choice(synthetic.shape[0], n, replace=False)
        for prefix, compared in (("", synthetic[pick_fake]), ("reference_", holdout[pick_real])):
            sums[f"{prefix}fid"] += fid(train, compared, train_fit)
            sums[f"{prefix}kid"] += kid(
                train,
                compared,
                subsets=subsets,
                subset_size=config.kid_subset_size,
                seed=purpose_seed(config, "kid", repeat + 1),
            )[0]
            for key, value in prdc(train, compared, k, radii, train_groups).items():
                sums[f"{prefix}{key}"] += value
    for key, total in sums.items():
        put(result, key, total / config.match_repeats, None)
    return result
