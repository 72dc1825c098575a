"""Privacy: distance to closest record (DCR), memorization, and membership-inference AUCs.

Everything is measured against the real **training** split, with the real **held-out** images
(val + test, never seen by the generator) as the baseline: a synthetic image is "memorized" when it
lies closer to a training image than real held-out images typically do.

Distances in pixel space are root-mean-square differences of the preprocessed images (in units of
the [-1, 1] intensity scale), so they read the same at any image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.imaging.neighbours import Closest, closest_records, nearest

__all__ = [
    "Closest",
    "closest_records",
    "memorization",
    "auc",
    "distance_attack_scores",
    "MemorizationTest",
    "memorization_test",
    "Power",
    "memorization_power",
    "auc_null_variance",
    "auc_power",
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


# --------------------------------------------------------------------------------------------
# Calibrated decisions: the memorization test and the power of each privacy check
# --------------------------------------------------------------------------------------------

# Subject counts a "how many would be needed" search may propose (beyond it: not reachable this way).
_MAX_SUBJECTS = 100_000


@dataclass(frozen=True)
class MemorizationTest:
    """The memorization test against the exchangeable held-out null, by subject.

    A held-out subject is a fresh draw from the real distribution the generator never saw: an honest
    generator's images are, as far as their distance to the training split goes, exchangeable with it.
    For each held-out subject *j* the threshold is the held-out percentile **without** *j*
    (``tau_-j``); the share of *j*'s own images below ``tau_-j`` is what a fresh subject reads by
    chance, and the share of synthetic images below the same ``tau_-j`` is what the generator reads.
    Their difference, averaged over the held-out images, is the **excess**: 0 for an honest generator
    at any held-out size (the finite-sample bias of a small-sample percentile cancels, because both
    sides meet the same thresholds), and roughly the share of copies for a generator that copies.

    Attributes:
        rate: share of synthetic images below ``threshold`` (the percentile of all held-out images).
        threshold: that percentile.
        flags: per synthetic image, below ``threshold``.
        rate_ci: two-sided 95% interval of ``rate`` (clustered by synthetic subject ids).
        null_rate: share of held-out images below their leave-own-subject-out threshold: the
            finite-sample rate an honest generator reads at this held-out size.
        excess: synthetic minus held-out share at the same leave-one-subject-out thresholds.
        excess_se: its standard error (cluster-robust over held-out subjects, plus the synthetic side).
        excess_ci: two-sided ``1 - alpha`` interval of ``excess`` (t with ``df`` degrees of freedom): the
            evidence of a leak is this interval lying above 0.
        excess_upper: one-sided ``1 - alpha`` upper bound of ``excess``: a pass needs it within the limit.
        p_value: one-sided p-value of "no excess".
        df: degrees of freedom (held-out subjects - 1).
        holdout_variance: the held-out part of ``excess_se**2`` times the number of held-out subjects.
        synthetic_variance: the synthetic part of ``excess_se**2``.
        n_holdout_subjects: held-out subjects.
    """

    rate: float
    threshold: float
    flags: np.ndarray
    rate_ci: tuple[float, float]
    null_rate: float
    excess: float
    excess_se: float
    excess_ci: tuple[float, float]
    excess_upper: float
    p_value: float
    df: int
    holdout_variance: float
    synthetic_variance: float
    n_holdout_subjects: int


def _cluster_mean_variance(values: np.ndarray, groups: np.ndarray | None) -> float:
    """Variance of the mean of ``values`` (per image), cluster-robust over ``groups`` (None: independent)."""
    n = values.size
    if n < 2:
        return float("nan")
    if groups is None:
        return float(values.var(ddof=1) / n)
    _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    clusters = int(inverse.max()) + 1
    if clusters < 2:
        return float("nan")
    centred = np.bincount(inverse, weights=values - values.mean(), minlength=clusters)
    return float(clusters / (clusters - 1) * np.sum(centred**2) / n**2)


def memorization_test(
    synthetic_dcr: np.ndarray,
    holdout_dcr: np.ndarray,
    holdout_groups: np.ndarray,
    synthetic_groups: np.ndarray | None = None,
    percentile: float = 5.0,
    alpha: float = 0.05,
) -> MemorizationTest:
    """Test synthetic-to-train distances against the held-out null (see :class:`MemorizationTest`).

    Args:
        synthetic_dcr: distance of each synthetic image to its closest training image.
        holdout_dcr: the same for each held-out real image.
        holdout_groups: subject id of each held-out image (at least 2 subjects).
        synthetic_groups: subject (volume) id of each synthetic image, when several images share one.
        percentile: the held-out percentile a synthetic image must fall below to count as memorized.
        alpha: level of the two-sided interval and of the one-sided upper bound.
    """
    from scipy import stats

    synthetic_dcr = np.asarray(synthetic_dcr, dtype=np.float64)
    holdout_dcr = np.asarray(holdout_dcr, dtype=np.float64)
    names, inverse = np.unique(np.asarray(holdout_groups).astype(str), return_inverse=True)
    m = names.size
    if m < 2 or synthetic_dcr.size == 0:
        raise ValueError("the memorization test needs held-out images of at least 2 subjects and a synthetic image")
    threshold = float(np.percentile(holdout_dcr, percentile))
    flags = synthetic_dcr < threshold
    rate = float(flags.mean())

    loso = np.array([np.percentile(holdout_dcr[inverse != j], percentile) for j in range(m)])
    own = holdout_dcr < loso[inverse]  # each held-out image against the threshold without its subject
    ordered = np.sort(synthetic_dcr)
    synthetic_share = np.searchsorted(ordered, loso, side="left") / synthetic_dcr.size  # strictly below, per j
    n_j = np.bincount(inverse, minlength=m).astype(np.float64)
    weights = n_j / n_j.sum()
    own_share = np.bincount(inverse, weights=own.astype(np.float64), minlength=m) / n_j
    null_rate = float(np.sum(weights * own_share))
    differences = synthetic_share - own_share
    excess = float(np.sum(weights * differences))

    # Held-out side: cluster-robust over subjects, floored at the binomial variance of the nominal
    # rate (a small held-out set often has no image below its leave-one-out threshold at all, which
    # would otherwise read as zero variance).
    nominal = max(null_rate, percentile / 100.0)
    holdout_var = max(
        float(m / (m - 1) * np.sum((weights * (differences - excess)) ** 2)),
        nominal * (1.0 - nominal) / holdout_dcr.size,
    )
    synthetic_rate = float(np.sum(weights * synthetic_share))
    synthetic_floor = max(synthetic_rate, percentile / 100.0)
    synthetic_var = _cluster_mean_variance(flags.astype(np.float64), synthetic_groups)
    if not math.isfinite(synthetic_var):
        synthetic_var = 0.0
    synthetic_var = max(synthetic_var, synthetic_floor * (1.0 - synthetic_floor) / synthetic_dcr.size)
    se = math.sqrt(holdout_var + synthetic_var)
    df = m - 1
    t_one = float(stats.t.ppf(1.0 - alpha, df))
    t_two = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    p_value = float(stats.t.sf(excess / se, df)) if se > 0 else (0.0 if excess > 0 else 1.0)
    rate_se = math.sqrt(synthetic_var)
    return MemorizationTest(
        rate=rate,
        threshold=threshold,
        flags=flags,
        rate_ci=(max(0.0, rate - t_two * rate_se), min(1.0, rate + t_two * rate_se)),
        null_rate=null_rate,
        excess=excess,
        excess_se=se,
        excess_ci=(excess - t_two * se, excess + t_two * se),
        excess_upper=excess + t_one * se,
        p_value=p_value,
        df=df,
        holdout_variance=holdout_var * m,
        synthetic_variance=synthetic_var,
        n_holdout_subjects=m,
    )


@dataclass(frozen=True)
class Power:
    """What a privacy check can tell at this held-out size.

    Attributes:
        detectable: the smallest true effect (excess, or AUC) the check **fails** with ``power``: its
            two-sided ``1 - alpha`` interval above the null and its estimate above the limit.
        powered: a true effect at the limit would be significant with ``power``; only then can the
            check pass (otherwise an honest result is ``inconclusive``).
        subjects_needed: held-out subjects at which the check would be powered (None: not reachable by
            held-out subjects alone; ``limiting`` says what else is needed).
        limiting: why more held-out subjects alone do not suffice (None when they do).
    """

    detectable: float
    powered: bool
    subjects_needed: int | None
    limiting: str | None = None


def _critical(alpha: float, df: int | None) -> float:
    from scipy import stats

    return float(stats.t.ppf(1.0 - alpha, df)) if df is not None else float(stats.norm.ppf(1.0 - alpha))


def _power_z(power: float) -> float:
    from scipy import stats

    return float(stats.norm.ppf(power))


def memorization_power(test: MemorizationTest, limit: float, alpha: float = 0.05, power: float = 0.8) -> Power:
    """Power of the memorization test: the excess it detects, and the held-out subjects a pass needs.

    The held-out variance shrinks with the number of held-out subjects; the synthetic part does not
    (it shrinks with the number of synthetic images), so a large synthetic variance can make more
    held-out subjects useless on their own.
    """
    z = _power_z(power)
    se = test.excess_se
    t = _critical(alpha / 2.0, test.df)
    detectable = max(t * se, limit) + z * se

    def se_at(m: np.ndarray) -> np.ndarray:
        return np.sqrt(test.holdout_variance / m + test.synthetic_variance)

    powered = (t + z) * se <= limit
    needed, limiting = _subjects_needed(se_at, lambda m: _critical_vector(alpha / 2.0, m - 1), z, limit)
    if needed is None and (_critical(alpha / 2.0, None) + z) * math.sqrt(test.synthetic_variance) > limit:
        limiting = "the synthetic side alone is too noisy: evaluate more synthetic images"
    return Power(detectable=detectable, powered=powered, subjects_needed=needed, limiting=limiting)


def _critical_vector(alpha: float, df: np.ndarray) -> np.ndarray:
    from scipy import stats

    return stats.t.ppf(1.0 - alpha, df)


def _subjects_needed(se_at, critical_at, z: float, limit: float) -> tuple[int | None, str | None]:
    """Smallest held-out subject count m >= 2 with (critical(m) + z) * se(m) <= limit."""
    candidates = np.unique(np.concatenate([np.arange(2, 2001), np.geomspace(2000, _MAX_SUBJECTS, 400).astype(int)]))
    ok = (critical_at(candidates) + z) * se_at(candidates.astype(np.float64)) <= limit
    if not ok.any():
        return None, "more held-out subjects alone do not reach it"
    return int(candidates[np.argmax(ok)]), None


def auc_null_variance(n_members: float, n_nonmembers: float) -> float:
    """Variance of the AUC of two independent groups when the scores do not differ (Mann-Whitney)."""
    return (n_members + n_nonmembers + 1.0) / (12.0 * n_members * n_nonmembers)


def auc_power(
    auc_se: float,
    n_member_subjects: int,
    n_holdout_subjects: int,
    limit: float,
    alpha: float = 0.05,
    power: float = 0.8,
) -> Power:
    """Power of a membership-inference check from its subject-bootstrap standard error.

    The AUC's variance is modelled as Mann-Whitney's at the subject level times the design effect the
    bootstrap measured (slices of one subject are not independent), so it can be carried to another
    number of held-out subjects with the training subjects fixed.
    """
    z = _power_z(power)
    critical = _critical(alpha / 2.0, None)
    detectable = max(0.5 + critical * auc_se, limit) + z * auc_se
    powered = 0.5 + (critical + z) * auc_se <= limit
    base = auc_null_variance(n_member_subjects, n_holdout_subjects)
    design = auc_se**2 / base

    def se_at(m: np.ndarray) -> np.ndarray:
        return np.sqrt(design * auc_null_variance(n_member_subjects, m))

    needed, limiting = _subjects_needed(se_at, lambda m: np.full(m.shape, critical), z, limit - 0.5)
    if needed is None:
        limiting = f"with {n_member_subjects} training subjects, more held-out subjects alone do not reach it"
    return Power(detectable=detectable, powered=powered, subjects_needed=needed, limiting=limiting)
