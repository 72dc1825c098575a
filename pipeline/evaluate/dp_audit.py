"""Empirical audit of a DP guarantee: a membership attack on canary subjects and the epsilon it implies.

A mechanism that is (epsilon, delta)-DP bounds every membership test on one of its units: for any
decision rule, ``TPR <= exp(epsilon) * FPR + delta`` (and the same with the roles of members and
non-members swapped; Kairouz et al. 2015, Jagielski et al. 2020). An attack that observes TPR and
FPR on canaries therefore proves ``epsilon >= log((TPR - delta) / FPR)``. With a finite number of
canaries the rates are estimated: the bound uses the Clopper-Pearson lower limit of TPR and the
upper limit of FPR, with the confidence split over every threshold tried (Bonferroni), so the
reported figure is a lower bound at the stated confidence. It must never exceed the accountant's
epsilon; a few canaries give a loose bound (a few dozen per side cannot prove more than ~2-3).

The attack here is the white-box one the report runs (LOGAN, Hayes et al. 2019): the trained
discriminator's mean score over a canary subject's images; members are expected to score higher.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import beta

from pipeline.contracts.dataset import read_dataset
from pipeline.contracts.model import read_model_meta
from pipeline.imaging.model_dir import load_discriminator
from pipeline.imaging.preprocess import Preprocessor

__all__ = ["AuditResult", "clopper_pearson", "epsilon_lower_bound", "subject_scores"]


@dataclass(frozen=True)
class AuditResult:
    """The best bound an attack achieved on the canaries.

    Attributes:
        epsilon_lower_bound: epsilon proven at ``confidence`` (0 when the attack proves nothing).
        threshold: the score threshold that gave it (None when none proves anything).
        tpr: members at or above the threshold (observed share).
        fpr: non-members at or above it (observed share).
        members: member canaries.
        non_members: non-member canaries.
        delta: the delta the bound is computed at.
        confidence: the confidence of the bound (over all thresholds tried).
    """

    epsilon_lower_bound: float
    threshold: float | None
    tpr: float | None
    fpr: float | None
    members: int
    non_members: int
    delta: float
    confidence: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """The exact two-sided ``1 - alpha`` interval of a binomial proportion."""
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def epsilon_lower_bound(
    member_scores: np.ndarray, non_member_scores: np.ndarray, delta: float, confidence: float = 0.95
) -> AuditResult:
    """The largest epsilon the threshold attack proves at ``confidence``, over every threshold.

    Both directions are tried (members above the threshold, and non-members above it), as DP bounds
    both; the confidence is split over all thresholds and directions.

    Args:
        member_scores: the attack's score per member canary (higher: more likely a member).
        non_member_scores: its score per non-member canary.
        delta: the guarantee's delta.
        confidence: the confidence of the bound.
    """
    members = np.asarray(member_scores, dtype=float)
    others = np.asarray(non_member_scores, dtype=float)
    thresholds = np.unique(np.concatenate([members, others]))
    alpha = (1.0 - confidence) / max(1, 2 * len(thresholds))
    best = AuditResult(0.0, None, None, None, len(members), len(others), delta, confidence)
    for threshold in thresholds:
        for positives, negatives in ((members, others), (others, members)):
            hits, false = int((positives >= threshold).sum()), int((negatives >= threshold).sum())
            tpr_low = clopper_pearson(hits, len(positives), alpha)[0]
            fpr_high = clopper_pearson(false, len(negatives), alpha)[1]
            if tpr_low - delta <= 0 or fpr_high <= 0:
                continue
            bound = math.log((tpr_low - delta) / fpr_high)
            if bound > best.epsilon_lower_bound:
                best = AuditResult(
                    bound, float(threshold), hits / len(positives), false / len(negatives),
                    len(members), len(others), delta, confidence,
                )
    return best


def subject_scores(model_dir: str | Path, data: str | Path) -> dict[str, float]:
    """The trained discriminator's mean score over each subject's images of dataset ``data``.

    The images are preprocessed as the model's ``model.json`` says; each is scored with its own label.
    """
    meta = read_model_meta(model_dir)
    dataset = read_dataset(data)
    rows = dataset.manifest
    images, labels, ids = Preprocessor(meta.preprocess).dataset_images(dataset, rows)
    subject_of = dict(zip(rows["sample_id"].astype(str), rows["subject_id"].astype(str)))
    subjects = [subject_of.get(image_id, subject_of.get(image_id.rsplit("#z", 1)[0])) for image_id in ids]
    index = meta.label_index()
    discriminator = load_discriminator(model_dir)
    with torch.inference_mode():
        scores = discriminator(
            torch.from_numpy(np.ascontiguousarray(images)), torch.tensor([index[label] for label in labels])
        ).reshape(-1).double().numpy()
    totals: dict[str, list[float]] = {}
    for subject, score in zip(subjects, scores):
        totals.setdefault(str(subject), []).append(float(score))
    return {subject: float(np.mean(values)) for subject, values in totals.items()}
