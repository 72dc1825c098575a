"""The evaluate stage: real + synthetic datasets -> report.json + report.html (+ MLflow).

:func:`run` reads both datasets, brings them onto one grid (:mod:`pipeline.imaging.images`),
computes fidelity, diversity, privacy and utility (:func:`evaluate_sets`), decides the gates, writes
the report and logs it. :func:`evaluate_sets` works on in-memory image sets, so notebooks and tests
can call it without files.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.contracts.dataset import Dataset, read_dataset
from pipeline.core.errors import InputError
from pipeline.evaluate import gates as gate_rules
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.diversity import (
    ms_ssim_pairs,
    ms_ssim_settings,
    same_class_pairs,
)
from pipeline.evaluate.features import (
    FeatureSpace,
    random_space,
    trained_space,
    user_space,
)
from pipeline.evaluate.fidelity import fid, kid, prdc, standardize
from pipeline.imaging.images import ImageSet, load_image_sets
from pipeline.imaging.neighbours import as_vectors, kth_neighbour_radius
from pipeline.evaluate.networks import (
    ConvNet,
    TrainingJob,
    embed,
    predict_proba,
    train_classifiers,
)
from pipeline.evaluate.privacy import (
    auc,
    closest_records,
    distance_attack_scores,
    memorization,
)
from pipeline.evaluate.utility import (
    accuracy,
    balanced_accuracy,
    bootstrap_weights,
    interval,
    roc_auc,
)
from pipeline.core.files import atomic_write_json, atomic_write_text
from pipeline.core.progress import progress as progress_bar
from pipeline.tracking import NullTracker, Tracker

__all__ = ["run", "evaluate_sets", "Evidence", "Evaluation", "headline_metrics", "summary_lines"]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
SCHEMA = "medsynth.evaluate/1"


@dataclass
class Evidence:
    """Arrays behind the report's figures (not written to report.json)."""

    grids: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    closest_pairs: list[dict[str, Any]] = field(default_factory=list)
    baseline_pair: dict[str, Any] | None = None
    dcr: dict[str, dict[str, Any]] = field(default_factory=dict)
    prdc: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    ms_ssim: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass
class Evaluation:
    """The report's four metric sections and gates, plus the evidence for report.html."""

    sections: dict[str, Any]
    evidence: Evidence


def _put(target: dict[str, Any], key: str, value: Any, reason: str | None) -> None:
    """Set ``target[key]``; a None value gets ``<key>_reason`` beside it."""
    target[key] = _number(value)
    if target[key] is None:
        target[f"{key}_reason"] = reason or "not measurable"


def _number(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    number = float(value)
    return number if math.isfinite(number) else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 1e-12:
        return None
    return value / reference


class _Steps:
    """Progress over the stage's phases (see :mod:`pipeline.core.progress`; silent unless asked)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = progress_bar(total, "evaluate", "step", enabled)

    def next(self, label: str) -> None:
        self.bar.set_postfix_str(label)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------- fidelity


def _fidelity_in_space(
    train: np.ndarray,
    holdout: np.ndarray | None,
    synthetic: np.ndarray,
    train_labels: np.ndarray,
    synthetic_labels: np.ndarray,
    config: EvaluateConfig,
    holdout_reason: str | None,
    train_groups: np.ndarray,
    holdout_groups: np.ndarray | None,
) -> tuple[dict[str, Any], dict[str, dict[str, float | None]]]:
    """FID/KID/PRDC of synthetic vs real train, the real-vs-real reference, matched ratios, per class.

    ``train_groups``/``holdout_groups`` are the subjects of the real images: k-NN balls of real
    images are sized by other subjects' images (slices of one volume are not independent).
    """
    k = config.k_nearest
    result: dict[str, Any] = {}
    radii = kth_neighbour_radius(train, k, train_groups) if train.shape[0] > k else None
    _fill_distribution(result, train, synthetic, config, radii, train_groups, None)
    reference: dict[str, Any] = {
        "n_real": int(train.shape[0]),
        "n_compared": int(holdout.shape[0]) if holdout is not None else 0,
    }
    if holdout is not None:
        _fill_distribution(reference, train, holdout, config, radii, train_groups, holdout_groups)
    else:
        for key in ("fid", "kid", "precision", "recall", "density", "coverage"):
            _put(reference, key, None, holdout_reason)
    result["reference"] = reference
    matched = _matched(train, holdout, synthetic, config, radii, holdout_reason, train_groups, holdout_groups)
    result["matched"] = matched
    ratios: dict[str, Any] = {}
    for key in ("precision", "density"):
        _put(ratios, key, _ratio(result.get(key), reference.get(key)), holdout_reason or f"reference {key} is 0")
    for key in ("recall", "coverage"):
        _put(
            ratios,
            key,
            _ratio(matched.get(key), matched.get(f"reference_{key}")),
            holdout_reason or f"reference {key} is 0",
        )
    result["ratios"] = ratios
    per_class: dict[str, Any] = {}
    for label in sorted(set(train_labels.tolist())):
        entry: dict[str, Any] = {}
        members = train_labels == label
        _fill_distribution(
            entry, train[members], synthetic[synthetic_labels == label], config, None, train_groups[members], None
        )
        per_class[str(label)] = entry
    result["per_class"] = per_class
    bars = {
        "synthetic": {key: result.get(key) for key in ("precision", "recall", "density", "coverage")},
        "held-out real (reference)": {
            key: reference.get(key) for key in ("precision", "recall", "density", "coverage")
        },
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
    target["n_real"], target["n_compared"] = int(real.shape[0]), int(fake.shape[0])
    few = f"needs at least 2 images per side (real {real.shape[0]}, compared {fake.shape[0]})"
    if real.shape[0] >= 2 and fake.shape[0] >= 2:
        _put(target, "fid", fid(real, fake), None)
        mean, std, size = kid(
            real, fake, subsets=config.kid_subsets, subset_size=config.kid_subset_size, seed=config.seed
        )
        _put(target, "kid", mean, None)
        target["kid_std"] = _number(std)
        target["kid_subset_size"] = size
    else:
        _put(target, "fid", None, few)
        _put(target, "kid", None, few)
    k = config.k_nearest
    real_units, fake_units = _units(real, real_groups), _units(fake, fake_groups)
    if real_units > k and fake_units > k:
        for key, value in prdc(real, fake, k, radii, real_groups, fake_groups).items():
            _put(target, key, value, None)
    else:
        reason = (
            f"k-NN manifolds need more than k={k} subjects per side (real {real_units}, compared {fake_units}); "
            "lower evaluate.k_nearest or add subjects"
        )
        for key in ("precision", "recall", "density", "coverage"):
            _put(target, key, None, reason)


def _units(points: np.ndarray, groups: np.ndarray | None) -> int:
    """Independent units of a set: subjects when grouped, else points."""
    return int(np.unique(groups.astype(str)).size) if groups is not None else int(points.shape[0])


def _matched(
    train: np.ndarray,
    holdout: np.ndarray | None,
    synthetic: np.ndarray,
    config: EvaluateConfig,
    radii: np.ndarray | None,
    holdout_reason: str | None,
    train_groups: np.ndarray,
    holdout_groups: np.ndarray | None,
) -> dict[str, Any]:
    """Recall and coverage grow with the compared set's size: compare at one size, averaged over draws."""
    k = config.k_nearest
    result: dict[str, Any] = {}
    n = min(synthetic.shape[0], holdout.shape[0]) if holdout is not None else 0
    result["n"] = int(n)
    too_few = holdout is None or min(_units(train, train_groups), _units(holdout, holdout_groups)) <= k
    if too_few or n <= k or radii is None:
        reason = holdout_reason or f"needs more than k={k} images in each compared set"
        for key in ("recall", "coverage", "reference_recall", "reference_coverage"):
            _put(result, key, None, reason)
        return result
    rng = np.random.default_rng(config.seed + 11)
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
        _put(result, key, total / config.match_repeats, None)
    return result


# --------------------------------------------------------------------------------------------- diversity


def _diversity(
    train: ImageSet, synthetic: ImageSet, config: EvaluateConfig
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    settings = ms_ssim_settings(tuple(train.images.shape[2:]))
    rng = np.random.default_rng(config.seed + 21)
    synthetic_pairs = same_class_pairs(synthetic.labels, np.arange(len(synthetic)), config.ms_ssim_pairs, rng)
    real_pairs = same_class_pairs(train.labels, train.subject_ids, config.ms_ssim_pairs, rng)
    per_class: dict[str, Any] = {}
    evidence: dict[str, dict[str, np.ndarray]] = {}
    synthetic_means, real_means = [], []
    for label in sorted(set(synthetic_pairs) | set(real_pairs)):
        entry: dict[str, Any] = {}
        values_syn = ms_ssim_pairs(synthetic.images, synthetic_pairs.get(label, np.zeros((0, 2), int)), settings)
        values_real = ms_ssim_pairs(train.images, real_pairs.get(label, np.zeros((0, 2), int)), settings)
        _put(
            entry,
            "ms_ssim",
            values_syn.mean() if values_syn.size else None,
            "fewer than 2 synthetic images of this class",
        )
        _put(
            entry,
            "ms_ssim_real",
            values_real.mean() if values_real.size else None,
            "no pair of real training images of this class from different subjects",
        )
        entry["pairs"], entry["pairs_real"] = int(values_syn.size), int(values_real.size)
        per_class[label] = entry
        evidence[label] = {"synthetic": values_syn, "real": values_real}
        if entry["ms_ssim"] is not None and entry["ms_ssim_real"] is not None:
            synthetic_means.append(entry["ms_ssim"])
            real_means.append(entry["ms_ssim_real"])
    result: dict[str, Any] = {}
    reason = "no class has both synthetic pairs and real pairs from different subjects"
    _put(result, "ms_ssim", float(np.mean(synthetic_means)) if synthetic_means else None, reason)
    _put(result, "ms_ssim_real", float(np.mean(real_means)) if real_means else None, reason)
    excess = result["ms_ssim"] - result["ms_ssim_real"] if synthetic_means else None
    _put(result, "ms_ssim_excess", excess, reason)
    result["per_class"] = per_class
    result["ms_ssim_settings"] = settings.record()
    return result, evidence


# --------------------------------------------------------------------------------------------- privacy


def _privacy(
    train: ImageSet,
    holdout: ImageSet,
    synthetic: ImageSet,
    features: dict[str, np.ndarray],
    space: FeatureSpace,
    attack_features: dict[str, dict[str, np.ndarray]],
    config: EvaluateConfig,
    holdout_reason: str | None,
    model_dir: Path | None,
    model: dict[str, Any] | None,
    evidence: Evidence,
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    train_v, synthetic_v = as_vectors(train.images), as_vectors(synthetic.images)
    scale = math.sqrt(train_v.shape[1])
    synthetic_close = closest_records(synthetic_v, train_v, scale)
    feature_scale = math.sqrt(features["train"].shape[1])
    synthetic_close_f = closest_records(features["synthetic"], features["train"], feature_scale)
    result["memorization_space"] = "pixel"
    result["distance"] = "RMS difference of preprocessed images ([-1, 1] intensity units)"
    result["memorization_percentile"] = config.memorization_percentile
    _put(result, "dcr_synthetic_to_train", float(np.median(synthetic_close.distance)), None)
    result["dcr_synthetic_to_train_p05"] = _number(np.percentile(synthetic_close.distance, 5))
    result["n_train"], result["n_holdout"], result["n_synthetic"] = len(train), len(holdout), len(synthetic)
    result["n_train_subjects"] = int(np.unique(train.subject_ids.astype(str)).size)
    result["n_holdout_subjects"] = int(np.unique(holdout.subject_ids.astype(str)).size)
    order = np.argsort(synthetic_close.distance, kind="stable")
    evidence.closest_pairs = [
        {
            "synthetic": synthetic.images[i, 0],
            "train": train.images[synthetic_close.index[i], 0],
            "synthetic_id": str(synthetic.sample_ids[i]),
            "train_id": str(train.sample_ids[synthetic_close.index[i]]),
            "distance": float(synthetic_close.distance[i]),
        }
        for i in order[: config.flagged_pairs_shown]
    ]
    feature_block: dict[str, Any] = {"feature_space": space.name}
    _put(feature_block, "dcr_synthetic_to_train", float(np.median(synthetic_close_f.distance)), None)
    if holdout_reason is not None:
        for key in ("memorization_rate", "memorization_threshold", "dcr_holdout_to_train", "mia_auc"):
            _put(result, key, None, holdout_reason)
        for key in ("memorization_rate", "dcr_holdout_to_train", "mia_auc"):
            _put(feature_block, key, None, holdout_reason)
        result["flagged"] = []
        result["feature"] = feature_block
        result["mia_attacks"] = {}
        return result
    holdout_v = as_vectors(holdout.images)
    holdout_close = closest_records(holdout_v, train_v, scale)
    rate, threshold, flags = memorization(
        synthetic_close.distance, holdout_close.distance, config.memorization_percentile
    )
    _put(result, "memorization_rate", rate, None)
    _put(result, "memorization_threshold", threshold, None)
    _put(result, "dcr_holdout_to_train", float(np.median(holdout_close.distance)), None)
    result["dcr_holdout_to_train_p05"] = _number(np.percentile(holdout_close.distance, 5))
    result["memorization_baseline_rate"] = config.memorization_percentile / 100.0
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
    evidence.baseline_pair = {
        "synthetic": holdout.images[base, 0],
        "train": train.images[holdout_close.index[base], 0],
        "synthetic_id": str(holdout.sample_ids[base]),
        "train_id": str(train.sample_ids[holdout_close.index[base]]),
        "distance": float(holdout_close.distance[base]),
    }
    holdout_close_f = closest_records(features["holdout"], features["train"], feature_scale)
    rate_f, threshold_f, _ = memorization(
        synthetic_close_f.distance, holdout_close_f.distance, config.memorization_percentile
    )
    _put(feature_block, "memorization_rate", rate_f, None)
    _put(feature_block, "memorization_threshold", threshold_f, None)
    _put(feature_block, "dcr_holdout_to_train", float(np.median(holdout_close_f.distance)), None)
    evidence.dcr = {
        "pixel": {
            "synthetic": synthetic_close.distance,
            "holdout": holdout_close.distance,
            "threshold": threshold,
            "title": "pixel space (RMS difference)",
        },
        space.name: {
            "synthetic": synthetic_close_f.distance,
            "holdout": holdout_close_f.distance,
            "threshold": threshold_f,
            "title": f"feature space {space.name}",
        },
    }
    attacks: dict[str, Any] = {}
    members = {
        "blackbox_pixel": (
            distance_attack_scores(train_v, synthetic_v, scale=scale),
            distance_attack_scores(holdout_v, synthetic_v, scale=scale),
        ),
    }
    for name, space_features in attack_features.items():
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
    if model_dir is not None and model is not None:
        members["whitebox_discriminator"] = _discriminator_scores(model_dir, model, train, holdout)
    rng = np.random.default_rng(config.seed + 31)
    groups = np.concatenate([train.subject_ids, holdout.subject_ids])
    weights = bootstrap_weights(groups, config.bootstrap, rng)
    for name, (member_scores, nonmember_scores) in members.items():
        value = auc(member_scores, nonmember_scores)
        truth = np.concatenate([np.ones(member_scores.size, int), np.zeros(nonmember_scores.size, int)])
        scores = np.concatenate([member_scores, nonmember_scores])
        samples = roc_auc(truth, np.stack([-scores, scores], axis=1), np.array([0, 1]), weights)
        low, high = interval(samples)
        attacks[name] = {"auc": value, "auc_ci_low": low, "auc_ci_high": high}
    # Gated: the pixel-space distance attack (GAN-Leaks' full black-box setting) and, with a model,
    # the discriminator (LOGAN). Feature-space attacks are reported as cross-checks only: their AUC
    # under no leakage spreads about twice as wide (sd ~0.08 vs ~0.04 at 100 members, measured on
    # the controlled cohort), and taking the maximum of many noisy attacks inflates the figure.
    for name, attack in attacks.items():
        attack["gated"] = name in ("blackbox_pixel", "whitebox_discriminator")
    strongest = max((name for name in attacks if attacks[name]["gated"]), key=lambda name: attacks[name]["auc"])
    _put(result, "mia_auc", attacks[strongest]["auc"], None)
    result["mia_auc_ci_low"] = attacks[strongest]["auc_ci_low"]
    result["mia_auc_ci_high"] = attacks[strongest]["auc_ci_high"]
    result["mia_attack"] = strongest
    result["mia_attacks"] = attacks
    result["feature"] = feature_block
    return result


def _discriminator_scores(
    model_dir: Path, model: dict[str, Any], train: ImageSet, holdout: ImageSet
) -> tuple[np.ndarray, np.ndarray]:
    """LOGAN (Hayes et al. 2019): the discriminator scores its training members higher."""

    from pipeline.models import load_discriminator

    discriminator = load_discriminator(model_dir)
    index = {str(label): i for i, label in enumerate(model.get("labels", []))}

    def scores(images: ImageSet) -> np.ndarray:
        ids = torch.as_tensor([index.get(str(label), 0) for label in images.labels], dtype=torch.long)
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), 256):
                batch = torch.from_numpy(np.ascontiguousarray(images.images[start : start + 256]))
                out.append(discriminator(batch, ids[start : start + 256]).reshape(-1).double().numpy())
        return np.concatenate(out)

    return scores(train), scores(holdout)


def _dp(model: dict[str, Any] | None, result: dict[str, Any]) -> None:
    if model is None:
        reason = "no model directory given (--model): the DP accountant is read from the model"
        _put(result, "epsilon", None, reason)
        _put(result, "delta", None, reason)
        return
    dp = model.get("dp")
    if not dp:
        reason = "the model was trained without differential privacy"
        _put(result, "epsilon", None, reason)
        _put(result, "delta", None, reason)
        return
    _put(result, "epsilon", dp.get("epsilon"), "the model's DP record has no epsilon")
    _put(result, "delta", dp.get("delta"), "the model's DP record has no delta")


# --------------------------------------------------------------------------------------------- utility


@dataclass
class _Trained:
    """Every classifier of one evaluation: real-only seeds (seed 0 is the encoder) and real+synthetic seeds."""

    real: list[ConvNet]
    augmented: list[ConvNet]
    real_reason: str | None
    augmented_reason: str | None


def _train_all(
    classes: list[str], train: ImageSet, test: ImageSet, synthetic: ImageSet, config: EvaluateConfig
) -> _Trained:
    """Train the encoder and the utility arms in one go, side by side on the available cores."""
    if len(classes) < 2:
        reason = f"the real training split has {len(classes)} class(es); a classifier needs at least 2"
        return _Trained([], [], reason, reason)
    index = {label: i for i, label in enumerate(classes)}
    real_ids = np.array([index[label] for label in train.labels])
    seeds = [config.seed + offset for offset in range(config.utility_seeds)]
    jobs = [TrainingJob(train.images, real_ids, seed) for seed in seeds]
    usable = synthetic.select(np.isin(synthetic.labels, classes))
    test_classes = set(test.labels.tolist()) & set(classes)
    augmented_reason = None
    if not len(usable):
        augmented_reason = "no synthetic image carries a label of the real training split"
    elif len(test) < config.min_test or len(test_classes) < 2:
        augmented_reason = (
            f"the real test split has {len(test)} images of {len(test_classes)} known classes "
            f"(needs {config.min_test} images of at least 2)"
        )
    else:
        mixed_images = np.concatenate([train.images, usable.images])
        mixed_ids = np.array([index[label] for label in np.concatenate([train.labels, usable.labels])])
        jobs += [TrainingJob(mixed_images, mixed_ids, seed) for seed in seeds]
    models = train_classifiers(
        jobs,
        len(classes),
        workers=config.num_threads or torch.get_num_threads(),
        feature_dim=config.feature_dim,
        steps=config.classifier_steps,
        batch_size=config.classifier_batch_size,
        lr=config.classifier_lr,
    )
    return _Trained(models[: len(seeds)], models[len(seeds) :], None, augmented_reason)


def _pick_seeds(per_seed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(seeds, resamples) -> (resamples,): each bootstrap resample also draws one training seed.

    The interval then carries the classifier's training noise as well as the test sampling noise;
    on small data the former is often the larger (seed-to-seed sd ~0.04 in balanced accuracy on the
    controlled cohort).
    """
    return per_seed[rng.integers(0, per_seed.shape[0], size=per_seed.shape[1]), np.arange(per_seed.shape[1])]


def _arm(
    name: str,
    probas: list[np.ndarray],
    truth: np.ndarray,
    class_ids: np.ndarray,
    weights: np.ndarray,
    rng: np.random.Generator,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One classifier arm on the test split: point figures (mean over seeds) and bootstrap samples."""
    predictions = [class_ids[proba.argmax(axis=1)] for proba in probas]
    balanced = float(np.mean([balanced_accuracy(truth, predicted) for predicted in predictions]))
    balanced_b = _pick_seeds(np.stack([balanced_accuracy(truth, p, weights) for p in predictions]), rng)
    areas = [roc_auc(truth, proba, class_ids) for proba in probas]
    area = float(np.mean(areas))
    area_b = _pick_seeds(np.stack([roc_auc(truth, proba, class_ids, weights) for proba in probas]), rng)
    entry: dict[str, Any] = {"training_data": name, "seeds": len(probas)}
    _put(entry, "balanced_accuracy", balanced, "undefined on this test set")
    entry["balanced_accuracy_ci_low"], entry["balanced_accuracy_ci_high"] = interval(balanced_b)
    _put(entry, "auc", area, "needs test images of at least two classes")
    entry["auc_ci_low"], entry["auc_ci_high"] = interval(area_b)
    entry["accuracy"] = float(np.mean([accuracy(truth, predicted) for predicted in predictions]))
    return entry, balanced_b, area_b


def _mean_accuracy(classifiers: list[ConvNet], images: ImageSet, classes: list[str]) -> float:
    names = np.asarray(classes, dtype=object)
    return float(
        np.mean(
            [
                accuracy(images.labels, names[predict_proba(model, images.images).argmax(axis=1)])
                for model in classifiers
            ]
        )
    )


def _utility(
    trained: _Trained,
    classes: list[str],
    train: ImageSet,
    holdout: ImageSet,
    test: ImageSet,
    synthetic: ImageSet,
    config: EvaluateConfig,
) -> dict[str, Any]:
    """GAN-test label accuracy, and real-only vs real+synthetic classifiers on the real test split."""
    result: dict[str, Any] = {}
    class_ids = np.arange(len(classes))
    index = {label: i for i, label in enumerate(classes)}
    known = np.isin(synthetic.labels, classes)
    result["n_synthetic_unknown_label"] = int((~known).sum())
    result["classifier"] = (
        f"small CNN (the trained-cnn encoder's architecture), {config.classifier_steps} steps of "
        f"{config.classifier_batch_size} class-balanced images with flips and shifts; "
        f"{config.utility_seeds} training seed(s) per arm, figures averaged over seeds"
    )
    if not trained.real:
        for key in ("synthetic_label_accuracy", "augmentation_gain"):
            _put(result, key, None, trained.real_reason)
        result["real_only"], result["real_plus_synthetic"] = {}, {}
        result["augmentation_verdict"] = "not run"
        return result
    real_models = trained.real
    usable = synthetic.select(known)
    no_labels = "no synthetic image carries a label of the real training split"
    _put(
        result,
        "synthetic_label_accuracy",
        _mean_accuracy(real_models, usable, classes) if len(usable) else None,
        no_labels,
    )
    _put(
        result,
        "real_holdout_accuracy",
        _mean_accuracy(real_models, holdout, classes) if len(holdout) else None,
        "no held-out real images",
    )
    chance = 1.0 / len(classes)
    informative = _beats_chance(real_models, holdout, classes, chance, config)
    result["chance_accuracy"] = chance
    ratio = _ratio(result.get("synthetic_label_accuracy"), result.get("real_holdout_accuracy")) if informative else None
    _put(
        result,
        "synthetic_label_accuracy_ratio",
        ratio,
        "needs synthetic_label_accuracy and real_holdout_accuracy"
        if informative
        else (
            "the classifier trained on real images does not beat chance on held-out real images "
            "(95% interval), so its reading of synthetic labels says nothing"
        ),
    )
    if not trained.augmented:
        result["real_only"], result["real_plus_synthetic"] = {}, {}
        for key in ("augmentation_gain", "augmentation_gain_ci_low", "augmentation_gain_ci_high"):
            _put(result, key, None, trained.augmented_reason)
        result["augmentation_verdict"] = "not run"
        return result
    augmented_models = trained.augmented
    truth = np.array([index.get(label, -1) for label in test.labels])
    keep = truth >= 0
    truth, test_images, groups = truth[keep], test.images[keep], test.subject_ids[keep]
    rng = np.random.default_rng(config.seed + 41)
    weights = bootstrap_weights(groups, config.bootstrap, rng)
    real_only, real_b, real_auc_b = _arm(
        "real train", [predict_proba(model, test_images) for model in real_models], truth, class_ids, weights, rng
    )
    plus, plus_b, plus_auc_b = _arm(
        "real train + synthetic",
        [predict_proba(model, test_images) for model in augmented_models],
        truth,
        class_ids,
        weights,
        rng,
    )
    real_only["n_test"] = plus["n_test"] = int(truth.size)
    real_only["n_test_subjects"] = plus["n_test_subjects"] = int(np.unique(groups.astype(str)).size)
    plus["n_synthetic_added"] = len(usable)
    result["real_only"], result["real_plus_synthetic"] = real_only, plus
    gain_reason = "balanced accuracy undefined on the test split"
    gain = (
        plus["balanced_accuracy"] - real_only["balanced_accuracy"]
        if plus["balanced_accuracy"] is not None and real_only["balanced_accuracy"] is not None
        else None
    )
    _put(result, "augmentation_gain", gain, gain_reason)
    low, high = interval(plus_b - real_b)
    _put(result, "augmentation_gain_ci_low", low, gain_reason)
    _put(result, "augmentation_gain_ci_high", high, gain_reason)
    if plus["auc"] is not None and real_only["auc"] is not None:
        result["augmentation_gain_auc"] = plus["auc"] - real_only["auc"]
        result["augmentation_gain_auc_ci_low"], result["augmentation_gain_auc_ci_high"] = interval(
            plus_auc_b - real_auc_b
        )
    if low is None or high is None:
        verdict = "not run"
    elif low > 0:
        verdict = "measurable gain"
    elif high < 0:
        verdict = "measurable loss"
    else:
        verdict = "no measurable gain"
    result["augmentation_verdict"] = verdict
    result["augmentation_metric"] = (
        "balanced accuracy on the real test split; 95% interval from a bootstrap over test subjects and training seeds"
    )
    return result


def _beats_chance(
    models: list[ConvNet], holdout: ImageSet, classes: list[str], chance: float, config: EvaluateConfig
) -> bool:
    """Whether the real-trained classifier's held-out balanced accuracy interval lies above chance."""
    index = {label: i for i, label in enumerate(classes)}
    truth = np.array([index.get(label, -1) for label in holdout.labels])
    keep = truth >= 0
    if keep.sum() < 2 or np.unique(truth[keep]).size < 2:
        return False
    rng = np.random.default_rng(config.seed + 43)
    weights = bootstrap_weights(holdout.subject_ids[keep], config.bootstrap, rng)
    class_ids = np.arange(len(classes))
    per_seed = np.stack(
        [
            balanced_accuracy(
                truth[keep], class_ids[predict_proba(model, holdout.images[keep]).argmax(axis=1)], weights
            )
            for model in models
        ]
    )
    low, _ = interval(_pick_seeds(per_seed, rng))
    return low is not None and low > chance


# --------------------------------------------------------------------------------------------- orchestration


def _grid_evidence(train: ImageSet, synthetic: ImageSet, config: EvaluateConfig) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(config.seed + 51)
    grids: dict[str, dict[str, np.ndarray]] = {}
    for label in sorted(set(train.labels.tolist()) | set(synthetic.labels.tolist())):
        entry = {}
        for name, images in (("real", train), ("synthetic", synthetic)):
            members = np.flatnonzero(images.labels == label)
            pick = (
                rng.choice(members, size=min(config.grid_per_class, members.size), replace=False)
                if members.size
                else members
            )
            entry[name] = images.images[np.sort(pick), 0]
        grids[str(label)] = entry
    return grids


def _embed_all(spaces: list[FeatureSpace], sets: dict[str, ImageSet]) -> dict[str, dict[str, np.ndarray]]:
    """Features of every set in every space, z-scored with the real training set's statistics."""
    features: dict[str, dict[str, np.ndarray]] = {}
    for space in spaces:
        raw = {name: embed(space.extractor, image_set.images) for name, image_set in sets.items() if len(image_set)}
        names = list(raw)
        scaled = standardize(raw["train"], *[raw[name] for name in names if name != "train"])
        features[space.name] = dict(zip(["train", *[name for name in names if name != "train"]], scaled))
    return features


def evaluate_sets(
    real: ImageSet,
    synthetic: ImageSet,
    config: EvaluateConfig,
    *,
    model_dir: Path | None = None,
    model: dict[str, Any] | None = None,
    progress: bool = False,
) -> Evaluation:
    """Compute fidelity, diversity, privacy, utility and the gates for two image sets.

    Args:
        real: real images with splits (train is the reference; val + test are held out).
        synthetic: synthetic images.
        config: the ``evaluate`` section.
        model_dir: the generator's folder (enables the white-box attack).
        model: the parsed ``model.json`` of ``model_dir``.
        progress: show a progress bar on stderr.

    Returns:
        The report sections (``fidelity``, ``diversity``, ``privacy``, ``utility``, ``gates``,
        ``feature_spaces``) and the evidence arrays for report.html.
    """
    steps = _Steps(progress, total=6)
    train, holdout, test = real.split("train"), real.split("val", "test"), real.split("test")
    holdout_subjects = int(np.unique(holdout.subject_ids.astype(str)).size)
    holdout_reason = (
        None
        if holdout_subjects >= config.min_holdout
        else (
            f"only {holdout_subjects} held-out real subjects (val + test, {len(holdout)} images) after "
            f"preprocessing; at least {config.min_holdout} are needed for a real-vs-real baseline "
            "(evaluate.min_holdout)"
        )
    )
    classes = sorted(set(train.labels.tolist()))
    trained = _train_all(classes, train, test, synthetic, config)
    classifier = trained.real[0] if trained.real else None
    steps.next("features")
    spaces: list[FeatureSpace] = []
    if config.feature_weights is not None:
        spaces.append(user_space(Path(config.feature_weights), train.images))
    if classifier is not None:
        spaces.append(trained_space(classifier, config.feature_dim, config.classifier_steps))
    if config.cross_check or not spaces:
        spaces.append(
            random_space(train.images.ndim - 2, tuple(train.images.shape[2:]), config.feature_dim, config.seed + 1)
        )
    sets = {"train": train, "holdout": holdout, "synthetic": synthetic}
    features = _embed_all(spaces, sets)
    steps.next("fidelity")
    evidence = Evidence(grids=_grid_evidence(train, synthetic, config))
    headline = spaces[0]
    fidelity_by_space = {}
    for space in spaces:
        space_features = features[space.name]
        section, bars = _fidelity_in_space(
            space_features["train"],
            space_features.get("holdout") if holdout_reason is None else None,
            space_features["synthetic"],
            train.labels,
            synthetic.labels,
            config,
            holdout_reason,
            train.subject_ids,
            holdout.subject_ids if holdout_reason is None else None,
        )
        section["feature_space"] = space.name
        fidelity_by_space[space.name] = section
        evidence.prdc[space.name] = bars
    fidelity = fidelity_by_space[headline.name]
    fidelity["cross_checks"] = {name: section for name, section in fidelity_by_space.items() if name != headline.name}
    fidelity["n_holdout"], fidelity["n_synthetic"] = len(holdout), len(synthetic)
    steps.next("diversity")
    diversity, evidence.ms_ssim = _diversity(train, synthetic, config)
    diversity["feature_space"] = headline.name
    for key in ("recall", "coverage"):
        diversity[f"{key}_ratio"] = fidelity["ratios"].get(key)
    steps.next("privacy")
    privacy = _privacy(
        train,
        holdout,
        synthetic,
        features[headline.name],
        headline,
        # The trained encoder saw the members (training split) and maps them differently from
        # any unseen image: attacking in its space would measure the encoder, not the generator.
        {space.name: features[space.name] for space in spaces if space.name != "trained-cnn"},
        config,
        holdout_reason,
        model_dir,
        model,
        evidence,
    )
    _dp(model, privacy)
    steps.next("utility")
    utility = _utility(trained, classes, train, holdout, test, synthetic, config)
    steps.next("gates")
    gates = _gates(fidelity, diversity, privacy, utility, config, holdout_reason)
    privacy["gate"] = gates["privacy"]
    steps.close()
    sections = {
        "fidelity": fidelity,
        "diversity": diversity,
        "privacy": privacy,
        "utility": utility,
        "gates": gates,
        "feature_spaces": {space.name: space.description for space in spaces},
    }
    return Evaluation(sections=sections, evidence=evidence)


def _gates(
    fidelity: dict[str, Any],
    diversity: dict[str, Any],
    privacy: dict[str, Any],
    utility: dict[str, Any],
    config: EvaluateConfig,
    holdout_reason: str | None,
) -> dict[str, Any]:
    thresholds = config.gates
    ratios = fidelity["ratios"]
    checks = {
        "fidelity": gate_rules.fidelity_checks(ratios, thresholds, holdout_reason),
        "diversity": gate_rules.diversity_checks(
            ratios,
            diversity.get("ms_ssim_excess"),
            thresholds,
            holdout_reason,
            diversity.get("ms_ssim_excess_reason"),
        ),
        "privacy": gate_rules.privacy_checks(
            privacy.get("memorization_rate"), privacy.get("mia_auc"), privacy.get("epsilon"), thresholds, holdout_reason,
            privacy.get("mia_attacks"),
        ),
        "utility": gate_rules.utility_checks(
            utility.get("synthetic_label_accuracy_ratio"),
            utility.get("augmentation_gain_ci_high"),
            thresholds,
            utility.get("synthetic_label_accuracy_ratio_reason"),
            utility.get("augmentation_gain_ci_high_reason"),
        ),
    }
    gates: dict[str, Any] = {name: gate_rules.gate_status(found) for name, found in checks.items()}
    gates["thresholds"] = thresholds.model_dump(mode="json")
    gates["checks"] = {name: [check.record() for check in found] for name, found in checks.items()}
    return gates


def _counts(dataset: Dataset, origin: str, image_set: ImageSet) -> dict[str, Any]:
    rows = dataset.subset(origin=origin)
    files = rows.groupby(["split", "label"]).size()
    images: dict[str, dict[str, int]] = {}
    for split, label in zip(image_set.splits, image_set.labels):
        images.setdefault(str(split), {}).setdefault(str(label), 0)
        images[str(split)][str(label)] += 1
    return {
        "name": Path(dataset.root).resolve().name,
        "digest": dataset.digest,
        "files": int(len(rows)),
        "images": int(len(image_set)),
        "files_per_split_and_class": {
            str(split): {str(label): int(n) for (s, label), n in files.items() if s == split}
            for split in sorted(set(rows["split"]))
        },
        "images_per_split_and_class": images,
    }


def _read_model(model_dir: Path | None) -> dict[str, Any] | None:
    if model_dir is None:
        return None
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise InputError(f"{path}: no model.json. Fix: pass a folder written by `medsynth train` with --model.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON (line {exc.lineno}). Fix: re-run `medsynth train`.") from None


def headline_metrics(report: dict[str, Any]) -> dict[str, float | None]:
    """The report's headline figures, flat, as MLflow metrics (``metrics.mia_auc < 0.6`` filters)."""
    fidelity, diversity, privacy, utility = (report[key] for key in ("fidelity", "diversity", "privacy", "utility"))
    metrics: dict[str, Any] = {
        key: fidelity.get(key) for key in ("fid", "kid", "precision", "recall", "density", "coverage")
    }
    metrics.update(
        {f"{key}_ratio": fidelity["ratios"].get(key) for key in ("precision", "density", "recall", "coverage")}
    )
    metrics.update(
        {
            "reference_fid": fidelity["reference"].get("fid"),
            "reference_kid": fidelity["reference"].get("kid"),
            "ms_ssim": diversity.get("ms_ssim"),
            "ms_ssim_real": diversity.get("ms_ssim_real"),
            "memorization_rate": privacy.get("memorization_rate"),
            "dcr_synthetic_to_train": privacy.get("dcr_synthetic_to_train"),
            "dcr_holdout_to_train": privacy.get("dcr_holdout_to_train"),
            "mia_auc": privacy.get("mia_auc"),
            "epsilon": privacy.get("epsilon"),
            "delta": privacy.get("delta"),
            "synthetic_label_accuracy": utility.get("synthetic_label_accuracy"),
            "augmentation_gain": utility.get("augmentation_gain"),
            "real_only_balanced_accuracy": utility.get("real_only", {}).get("balanced_accuracy"),
            "real_plus_synthetic_balanced_accuracy": utility.get("real_plus_synthetic", {}).get("balanced_accuracy"),
        }
    )
    for gate in ("fidelity", "diversity", "privacy", "utility"):
        status = report["gates"][gate]
        metrics[f"gate_{gate}_pass"] = None if status == "not_run" else float(status == "pass")
    return {key: _number(value) for key, value in metrics.items()}


@contextlib.contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` torch threads (None: unchanged), restoring the previous setting."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def summary_lines(report: dict[str, Any], out: Path) -> list[str]:
    """A few lines for the CLI: gates first, then the headline figures."""

    def show(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    fidelity, diversity, privacy, utility, gates = (
        report[key] for key in ("fidelity", "diversity", "privacy", "utility", "gates")
    )
    thresholds = gates["thresholds"]
    verdicts = ", ".join(
        f"{gate} {gates[gate] if gates[gate] != 'fail' else 'FAIL'}"
        for gate in ("fidelity", "diversity", "privacy", "utility")
    )
    return [
        f"Evaluated {report['inputs']['synthetic']['images']} synthetic vs {report['inputs']['real']['images']} real images "
        f"(feature space {fidelity['feature_space']}); report: {Path(out) / REPORT_HTML}",
        f"  gates: {verdicts}",
        f"  fidelity: FID {show(fidelity.get('fid'))} (held-out reference {show(fidelity['reference'].get('fid'))}), "
        f"precision {show(fidelity.get('precision'))}, recall {show(fidelity.get('recall'))}, "
        f"density {show(fidelity.get('density'))}, coverage {show(fidelity.get('coverage'))}",
        f"  diversity: MS-SSIM {show(diversity.get('ms_ssim'))} (real pairs {show(diversity.get('ms_ssim_real'))})",
        f"  privacy: memorization_rate {show(privacy.get('memorization_rate'))} (max {show(thresholds['max_memorization_rate'])}), "
        f"mia_auc {show(privacy.get('mia_auc'))} (max {show(thresholds['max_mia_auc'])}), "
        f"{len(privacy.get('flagged', []))} flagged, epsilon {show(privacy.get('epsilon'))}",
        f"  utility: synthetic_label_accuracy {show(utility.get('synthetic_label_accuracy'))}, augmentation_gain "
        f"{show(utility.get('augmentation_gain'))} [{show(utility.get('augmentation_gain_ci_low'))}, "
        f"{show(utility.get('augmentation_gain_ci_high'))}]: {utility.get('augmentation_verdict', 'not run')}",
    ]


def run(
    real: Path,
    synthetic: Path,
    out: Path,
    config: EvaluateConfig,
    model_dir: Path | None = None,
    tracker: Tracker = NullTracker(),
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``synthetic`` against ``real`` and write ``out/report.json`` and ``out/report.html``.

    Args:
        real: real dataset folder (the generator's training data: train/val/test splits).
        synthetic: synthetic dataset folder.
        out: report folder (created).
        config: the ``evaluate`` section.
        model_dir: the generator's folder: its preprocessing, discriminator (white-box attack) and
            DP record are used. None: default preprocessing, black-box attacks only.
        tracker: where metrics, artifacts and dataset lineage go.
        progress: show a progress bar on stderr.

    Returns:
        The report as written to report.json.

    Raises:
        InputError: unreadable datasets, model folder or feature extractor.
    """
    from pipeline.evaluate.report import render_html

    real_dataset, synthetic_dataset = read_dataset(real), read_dataset(synthetic)
    model_dir = Path(model_dir) if model_dir is not None else None
    model = _read_model(model_dir)
    real_set, synthetic_set, preprocessing = load_image_sets(
        real_dataset, synthetic_dataset, model_dir=model_dir, seed=config.seed, max_images=config.max_images
    )
    with _torch_threads(config.num_threads):
        evaluation = evaluate_sets(real_set, synthetic_set, config, model_dir=model_dir, model=model, progress=progress)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **evaluation.sections,
        "inputs": {
            "real": _counts(real_dataset, "real", real_set),
            "synthetic": _counts(synthetic_dataset, "synthetic", synthetic_set),
            "model": None
            if model is None
            else {
                "name": model_dir.resolve().name,
                "mlflow_run_id": model.get("mlflow_run_id"),
                "train_dataset_digest": model.get("train_dataset_digest"),
                "train_dataset_matches_real": model.get("train_dataset_digest") in (None, real_dataset.digest),
                "spatial_dims": model.get("spatial_dims"),
                "labels": model.get("labels"),
            },
        },
        "preprocessing": preprocessing,
        "mlflow": {
            "run_id": tracker.run_id,
            "experiment_id": tracker.experiment_id,
            "model_run_id": model.get("mlflow_run_id") if model else None,
        },
        "config": config.model_dump(mode="json"),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_json(out / REPORT_JSON, report)
    html_path = atomic_write_text(out / REPORT_HTML, render_html(report, evaluation.evidence))
    tracker.log_dataset(real_dataset, context="evaluation-real")
    tracker.log_dataset(synthetic_dataset, context="evaluation-synthetic")
    tracker.log_metrics(headline_metrics(report))
    tracker.set_tags(
        {
            **{f"gate.{gate}": report["gates"][gate] for gate in ("fidelity", "diversity", "privacy", "utility")},
            "real_dataset_sha256": real_dataset.digest,
            "synthetic_dataset_sha256": synthetic_dataset.digest,
            "feature_space": report["fidelity"]["feature_space"],
        }
    )
    tracker.log_artifact(json_path, artifact_path="report")
    tracker.log_artifact(html_path, artifact_path="report")
    return report
