"""The ``privacy`` section: distances to the closest training record, memorization, membership inference, DP.

Distances are measured in pixel space (RMS difference of preprocessed images), the headline feature
space repeats them as a cross-check. The held-out real images are the baseline: a synthetic image
closer to a training image than all but a few percent of held-out images are counts as memorized,
and the memorization test compares that share with what held-out subjects read at the same
thresholds (:func:`pipeline.evaluate.privacy.memorization_test`). The attacks try to tell training
patients from held-out ones; each reports its AUC, its bounds, its true-positive rate at 1% and 10%
false-positive rate and its power at this held-out size, which the gates decide from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.contracts.model import ModelMeta
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.fidelity import standardize
from pipeline.evaluate.attacks import tpr_at_fpr
from pipeline.evaluate.privacy import (
    MemorizationTest,
    auc,
    auc_power,
    closest_records,
    distance_attack_scores,
    memorization,
    memorization_power,
    memorization_test,
)
from pipeline.evaluate.sections.common import number, put
from pipeline.evaluate.seeds import purpose_seed
from pipeline.evaluate.utility import bootstrap_weights, interval, roc_auc
from pipeline.imaging.images import ImageSet
from pipeline.imaging.neighbours import as_vectors

__all__ = [
    "PrivacyInputs",
    "PrivacyEvidence",
    "privacy_section",
    "memorization_figures",
    "attack_figures",
    "GATED_ATTACKS",
    "LOW_FPRS",
]

# Gated: the pixel-space distance attack (GAN-Leaks' full black-box setting) and, with a model, the
# discriminator (LOGAN). Feature-space attacks are reported as cross-checks only: their AUC under no
# leakage spreads about twice as wide (sd ~0.08 vs ~0.04 at 100 members, measured on the controlled
# cohort), and taking the maximum of many noisy attacks inflates the figure.
GATED_ATTACKS: tuple[str, ...] = ("blackbox_pixel", "whitebox_discriminator")
# False-positive rates at which each attack's true-positive rate is reported: what an attacker gets
# when they may wrongly accuse only a few patients (Carlini et al. 2022, "Membership inference
# attacks from first principles").
LOW_FPRS: tuple[tuple[str, float], ...] = (("tpr_at_1pct_fpr", 0.01), ("tpr_at_10pct_fpr", 0.10))


@dataclass(frozen=True)
class PrivacyInputs:
    """What the privacy section is measured on.

    Attributes:
        train: the real training split (the generator's members).
        holdout: the real held-out images (val + test), the non-members.
        synthetic: the synthetic images.
        features: the headline feature space's vectors of ``train``, ``holdout`` and ``synthetic``.
        space_name: the headline feature space's name.
        attack_features: the feature spaces the black-box attacks may use (name -> set -> vectors).
        holdout_reason: why there is no usable held-out baseline (None: there is).
        model_dir: the generator's folder (its discriminator is the white-box attack), or None.
        model: the generator's ``model.json`` (its DP record), or None.
    """

    train: ImageSet
    holdout: ImageSet
    synthetic: ImageSet
    features: dict[str, np.ndarray]
    space_name: str
    attack_features: dict[str, dict[str, np.ndarray]]
    holdout_reason: str | None
    model_dir: Path | None
    model: ModelMeta | None


@dataclass
class PrivacyEvidence:
    """The arrays behind report.html's privacy figures."""

    closest_pairs: list[dict[str, Any]] = field(default_factory=list)
    baseline_pair: dict[str, Any] | None = None
    dcr: dict[str, dict[str, Any]] = field(default_factory=dict)


def privacy_section(inputs: PrivacyInputs, config: EvaluateConfig) -> tuple[dict[str, Any], PrivacyEvidence]:
    """Measure the privacy section (without ``gate``, which the gates add)."""
    train, holdout, synthetic = inputs.train, inputs.holdout, inputs.synthetic
    features = inputs.features
    evidence = PrivacyEvidence()
    result: dict[str, Any] = {}
    train_v, synthetic_v = as_vectors(train.images), as_vectors(synthetic.images)
    scale = math.sqrt(train_v.shape[1])
    synthetic_close = closest_records(synthetic_v, train_v, scale)
    feature_scale = math.sqrt(features["train"].shape[1])
    synthetic_close_f = closest_records(features["synthetic"], features["train"], feature_scale)
    result["memorization_space"] = "pixel"
    result["distance"] = "RMS difference of preprocessed images ([-1, 1] intensity units)"
    result["memorization_percentile"] = config.memorization_percentile
    put(result, "dcr_synthetic_to_train", float(np.median(synthetic_close.distance)), None)
    result["dcr_synthetic_to_train_p05"] = number(np.percentile(synthetic_close.distance, 5))
    result["n_train"], result["n_holdout"], result["n_synthetic"] = len(train), len(holdout), len(synthetic)
    result["n_train_subjects"] = int(np.unique(train.subject_ids.astype(str)).size)
    result["n_holdout_subjects"] = int(np.unique(holdout.subject_ids.astype(str)).size)
    order = np.argsort(synthetic_close.distance, kind="stable")
    evidence.closest_pairs = [
        _pair(synthetic, int(i), train, int(synthetic_close.index[i]), float(synthetic_close.distance[i]))
        for i in order[: config.flagged_pairs_shown]
    ]
    feature_block: dict[str, Any] = {"feature_space": inputs.space_name}
    put(feature_block, "dcr_synthetic_to_train", float(np.median(synthetic_close_f.distance)), None)
    if inputs.holdout_reason is not None:
        for key in ("memorization_rate", "memorization_threshold", "memorization_excess", "dcr_holdout_to_train", "mia_auc"):
            put(result, key, None, inputs.holdout_reason)
        for key in ("memorization_rate", "dcr_holdout_to_train", "mia_auc"):
            put(feature_block, key, None, inputs.holdout_reason)
        result["flagged"] = []
        result["feature"] = feature_block
        result["mia_attacks"] = {}
        _dp_record(inputs.model, result)
        return result, evidence

    holdout_v = as_vectors(holdout.images)
    holdout_close = closest_records(holdout_v, train_v, scale)
    test = memorization_test(
        synthetic_close.distance,
        holdout_close.distance,
        holdout.subject_ids,
        synthetic.subject_ids,
        config.memorization_percentile,
        config.gates.privacy_alpha,
    )
    result.update(memorization_figures(test, config))
    threshold, flags = test.threshold, test.flags
    put(result, "dcr_holdout_to_train", float(np.median(holdout_close.distance)), None)
    result["dcr_holdout_to_train_p05"] = number(np.percentile(holdout_close.distance, 5))
    flagged_index = np.flatnonzero(flags)
    flagged_index = flagged_index[np.argsort(synthetic_close.distance[flagged_index], kind="stable")]
    result["flagged"] = [
        {
            "sample_id": str(synthetic.sample_ids[i]),
            "distance": float(synthetic_close.distance[i]),
            "nearest_train_sample_id": str(train.sample_ids[synthetic_close.index[i]]),
            "threshold": threshold,
        }
        for i in flagged_index
    ]
    result["n_flagged"] = int(flagged_index.size)
    base = int(np.argmin(holdout_close.distance))
    evidence.baseline_pair = _pair(
        holdout, base, train, int(holdout_close.index[base]), float(holdout_close.distance[base])
    )
    holdout_close_f = closest_records(features["holdout"], features["train"], feature_scale)
    rate_f, threshold_f, _ = memorization(
        synthetic_close_f.distance, holdout_close_f.distance, config.memorization_percentile
    )
    put(feature_block, "memorization_rate", rate_f, None)
    put(feature_block, "memorization_threshold", threshold_f, None)
    put(feature_block, "dcr_holdout_to_train", float(np.median(holdout_close_f.distance)), None)
    evidence.dcr = {
        "pixel": {
            "synthetic": synthetic_close.distance,
            "holdout": holdout_close.distance,
            "threshold": threshold,
            "title": "pixel space (RMS difference)",
        },
        inputs.space_name: {
            "synthetic": synthetic_close_f.distance,
            "holdout": holdout_close_f.distance,
            "threshold": threshold_f,
            "title": f"feature space {inputs.space_name}",
        },
    }
    attacks = _attacks(inputs, config, train_v, holdout_v, synthetic_v, scale)
    strongest = max((name for name in attacks if attacks[name]["gated"]), key=lambda name: attacks[name]["auc"])
    put(result, "mia_auc", attacks[strongest]["auc"], None)
    result["mia_auc_ci_low"] = attacks[strongest]["auc_ci_low"]
    result["mia_auc_ci_high"] = attacks[strongest]["auc_ci_high"]
    for key, _ in LOW_FPRS:
        result[f"mia_{key}"] = attacks[strongest][key]
    result["mia_attack"] = strongest
    result["mia_attacks"] = attacks
    result["feature"] = feature_block
    _dp_record(inputs.model, result)
    return result, evidence


def memorization_figures(test: MemorizationTest, config: EvaluateConfig) -> dict[str, Any]:
    """The memorization test's figures for the report (what the gate decides from), with its power.

    ``memorization_rate`` is the share of synthetic images below the held-out percentile;
    ``memorization_null_rate`` what a fresh held-out subject reads at this held-out size;
    ``memorization_excess`` the difference at matched thresholds, the figure the gate judges.
    """
    gates = config.gates
    power = memorization_power(test, gates.max_memorization_excess, gates.privacy_alpha, gates.privacy_power)
    figures = {
        "memorization_rate": number(test.rate),
        "memorization_rate_ci_low": number(test.rate_ci[0]),
        "memorization_rate_ci_high": number(test.rate_ci[1]),
        "memorization_threshold": number(test.threshold),
        "memorization_null_rate": number(test.null_rate),
        "memorization_excess": number(test.excess),
        "memorization_excess_se": number(test.excess_se),
        "memorization_excess_ci_low": number(test.excess_ci[0]),
        "memorization_excess_ci_high": number(test.excess_ci[1]),
        "memorization_excess_upper": number(test.excess_upper),
        "memorization_p_value": number(test.p_value),
        "memorization_detectable_excess": number(power.detectable),
        "memorization_powered": power.powered,
    }
    _put_count(figures, "memorization_subjects_needed", power.subjects_needed, power.limiting)
    return figures


def attack_figures(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    weights: np.ndarray,
    n_member_subjects: int,
    n_holdout_subjects: int,
    config: EvaluateConfig,
) -> dict[str, Any]:
    """One membership-inference attack: AUC with its bootstrap interval, bounds, power and TPR at low FPR.

    Args:
        member_scores: scores of the training images (higher = "member").
        nonmember_scores: scores of the held-out images.
        weights: (resamples, members + non-members) subject-bootstrap image weights.
        n_member_subjects: training subjects.
        n_holdout_subjects: held-out subjects.
        config: the evaluate section (bootstrap, alpha, power, the limit).
    """
    from scipy import stats

    gates = config.gates
    value = auc(member_scores, nonmember_scores)
    truth = np.concatenate([np.ones(member_scores.size, int), np.zeros(nonmember_scores.size, int)])
    scores = np.concatenate([member_scores, nonmember_scores])
    samples = roc_auc(truth, np.stack([-scores, scores], axis=1), np.array([0, 1]), weights)
    low, high = interval(samples)
    finite = samples[np.isfinite(samples)]
    se = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
    figures: dict[str, Any] = {"auc": value, "auc_ci_low": low, "auc_ci_high": high}
    for key, fpr in LOW_FPRS:
        figures[key] = tpr_at_fpr(member_scores, nonmember_scores, fpr)
    figures["n_members"], figures["n_nonmembers"] = int(member_scores.size), int(nonmember_scores.size)
    if not math.isfinite(se) or se <= 0.0:
        put(figures, "auc_se", None, "the subject bootstrap gave no spread (too few subjects)")
        return figures
    z_two = float(stats.norm.ppf(1.0 - gates.privacy_alpha / 2.0))
    z = float(stats.norm.ppf(1.0 - gates.privacy_alpha))
    power = auc_power(se, n_member_subjects, n_holdout_subjects, gates.max_mia_auc, gates.privacy_alpha, gates.privacy_power)
    figures.update(
        {
            "auc_se": se,
            "auc_lower": value - z_two * se,
            "auc_upper": value + z * se,
            "p_value": float(stats.norm.sf((value - 0.5) / se)),
            "detectable_auc": power.detectable,
            "powered": power.powered,
        }
    )
    _put_count(figures, "subjects_needed", power.subjects_needed, power.limiting)
    return figures


def _put_count(target: dict[str, Any], key: str, value: int | None, reason: str | None) -> None:
    """A count (an int, not a float like :func:`put` writes), or null with ``<key>_reason`` beside it."""
    target[key] = value
    if value is None:
        target[f"{key}_reason"] = reason or "not reachable"


def _pair(images: ImageSet, index: int, train: ImageSet, train_index: int, distance: float) -> dict[str, Any]:
    """An image and its closest training image, for report.html's side-by-side figure."""
    return {
        "synthetic": images.images[index, 0],
        "train": train.images[train_index, 0],
        "synthetic_id": str(images.sample_ids[index]),
        "train_id": str(train.sample_ids[train_index]),
        "distance": distance,
    }


def _attacks(
    inputs: PrivacyInputs,
    config: EvaluateConfig,
    train_v: np.ndarray,
    holdout_v: np.ndarray,
    synthetic_v: np.ndarray,
    scale: float,
) -> dict[str, dict[str, Any]]:
    """Every membership-inference attack's AUC with a subject-bootstrap 95% interval, and whether it is gated."""
    members = {
        "blackbox_pixel": (
            distance_attack_scores(train_v, synthetic_v, scale=scale),
            distance_attack_scores(holdout_v, synthetic_v, scale=scale),
        ),
    }
    for name, space_features in inputs.attack_features.items():
        # Re-scaled with the synthetic set's statistics (all an attacker holds): a scaling fitted on
        # the members themselves would set members and non-members apart by construction.
        synthetic_a, train_a, holdout_a = standardize(
            space_features["synthetic"], space_features["train"], space_features["holdout"]
        )
        attack_scale = math.sqrt(train_a.shape[1])
        members[f"blackbox_feature_{name}"] = (
            distance_attack_scores(train_a, synthetic_a, scale=attack_scale),
            distance_attack_scores(holdout_a, synthetic_a, scale=attack_scale),
        )
    if inputs.model_dir is not None and inputs.model is not None:
        members["whitebox_discriminator"] = _discriminator_scores(
            inputs.model_dir, inputs.model, inputs.train, inputs.holdout
        )
    rng = np.random.default_rng(purpose_seed(config, "mia_bootstrap"))
    groups = np.concatenate([inputs.train.subject_ids, inputs.holdout.subject_ids])
    weights = bootstrap_weights(groups, config.bootstrap, rng)
    n_members = int(np.unique(inputs.train.subject_ids.astype(str)).size)
    n_holdout = int(np.unique(inputs.holdout.subject_ids.astype(str)).size)
    attacks: dict[str, dict[str, Any]] = {}
    for name, (member_scores, nonmember_scores) in members.items():
        attacks[name] = attack_figures(member_scores, nonmember_scores, weights, n_members, n_holdout, config)
        attacks[name]["gated"] = name in GATED_ATTACKS
    return attacks


def _discriminator_scores(
    model_dir: Path, model: ModelMeta, train: ImageSet, holdout: ImageSet
) -> tuple[np.ndarray, np.ndarray]:
    """LOGAN (Hayes et al. 2019): the discriminator scores its training members higher."""
    from pipeline.imaging.model_dir import load_discriminator

    discriminator = load_discriminator(model_dir)
    index = {str(label): i for i, label in enumerate(model.labels)}

    def scores(images: ImageSet) -> np.ndarray:
        ids = torch.as_tensor([index.get(str(label), 0) for label in images.labels], dtype=torch.long)
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), 256):
                batch = torch.from_numpy(np.ascontiguousarray(images.images[start : start + 256]))
                out.append(discriminator(batch, ids[start : start + 256]).reshape(-1).double().numpy())
        return np.concatenate(out)

    return scores(train), scores(holdout)


def _dp_record(model: ModelMeta | None, result: dict[str, Any]) -> None:
    """``epsilon`` and ``delta`` of the generator's DP accountant (null with the reason without one)."""
    if model is None:
        reason = "no model directory given (--model): the DP accountant is read from the model"
        put(result, "epsilon", None, reason)
        put(result, "delta", None, reason)
        return
    if not model.dp:
        reason = "the model was trained without differential privacy"
        put(result, "epsilon", None, reason)
        put(result, "delta", None, reason)
        return
    put(result, "epsilon", model.dp.get("epsilon"), "the model's DP record has no epsilon")
    put(result, "delta", model.dp.get("delta"), "the model's DP record has no delta")
