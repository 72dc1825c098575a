"""How synthetic images join real ones in the utility's real+synthetic classifier (the "levers").

A recipe decides which synthetic images a classifier trained on real + synthetic images sees:
``synthetic_ratio`` caps the synthetic images at that many per real image of the same class (None:
all of them), and ``filter`` drops the synthetic images that the real-only classifier of the same
training seed reads as another class (images that do not carry their label would teach the wrong
one). Class balance needs no lever here: every classifier draws class-balanced batches
(:func:`pipeline.evaluate.networks.train_classifier`). ``pretrain`` changes how they join: the
classifier first learns from the admitted synthetic images alone, then is fine-tuned on the real
ones, for the same total number of steps. The defaults are the recipe the learning curves measured
best on the validation split (docs/models.md, "Does augmentation help?").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from pipeline.evaluate.networks import ConvNet, TrainingJob, side_by_side, train_classifier, train_classifiers

__all__ = [
    "Recipe",
    "ArmJob",
    "admitted",
    "arm_job",
    "mixed_training_set",
    "label_keeping",
    "pretrain_then_fine_tune",
    "train_arm",
]


@dataclass(frozen=True)
class Recipe:
    """One way of adding synthetic images to real ones.

    Attributes:
        synthetic_ratio: at most this many synthetic images per real image, per class (None: all).
        filter: keep only synthetic images the real-only classifier reads as their own label.
        pretrain: train on the admitted synthetic images first, then fine-tune on the real ones.
    """

    synthetic_ratio: float | None = None
    filter: bool = False
    pretrain: bool = False

    def describe(self) -> str:
        """One line for the report: what the real+synthetic arm was trained on."""
        amount = (
            "every synthetic image of a known class"
            if self.synthetic_ratio is None
            else f"up to {self.synthetic_ratio:g} synthetic image(s) per real image of the same class"
        )
        kept = ", keeping only those the real-only classifier of the same seed reads as their label" if self.filter else ""
        if self.pretrain:
            return f"{amount}{kept} for the first half of the steps, then the real images (pre-train, fine-tune)"
        return f"real images + {amount}{kept}"


def label_keeping(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mask of synthetic images whose real-trained prediction equals their label (the filter lever)."""
    return np.asarray(predicted) == np.asarray(labels)


def admitted(
    real_ids: np.ndarray,
    synthetic_ids: np.ndarray,
    recipe: Recipe,
    rng: np.random.Generator,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the synthetic images ``recipe`` admits for a real training set with ``real_ids``.

    Args:
        real_ids: integer class ids of the real training images.
        synthetic_ids: integer class ids of the candidate synthetic images.
        recipe: how many synthetic images per class (ratio) join.
        rng: draws which synthetic images join when the ratio caps them.
        keep: optional mask over the synthetic images (the filter lever's result).
    """
    candidates = np.arange(len(synthetic_ids)) if keep is None else np.flatnonzero(keep)
    chosen: list[np.ndarray] = []
    for class_id in np.unique(real_ids):
        members = candidates[synthetic_ids[candidates] == class_id]
        if recipe.synthetic_ratio is not None:
            limit = int(round(recipe.synthetic_ratio * int((real_ids == class_id).sum())))
            if members.size > limit:
                members = rng.choice(members, size=limit, replace=False)
        chosen.append(np.sort(members))
    # Sorted: with every image admitted the mixed set keeps the synthetic dataset's order (same batches).
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=int)


def mixed_training_set(
    real_images: np.ndarray,
    real_ids: np.ndarray,
    synthetic_images: np.ndarray,
    synthetic_ids: np.ndarray,
    recipe: Recipe,
    rng: np.random.Generator,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Real images plus the synthetic images ``recipe`` admits (see :func:`admitted`).

    Returns:
        (images, class ids, number of synthetic images added).
    """
    picked = admitted(real_ids, synthetic_ids, recipe, rng, keep)
    images = np.concatenate([real_images, synthetic_images[picked]])
    ids = np.concatenate([real_ids, synthetic_ids[picked]])
    return images, ids, int(picked.size)


@dataclass(frozen=True)
class ArmJob:
    """One real+synthetic classifier to train: its real images, the admitted synthetic images, its seed."""

    real_images: np.ndarray
    real_ids: np.ndarray
    synthetic_images: np.ndarray
    synthetic_ids: np.ndarray
    seed: int


def arm_job(
    real_images: np.ndarray,
    real_ids: np.ndarray,
    synthetic_images: np.ndarray,
    synthetic_ids: np.ndarray,
    recipe: Recipe,
    seed: int,
    keep: np.ndarray | None = None,
) -> ArmJob:
    """The :class:`ArmJob` of one seed: the synthetic images ``recipe`` admits, drawn with the seed."""
    picked = admitted(real_ids, synthetic_ids, recipe, np.random.default_rng(seed), keep)
    return ArmJob(real_images, real_ids, synthetic_images[picked], synthetic_ids[picked], seed)


def train_arm(
    jobs: list[ArmJob],
    recipe: Recipe,
    n_classes: int,
    *,
    workers: int,
    feature_dim: int,
    steps: int,
    batch_size: int,
    lr: float,
) -> list[ConvNet]:
    """Train the real+synthetic classifiers side by side (threads, one intra-op thread each).

    Mixed: one classifier on the real and admitted synthetic images together; pretrain: synthetic
    first, then real (:func:`pretrain_then_fine_tune`). Results do not depend on ``workers``.
    """
    if not recipe.pretrain:
        return train_classifiers(
            [
                TrainingJob(np.concatenate([job.real_images, job.synthetic_images]),
                            np.concatenate([job.real_ids, job.synthetic_ids]), job.seed)
                for job in jobs
            ],
            n_classes, workers=workers, feature_dim=feature_dim, steps=steps, batch_size=batch_size, lr=lr,
        )
    return side_by_side(
        [
            partial(pretrain_then_fine_tune, job.real_images, job.real_ids, job.synthetic_images, job.synthetic_ids,
                    n_classes, feature_dim=feature_dim, steps=steps, batch_size=batch_size, lr=lr, seed=job.seed)
            for job in jobs
        ],
        workers,
    )


def pretrain_then_fine_tune(
    real_images: np.ndarray,
    real_ids: np.ndarray,
    synthetic_images: np.ndarray,
    synthetic_ids: np.ndarray,
    n_classes: int,
    *,
    feature_dim: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> ConvNet:
    """Half of ``steps`` on the synthetic images, the other half on the real ones (one classifier's cost).

    The fine-tuning half restarts the learning-rate schedule (warm-up, cosine decay) on the real
    images, the usual transfer-learning recipe; without synthetic images it is plain real training.
    """
    if not len(synthetic_ids):
        return train_classifier(
            real_images, real_ids, n_classes, feature_dim=feature_dim, steps=steps, batch_size=batch_size, lr=lr,
            seed=seed,
        )
    first = max(1, steps // 2)
    model = train_classifier(
        synthetic_images, synthetic_ids, n_classes, feature_dim=feature_dim, steps=first, batch_size=batch_size,
        lr=lr, seed=seed,
    )
    return train_classifier(
        real_images, real_ids, n_classes, feature_dim=feature_dim, steps=max(1, steps - first),
        batch_size=batch_size, lr=lr, seed=seed + 1, init=model,
    )
