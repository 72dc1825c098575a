"""Utility metrics: balanced accuracy and AUC with subject-level bootstrap intervals.

Images of one subject (slices of one volume) are not independent, so intervals come from a
**cluster bootstrap**: each resample draws subjects with replacement and weights their images by
the number of draws. All resamples are evaluated at once as weighted metrics (matrix products),
not in a Python loop over resamples.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = [
    "bootstrap_weights",
    "balanced_accuracy",
    "roc_auc",
    "interval",
    "accuracy",
]


def bootstrap_weights(groups: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, N) image weights: subjects drawn with replacement, weight = times drawn."""
    names, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    draws = rng.multinomial(names.size, np.full(names.size, 1.0 / names.size), size=resamples)
    return draws[:, inverse].astype(np.float64)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Plain accuracy."""
    return float((np.asarray(y_true) == np.asarray(y_pred)).mean())


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean per-class recall; ``weights`` (B, N) gives one value per resample, else a 0-d array.

    Classes absent from a resample are left out of its mean.
    """
    y_true = np.asarray(y_true)
    w = np.ones((1, y_true.size)) if weights is None else np.atleast_2d(weights)
    correct = (y_true == np.asarray(y_pred)).astype(np.float64)
    recalls = []
    for label in np.unique(y_true):
        member = (y_true == label).astype(np.float64)
        total = w @ member
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(total > 0, (w @ (member * correct)) / total, np.nan))
    values = _nanmean(np.stack(recalls))
    return values if weights is not None else values[0]


def _nanmean(stacked: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without some class: NaN, by design
        return np.nanmean(stacked, axis=0)


def _binary_auc(positive: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC per resample (ties count half), by ranks: O(B x N) time and memory.

    A positive-by-negative comparison matrix would be exact too but grows with the product of the
    two counts: on all pairs of a few hundred held-out slices (the re-identification network's
    verification AUC) that is billions of entries. Sorting once and summing the negatives' weights
    below each score gives the same figure.
    """
    positive = np.asarray(positive, dtype=bool)
    if not positive.any() or positive.all():
        return np.full(w.shape[0], np.nan)
    order = np.argsort(scores, kind="stable")
    ordered, positive, w = np.asarray(scores)[order], positive[order], w[:, order]
    w_pos, w_neg = w * positive, w * ~positive
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first index of each tied group
    group = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
    negatives = np.add.reduceat(w_neg, starts, axis=1)  # (B, groups): negative weight at each score
    below = np.cumsum(negatives, axis=1) - negatives  # negative weight strictly below each score
    numerator = (w_pos * (below[:, group] + 0.5 * negatives[:, group])).sum(axis=1)
    denominator = w_pos.sum(1) * w_neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def roc_auc(
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: np.ndarray,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """ROC AUC: binary on the second class's probability, else one-vs-rest macro average.

    Args:
        y_true: true class ids (N,).
        proba: (N, C) class probabilities.
        classes: the class ids of ``proba``'s columns.
        weights: (B, N) resample weights, or None for one value.
    """
    y_true = np.asarray(y_true)
    w = np.ones((1, y_true.size)) if weights is None else np.atleast_2d(weights)
    if len(classes) == 2:
        values = _binary_auc(y_true == classes[1], proba[:, 1], w)
    else:
        per_class = [_binary_auc(y_true == c, proba[:, i], w) for i, c in enumerate(classes) if (y_true == c).any()]
        values = _nanmean(np.stack(per_class))
    return values if weights is not None else values[0]


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of bootstrap samples (NaNs dropped); (None, None) if none are finite."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None, None
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)
