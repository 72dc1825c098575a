"""Privacy: distance to closest record (DCR), memorization, and membership-inference AUCs.

Everything is measured against the real **training** split, with the real **held-out** images
(val + test, never seen by the generator) as the baseline: a synthetic image is "memorized" when it
lies closer to a training image than real held-out images typically do (DESIGN.md).

Distances in pixel space are root-mean-square differences of the preprocessed images (in units of
the [-1, 1] intensity scale), so they read the same at any image size.
"""

from __future__ import annotations

import numpy as np

from pipeline.imaging.neighbours import Closest, closest_records, nearest

__all__ = [
    "Closest",
    "closest_records",
    "memorization",
    "auc",
    "distance_attack_scores",
]


def memorization(
    synthetic_dcr: np.ndarray,
    holdout_dcr: np.ndarray,
    percentile: float = 5.0,
) -> tuple[float, float, np.ndarray]:
    """Share of synthetic images closer to training than the held-out ``percentile``.

    Returns:
        (rate, threshold, boolean flag per synthetic image). By construction ~percentile/100 of
        held-out images fall under the threshold, so an honest generator reads near that baseline.
    """
    threshold = float(np.percentile(holdout_dcr, percentile))
    flags = synthetic_dcr < threshold
    return float(flags.mean()), threshold, flags


def auc(scores_positive: np.ndarray, scores_negative: np.ndarray) -> float:
    """ROC AUC that ``positive`` scores exceed ``negative`` ones (ties count half): Mann-Whitney U."""
    positive = np.asarray(scores_positive, dtype=np.float64)
    negative = np.asarray(scores_negative, dtype=np.float64)
    if positive.size == 0 or negative.size == 0:
        raise ValueError("AUC needs scores in both groups")
    combined = np.concatenate([positive, negative])
    order = combined.argsort(kind="mergesort")
    ranks = np.empty(combined.size)
    sorted_values = combined[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    u = ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2.0
    return float(u / (positive.size * negative.size))


def distance_attack_scores(real: np.ndarray, synthetic: np.ndarray, k: int = 1, scale: float = 1.0) -> np.ndarray:
    """Black-box membership score of each real image: minus its mean distance to the k nearest synthetic ones.

    GAN-Leaks (Chen et al. 2020) / Hilprecht et al. 2019: a generator that memorized its training
    images places synthetic samples nearer to members than to non-members, so a higher score
    means "more likely a member".
    """
    distances, _ = nearest(real, synthetic, k=k)
    return -distances.mean(axis=1).astype(np.float64) / scale
