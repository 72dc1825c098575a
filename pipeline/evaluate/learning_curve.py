"""Learning curves: real-only vs real + synthetic classifiers at a few real training-set sizes.

At each size (subjects per class) and for each of a few seeds, a seed-drawn subset of the real
training subjects trains two classifiers of the utility recipe: one on the subset's images, one
on them plus synthetic images (:mod:`pipeline.evaluate.augmentation`). Both are read on the real
test split. Intervals come from a two-level bootstrap: each resample draws the seeds with
replacement (the variation of which subjects a small study happens to have, and of training) and
the test subjects with replacement (cluster bootstrap, as everywhere in the utility section), so an
interval of the gain above 0 means a gain that survives both.

Inside ``evaluate`` the synthetic images come from the one generator being evaluated, trained on
the whole training split: the curve then asks "would these synthetic images help a study that had
fewer real subjects?", an optimistic proxy. ``benchmarks/learning_curves.py`` trains one generator
per size on the same small subset instead (the honest version, too costly for a report).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.evaluate.augmentation import ArmJob, Recipe, arm_job, label_keeping, train_arm
from pipeline.evaluate.networks import TrainingJob, predict_proba, train_classifiers
from pipeline.evaluate.utility import balanced_accuracy, bootstrap_weights, interval
from pipeline.imaging.images import ImageSet

__all__ = ["ClassifierRecipe", "subject_subset", "paired_comparison", "learning_curve", "verdict"]


@dataclass(frozen=True)
class ClassifierRecipe:
    """The utility classifier's training settings (the same for every arm)."""

    feature_dim: int
    steps: int
    batch_size: int
    lr: float
    workers: int

    def train(self, jobs: list[TrainingJob], n_classes: int) -> list[Any]:
        """Train ``jobs`` side by side (see :func:`pipeline.evaluate.networks.train_classifiers`)."""
        return train_classifiers(
            jobs,
            n_classes,
            workers=self.workers,
            feature_dim=self.feature_dim,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
        )

    def train_arm(self, jobs: list[ArmJob], recipe: Recipe, n_classes: int) -> list[Any]:
        """Train real+synthetic classifiers the way ``recipe`` says (see :func:`pipeline.evaluate.augmentation.train_arm`)."""
        return train_arm(
            jobs,
            recipe,
            n_classes,
            workers=self.workers,
            feature_dim=self.feature_dim,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
        )


def subject_subset(images: ImageSet, classes: list[str], per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Mask of the images of ``per_class`` randomly drawn subjects of each class.

    Raises:
        ValueError: a class has fewer than ``per_class`` subjects.
    """
    mask = np.zeros(len(images), dtype=bool)
    subjects = images.subject_ids.astype(str)
    for label in classes:
        members = np.unique(subjects[images.labels == label])
        if members.size < per_class:
            raise ValueError(f"class {label!r} has {members.size} training subjects, fewer than {per_class}")
        chosen = rng.choice(members, size=per_class, replace=False)
        mask |= np.isin(subjects, chosen) & (images.labels == label)
    return mask


def verdict(low: float | None, high: float | None) -> str:
    """The gain's verdict from its 95% interval (the words of ``utility.augmentation_verdict``)."""
    if low is None or high is None:
        return "not run"
    if low > 0:
        return "measurable gain"
    if high < 0:
        return "measurable loss"
    return "no measurable gain"


def paired_comparison(
    real_scores: np.ndarray,
    augmented_scores: np.ndarray,
    real_points: np.ndarray,
    augmented_points: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Both arms and their gain with the two-level bootstrap interval.

    Args:
        real_scores, augmented_scores: (seeds, resamples) balanced accuracy of each seed's classifier
            under each test-subject bootstrap resample (the same resamples for both arms).
        real_points, augmented_points: (seeds,) balanced accuracy on the whole test split.
        rng: draws the seeds of each resample.

    Returns:
        ``real_only`` and ``real_plus_synthetic`` (balanced accuracy with its interval), ``gain``
        with ``gain_ci_low``/``gain_ci_high`` and ``verdict``.
    """
    seeds, resamples = real_scores.shape
    draw = rng.integers(0, seeds, size=(resamples, seeds))
    columns = np.arange(resamples)[:, None]
    real_b = real_scores[draw, columns].mean(axis=1)
    augmented_b = augmented_scores[draw, columns].mean(axis=1)
    result: dict[str, Any] = {}
    for name, points, samples in (
        ("real_only", real_points, real_b),
        ("real_plus_synthetic", augmented_points, augmented_b),
    ):
        low, high = interval(samples)
        result[name] = {"balanced_accuracy": float(np.mean(points)), "ci_low": low, "ci_high": high}
    result["gain"] = float(np.mean(augmented_points) - np.mean(real_points))
    result["gain_ci_low"], result["gain_ci_high"] = interval(augmented_b - real_b)
    result["verdict"] = verdict(result["gain_ci_low"], result["gain_ci_high"])
    return result


def _class_ids(labels: np.ndarray, classes: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(classes)}
    return np.array([index.get(label, -1) for label in labels])


def learning_curve(
    classes: list[str],
    train: ImageSet,
    test: ImageSet,
    synthetic: ImageSet,
    *,
    sizes: list[int],
    seeds: list[int],
    recipe: Recipe,
    classifier: ClassifierRecipe,
    bootstrap: int,
    bootstrap_seed: int,
) -> dict[str, Any]:
    """Real-only vs real+synthetic balanced accuracy on ``test`` at each size in ``sizes``.

    Args:
        classes: the class labels (index = class id).
        train: the real training images the subsets are drawn from.
        test: the real test images (their labels must be among ``classes``).
        synthetic: the synthetic images added (labels among ``classes``).
        sizes: subjects per class; sizes the training split cannot fill are listed under ``skipped``.
        seeds: one subject draw and one pair of classifiers per seed.
        recipe: how synthetic images join (the utility arm's recipe).
        classifier: the classifiers' training settings.
        bootstrap: resamples of the two-level bootstrap.
        bootstrap_seed: seed of the test-subject and seed resamples.

    Returns:
        ``points`` (one per size that ran: ``per_class``, ``n_real_images``, ``n_synthetic_added``,
        the arms, the gain and its verdict), ``skipped`` (size and reason), ``seeds``, ``recipe``.
    """
    subjects_per_class = {
        label: int(np.unique(train.subject_ids[train.labels == label].astype(str)).size) for label in classes
    }
    fewest = min(subjects_per_class.values()) if subjects_per_class else 0
    runnable = [size for size in sizes if size <= fewest]
    skipped = [
        {"per_class": size, "reason": f"the training split has {fewest} subjects in its smallest class"}
        for size in sizes
        if size > fewest
    ]
    result: dict[str, Any] = {
        "seeds": len(seeds),
        "recipe": recipe.describe(),
        "skipped": skipped,
        "points": [],
        "metric": (
            "balanced accuracy on the real test split; 95% intervals from a bootstrap over test subjects and "
            "seeds (each seed draws the real training subjects and trains both arms)"
        ),
    }
    if not runnable:
        return result
    train_ids, synthetic_ids, truth = (_class_ids(s.labels, classes) for s in (train, synthetic, test))
    subsets: list[tuple[int, int, np.ndarray]] = []
    for size in runnable:
        for seed in seeds:
            rng = np.random.default_rng([seed, size])
            subsets.append((size, seed, subject_subset(train, classes, size, rng)))
    real_jobs = [TrainingJob(train.images[mask], train_ids[mask], seed) for _, seed, mask in subsets]
    real_models = classifier.train(real_jobs, len(classes))
    augmented_jobs = []
    for (size, seed, mask), model in zip(subsets, real_models):
        keep = None
        if recipe.filter and len(synthetic):
            keep = label_keeping(predict_proba(model, synthetic.images).argmax(axis=1), synthetic_ids)
        augmented_jobs.append(
            arm_job(train.images[mask], train_ids[mask], synthetic.images, synthetic_ids, recipe, seed, keep)
        )
    added = [len(job.synthetic_ids) for job in augmented_jobs]
    augmented_models = classifier.train_arm(augmented_jobs, recipe, len(classes))
    weights = bootstrap_weights(test.subject_ids, bootstrap, np.random.default_rng(bootstrap_seed))
    class_ids = np.arange(len(classes))

    def scores(model: Any) -> tuple[float, np.ndarray]:
        predicted = class_ids[predict_proba(model, test.images).argmax(axis=1)]
        return float(balanced_accuracy(truth, predicted)), balanced_accuracy(truth, predicted, weights)

    real_scored = [scores(model) for model in real_models]
    augmented_scored = [scores(model) for model in augmented_models]
    seed_rng = np.random.default_rng([bootstrap_seed, 1])
    for size in runnable:
        rows = [i for i, (s, _, _) in enumerate(subsets) if s == size]
        point = paired_comparison(
            np.stack([real_scored[i][1] for i in rows]),
            np.stack([augmented_scored[i][1] for i in rows]),
            np.array([real_scored[i][0] for i in rows]),
            np.array([augmented_scored[i][0] for i in rows]),
            seed_rng,
        )
        point["per_class"] = size
        point["n_real_images"] = float(np.mean([subsets[i][2].sum() for i in rows]))
        point["n_synthetic_added"] = float(np.mean([added[i] for i in rows]))
        result["points"].append(point)
    return result

