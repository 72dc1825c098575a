"""The ``utility`` section: do synthetic images carry their labels, and does adding them help a classifier?

Classifiers trained on real images (the first is also the trained-cnn encoder) read the synthetic
images' labels (balanced accuracy, relative to held-out real images); classifiers trained on real +
synthetic images are compared with the real-only ones on the real test split, with intervals from a
bootstrap over test subjects of the seed-averaged figures, and only when the test split holds
``evaluate.min_test_subjects`` subjects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.augmentation import ArmJob, Recipe, arm_job, label_keeping
from pipeline.evaluate.learning_curve import ClassifierRecipe, learning_curve
from pipeline.evaluate.networks import ConvNet, TrainingJob, predict_proba
from pipeline.evaluate.sections.common import put, ratio
from pipeline.evaluate.seeds import purpose_seed
from pipeline.evaluate.utility import accuracy, balanced_accuracy, bootstrap_weights, interval, roc_auc
from pipeline.imaging.images import ImageSet

__all__ = ["Trained", "train_all", "utility_section", "classifier_recipe", "augmentation_recipe"]

_NO_LABELS = "no synthetic image carries a label of the real training split"


@dataclass
class Trained:
    """Every classifier of one evaluation: real-only seeds (seed 0 is the encoder) and real+synthetic seeds."""

    real: list[ConvNet]
    augmented: list[ConvNet]
    real_reason: str | None
    augmented_reason: str | None
    synthetic_added: int = 0


def train_all(
    classes: list[str], train: ImageSet, test: ImageSet, synthetic: ImageSet, config: EvaluateConfig
) -> Trained:
    """Train the encoder and the utility arms in one go, side by side on the available cores."""
    if len(classes) < 2:
        reason = f"the real training split has {len(classes)} class(es); a classifier needs at least 2"
        return Trained([], [], reason, reason)
    index = {label: i for i, label in enumerate(classes)}
    real_ids = np.array([index[label] for label in train.labels])
    seeds = [purpose_seed(config, "classifier", offset) for offset in range(config.utility_seeds)]
    jobs = [TrainingJob(train.images, real_ids, seed) for seed in seeds]
    usable = synthetic.select(np.isin(synthetic.labels, classes))
    known_test = test.select(np.isin(test.labels, classes))
    test_classes = set(known_test.labels.tolist())
    test_subjects = int(np.unique(known_test.subject_ids.astype(str)).size)
    augmented_reason = None
    if not len(usable):
        augmented_reason = _NO_LABELS
    elif test_subjects < config.min_test_subjects or len(test_classes) < 2:
        augmented_reason = (
            f"the real test split has {test_subjects} subjects ({len(known_test)} images) of {len(test_classes)} "
            f"known classes; the augmentation comparison needs {config.min_test_subjects} subjects of at least "
            "2 classes (evaluate.min_test_subjects), else its interval is too wide to show harm"
        )
    recipe, arm = classifier_recipe(config), augmentation_recipe(config)
    if augmented_reason is not None or arm.filter:
        # The filter reads the synthetic images with each seed's real-only classifier: train those first.
        real_models = recipe.train(jobs, len(classes))
        if augmented_reason is not None:
            return Trained(real_models, [], None, augmented_reason)
        augmented, added = _augmented_jobs(real_models, train, usable, index, seeds, config)
        return Trained(real_models, recipe.train_arm(augmented, arm, len(classes)), None, None, added)
    augmented, added = _augmented_jobs(None, train, usable, index, seeds, config)
    if arm.pretrain:
        return Trained(
            recipe.train(jobs, len(classes)), recipe.train_arm(augmented, arm, len(classes)), None, None, added
        )
    # One pool for both arms: the mixed arm's jobs are plain classifier jobs.
    mixed = [TrainingJob(np.concatenate([j.real_images, j.synthetic_images]),
                         np.concatenate([j.real_ids, j.synthetic_ids]), j.seed) for j in augmented]
    models = recipe.train(jobs + mixed, len(classes))
    return Trained(models[: len(seeds)], models[len(seeds) :], None, None, added)


def classifier_recipe(config: EvaluateConfig) -> ClassifierRecipe:
    """The one training recipe of every utility classifier (and of the learning curve's)."""
    return ClassifierRecipe(
        feature_dim=config.feature_dim,
        steps=config.classifier_steps,
        batch_size=config.classifier_batch_size,
        lr=config.classifier_lr,
        workers=config.num_threads or torch.get_num_threads(),
    )


def augmentation_recipe(config: EvaluateConfig) -> Recipe:
    """How synthetic images join the real+synthetic arm (``evaluate.augmentation_ratio``/``_filter``/``_pretrain``)."""
    return Recipe(
        synthetic_ratio=config.augmentation_ratio,
        filter=config.augmentation_filter,
        pretrain=config.augmentation_pretrain,
    )


def _augmented_jobs(
    real_models: list[ConvNet] | None,
    train: ImageSet,
    usable: ImageSet,
    index: dict[str, int],
    seeds: list[int],
    config: EvaluateConfig,
) -> tuple[list[ArmJob], int]:
    """One real+synthetic training job per seed, and the synthetic images added (mean over seeds)."""
    recipe = augmentation_recipe(config)
    real_ids = np.array([index[label] for label in train.labels])
    synthetic_ids = np.array([index[label] for label in usable.labels])
    jobs, added = [], []
    for offset, seed in enumerate(seeds):
        keep = None
        if recipe.filter and real_models is not None:
            keep = label_keeping(predict_proba(real_models[offset], usable.images).argmax(axis=1), synthetic_ids)
        jobs.append(arm_job(train.images, real_ids, usable.images, synthetic_ids, recipe, seed, keep))
        added.append(len(jobs[-1].synthetic_ids))
    return jobs, int(round(float(np.mean(added))))


def utility_section(
    trained: Trained,
    classes: list[str],
    train: ImageSet,
    holdout: ImageSet,
    test: ImageSet,
    synthetic: ImageSet,
    config: EvaluateConfig,
) -> dict[str, Any]:
    """GAN-test label accuracy, and real-only vs real+synthetic classifiers on the real test split."""
    result: dict[str, Any] = {}
    known = np.isin(synthetic.labels, classes)
    result["n_synthetic_unknown_label"] = int((~known).sum())
    result["classifier"] = (
        f"small CNN (the trained-cnn encoder's architecture), {config.classifier_steps} steps of "
        f"{config.classifier_batch_size} class-balanced images with flips and shifts; "
        f"{config.utility_seeds} training seed(s) per arm, figures averaged over seeds"
    )
    result["augmentation_recipe"] = augmentation_recipe(config).describe()
    if not trained.real:
        for key in ("synthetic_label_accuracy", "augmentation_gain"):
            put(result, key, None, trained.real_reason)
        result["real_only"], result["real_plus_synthetic"] = {}, {}
        result["augmentation_verdict"] = "not run"
        return result
    usable = synthetic.select(known)
    _label_accuracy(result, trained.real, usable, holdout, classes, config)
    if config.learning_curve:
        _learning_curve(result, trained, classes, train, test, usable, config)
    if not trained.augmented:
        result["real_only"], result["real_plus_synthetic"] = {}, {}
        for key in ("augmentation_gain", "augmentation_gain_ci_low", "augmentation_gain_ci_high"):
            put(result, key, None, trained.augmented_reason)
        result["augmentation_verdict"] = "not run"
        return result
    _augmentation(result, trained, classes, test, trained.synthetic_added, config)
    return result


def _learning_curve(
    result: dict[str, Any],
    trained: Trained,
    classes: list[str],
    train: ImageSet,
    test: ImageSet,
    usable: ImageSet,
    config: EvaluateConfig,
) -> None:
    """``utility.learning_curve`` (``evaluate.learning_curve: true``): the arms at fewer real subjects.

    It runs where the augmentation comparison runs (enough test subjects of two classes, synthetic
    images with known labels) and uses its seeds, recipe and classifier; the synthetic images come
    from the generator being evaluated, trained on the whole training split.
    """
    if not trained.augmented:
        put(result, "learning_curve", None, trained.augmented_reason or _NO_LABELS)
        return
    known_test = test.select(np.isin(test.labels, classes))
    curve = learning_curve(
        classes,
        train,
        known_test,
        usable,
        sizes=config.learning_curve_sizes,
        seeds=[purpose_seed(config, "learning_curve", 1 + offset) for offset in range(config.utility_seeds)],
        recipe=augmentation_recipe(config),
        classifier=classifier_recipe(config),
        bootstrap=config.bootstrap,
        bootstrap_seed=purpose_seed(config, "learning_curve", 0),
    )
    curve["generator"] = (
        "the evaluated generator, trained on the whole real training split: an optimistic proxy for a study "
        "with fewer subjects (benchmarks/learning_curves.py trains one generator per size)"
    )
    result["learning_curve"] = curve


def _label_accuracy(
    result: dict[str, Any],
    real_models: list[ConvNet],
    usable: ImageSet,
    holdout: ImageSet,
    classes: list[str],
    config: EvaluateConfig,
) -> None:
    """How often real-trained classifiers read a synthetic image's label, relative to held-out real images."""
    put(
        result,
        "synthetic_label_accuracy",
        _mean_balanced_accuracy(real_models, usable, classes) if len(usable) else None,
        _NO_LABELS,
    )
    known_holdout = holdout.select(np.isin(holdout.labels, classes))
    put(
        result,
        "real_holdout_accuracy",
        _mean_balanced_accuracy(real_models, known_holdout, classes) if len(known_holdout) else None,
        "no held-out real images of the training classes",
    )
    result["label_accuracy_metric"] = (
        "balanced accuracy (mean per-class recall) of the real-trained classifiers, averaged over training seeds"
    )
    chance = 1.0 / len(classes)
    informative = _beats_chance(real_models, holdout, classes, chance, config)
    result["chance_accuracy"] = chance
    value = ratio(result.get("synthetic_label_accuracy"), result.get("real_holdout_accuracy")) if informative else None
    put(
        result,
        "synthetic_label_accuracy_ratio",
        value,
        "needs synthetic_label_accuracy and real_holdout_accuracy"
        if informative
        else (
            "the classifier trained on real images does not beat chance on held-out real images "
            "(95% interval), so its reading of synthetic labels says nothing"
        ),
    )


def _augmentation(
    result: dict[str, Any],
    trained: Trained,
    classes: list[str],
    test: ImageSet,
    n_added: int,
    config: EvaluateConfig,
) -> None:
    """Real-only vs real+synthetic arms on the real test split, the gain and its verdict."""
    class_ids = np.arange(len(classes))
    index = {label: i for i, label in enumerate(classes)}
    truth = np.array([index.get(label, -1) for label in test.labels])
    keep = truth >= 0
    truth, test_images, groups = truth[keep], test.images[keep], test.subject_ids[keep]
    rng = np.random.default_rng(purpose_seed(config, "utility_bootstrap"))
    weights = bootstrap_weights(groups, config.bootstrap, rng)
    real_only, real_b, real_auc_b = _arm(
        "real train", [predict_proba(model, test_images) for model in trained.real], truth, class_ids, weights
    )
    plus, plus_b, plus_auc_b = _arm(
        "real train + synthetic",
        [predict_proba(model, test_images) for model in trained.augmented],
        truth,
        class_ids,
        weights,
    )
    real_only["n_test"] = plus["n_test"] = int(truth.size)
    real_only["n_test_subjects"] = plus["n_test_subjects"] = int(np.unique(groups.astype(str)).size)
    plus["n_synthetic_added"] = n_added
    result["real_only"], result["real_plus_synthetic"] = real_only, plus
    gain_reason = "balanced accuracy undefined on the test split"
    gain = (
        plus["balanced_accuracy"] - real_only["balanced_accuracy"]
        if plus["balanced_accuracy"] is not None and real_only["balanced_accuracy"] is not None
        else None
    )
    put(result, "augmentation_gain", gain, gain_reason)
    low, high = interval(plus_b - real_b)
    put(result, "augmentation_gain_ci_low", low, gain_reason)
    put(result, "augmentation_gain_ci_high", high, gain_reason)
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
        "balanced accuracy on the real test split, averaged over training seeds; 95% interval from a bootstrap "
        "over test subjects, each resample averaged over the seeds like the point estimate"
    )


def _seed_mean(per_seed: np.ndarray) -> np.ndarray:
    """(seeds, resamples) -> (resamples,): each resample's figure averaged over the training seeds.

    The point estimate is the mean over seeds, so each bootstrap resample is too: the interval
    then describes the figure that is reported (test-subject sampling of the seed-averaged
    classifier), not a single seed's draw.
    """
    return per_seed.mean(axis=0)


def _arm(
    name: str,
    probas: list[np.ndarray],
    truth: np.ndarray,
    class_ids: np.ndarray,
    weights: np.ndarray,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One classifier arm on the test split: point figures (mean over seeds) and bootstrap samples."""
    predictions = [class_ids[proba.argmax(axis=1)] for proba in probas]
    balanced = float(np.mean([balanced_accuracy(truth, predicted) for predicted in predictions]))
    balanced_b = _seed_mean(np.stack([balanced_accuracy(truth, p, weights) for p in predictions]))
    areas = [roc_auc(truth, proba, class_ids) for proba in probas]
    area = float(np.mean(areas))
    area_b = _seed_mean(np.stack([roc_auc(truth, proba, class_ids, weights) for proba in probas]))
    entry: dict[str, Any] = {"training_data": name, "seeds": len(probas)}
    put(entry, "balanced_accuracy", balanced, "undefined on this test set")
    entry["balanced_accuracy_ci_low"], entry["balanced_accuracy_ci_high"] = interval(balanced_b)
    put(entry, "auc", area, "needs test images of at least two classes")
    entry["auc_ci_low"], entry["auc_ci_high"] = interval(area_b)
    entry["accuracy"] = float(np.mean([accuracy(truth, predicted) for predicted in predictions]))
    return entry, balanced_b, area_b


def _mean_balanced_accuracy(classifiers: list[ConvNet], images: ImageSet, classes: list[str]) -> float:
    """Balanced accuracy of each classifier on ``images``' labels, averaged over classifiers.

    Balanced, so a classifier that favours one class reads the same on a synthetic set and on the
    held-out images whatever their class mix.
    """
    names = np.asarray(classes, dtype=object)
    return float(
        np.mean(
            [
                balanced_accuracy(images.labels, names[predict_proba(model, images.images).argmax(axis=1)])
                for model in classifiers
            ]
        )
    )


def _beats_chance(
    models: list[ConvNet], holdout: ImageSet, classes: list[str], chance: float, config: EvaluateConfig
) -> bool:
    """Whether the real-trained classifier's held-out balanced accuracy interval lies above chance."""
    index = {label: i for i, label in enumerate(classes)}
    truth = np.array([index.get(label, -1) for label in holdout.labels])
    keep = truth >= 0
    if keep.sum() < 2 or np.unique(truth[keep]).size < 2:
        return False
    rng = np.random.default_rng(purpose_seed(config, "chance_bootstrap"))
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
    low, _ = interval(_seed_mean(per_seed))
    return low is not None and low > chance

