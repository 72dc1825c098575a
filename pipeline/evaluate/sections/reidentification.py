"""The ``privacy.reidentification`` block: can a patient re-identification network find training patients?

A siamese network learns, on the real training split only, whether two images show the same
patient (:mod:`pipeline.evaluate.attacks`). Each synthetic image is scored by its best match among
the training patients; the null is the same score of the held-out real images, which the network
never saw and whose patients are not in the training split. If the generator reproduces training
patients, its images match them better than held-out patients do (AUC above 0.5; TPR at low FPR
shows whether a few patients are exposed even when the AUC is not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.evaluate.attacks import reidentification, tpr_at_fpr, train_siamese, verification_auc
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.privacy import auc
from pipeline.evaluate.sections.common import number, put
from pipeline.evaluate.seeds import purpose_seed
from pipeline.evaluate.utility import bootstrap_weights, interval, roc_auc
from pipeline.imaging.images import ImageSet

__all__ = ["ReidResult", "reidentification_block", "ATTACK_NAME"]

ATTACK_NAME = "reidentification"
_FPRS: tuple[tuple[str, float], ...] = (("tpr_at_1pct_fpr", 0.01), ("tpr_at_10pct_fpr", 0.10))


@dataclass
class ReidResult:
    """The report block, the closest matches for report.html, and the scores behind them.

    Attributes:
        block: ``privacy.reidentification``.
        pairs: the synthetic images that match a training patient best, beside that patient's image.
        synthetic_scores, holdout_scores: per image (None when the attack did not run); the scores
            of ``privacy.mia_attacks.reidentification`` (synthetic images in the role of members).
        weights: (resamples, synthetic + held-out images) bootstrap weights of the interval:
            synthetic images each their own unit, held-out images by subject.
    """

    block: dict[str, Any]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    synthetic_scores: np.ndarray | None = None
    holdout_scores: np.ndarray | None = None
    weights: np.ndarray | None = None


def reidentification_block(
    train: ImageSet, holdout: ImageSet, synthetic: ImageSet, config: EvaluateConfig, holdout_reason: str | None
) -> ReidResult:
    """Train the re-identification network on ``train`` and score ``synthetic`` against ``holdout``.

    Args:
        train: the real training split (the generator's patients; the network's training data).
        holdout: the real held-out images (the null: patients neither the generator nor the network saw).
        synthetic: the synthetic images.
        config: the ``evaluate`` section (``reid_*`` keys, ``bootstrap``, ``flagged_pairs_shown``).
        holdout_reason: why there is no usable held-out baseline (None: there is).
    """
    train_subjects, per_subject = np.unique(train.subject_ids.astype(str), return_counts=True)
    block: dict[str, Any] = {
        "method": (
            "siamese CNN trained on the real training split to tell same-patient from different-patient image "
            "pairs (Packhaeuser et al. 2022); score = highest same-patient probability of an image against any "
            "training image; synthetic images against held-out real images (never seen by the network)"
        ),
        "positives": (
            "two images of one training subject"
            if per_subject.size and per_subject.max() >= 2
            else "two jittered views of one image (every training subject has one image)"
        ),
        "n_train_subjects": int(train_subjects.size),
        "n_synthetic": len(synthetic),
        "n_holdout": len(holdout),
        "steps": config.reid_steps,
        "verification_auc_meaning": (
            "how well the network tells same- from different-patient pairs of held-out images (patients it never "
            "saw): near 0.5 it does not recognise patients, and a re-identification AUC near 0.5 then proves little"
        ),
    }
    keys = ("auc", "auc_ci_low", "auc_ci_high", *(key for key, _ in _FPRS))
    reason = holdout_reason
    if reason is None and train_subjects.size < 2:
        reason = f"the real training split has {train_subjects.size} subject(s); the attack needs at least 2"
    if reason is None and (len(holdout) == 0 or len(synthetic) == 0):
        reason = "needs held-out real and synthetic images"
    if reason is not None:
        for key in keys:
            put(block, key, None, reason)
        return ReidResult(block=block)

    network = train_siamese(
        train.images,
        train.subject_ids,
        width=config.reid_width,
        steps=config.reid_steps,
        batch_size=config.reid_batch_size,
        lr=config.classifier_lr,  # the recipe of the other small CNNs here
        seed=purpose_seed(config, "reid_network"),
    )
    put(
        block,
        "verification_auc",
        verification_auc(network, holdout.images, holdout.subject_ids),
        "every held-out subject has one image: no same-patient pair to check the network on",
    )
    fake = reidentification(network, train.images, train.subject_ids, synthetic.images)
    null = reidentification(network, train.images, train.subject_ids, holdout.images)
    value = auc(fake.score, null.score)
    rng = np.random.default_rng(purpose_seed(config, "reid_bootstrap"))
    # Each synthetic image is its own unit (it has no patient); held-out images are resampled by subject.
    weights = np.concatenate(
        [
            bootstrap_weights(synthetic.sample_ids, config.bootstrap, rng),
            bootstrap_weights(holdout.subject_ids, config.bootstrap, rng),
        ],
        axis=1,
    )
    truth = np.concatenate([np.ones(fake.score.size, int), np.zeros(null.score.size, int)])
    scores = np.concatenate([fake.score, null.score])
    low, high = interval(roc_auc(truth, np.stack([-scores, scores], axis=1), np.array([0, 1]), weights))
    put(block, "auc", value, None)
    block["auc_ci_low"], block["auc_ci_high"] = number(low), number(high)
    for key, fpr in _FPRS:
        put(block, key, tpr_at_fpr(fake.score, null.score, fpr), None)
    block["synthetic_score_median"] = number(np.median(fake.score))
    block["holdout_score_median"] = number(np.median(null.score))
    order = np.argsort(-fake.score, kind="stable")[: config.flagged_pairs_shown]
    block["closest_matches"] = [
        {
            "sample_id": str(synthetic.sample_ids[i]),
            "train_sample_id": str(train.sample_ids[fake.train_index[i]]),
            "score": float(fake.score[i]),
        }
        for i in order
    ]
    pairs = [
        {
            "synthetic": synthetic.images[i, 0],
            "train": train.images[fake.train_index[i], 0],
            "synthetic_id": str(synthetic.sample_ids[i]),
            "train_id": str(train.sample_ids[fake.train_index[i]]),
            "score": float(fake.score[i]),
        }
        for i in order
    ]
    return ReidResult(block=block, pairs=pairs, synthetic_scores=fake.score, holdout_scores=null.score, weights=weights)
