"""The small CNN behind the feature spaces and the utility classifiers.

One architecture serves three roles: trained on the real training labels it is the default
feature space (its pooled last stage) and the real-only utility classifier; left at its seeded
random initialisation it is the cross-check feature space (Naeem et al. 2020 showed random CNN
embeddings rank generative models sensibly); trained on real + synthetic it is the augmented
classifier. It works at the images' native resolution, in 2D or 3D.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

# The network and its training recipe live in pipeline.imaging (training's model selection uses the
# same judge); evaluate adds training several side by side.
from pipeline.imaging.classifier import ConvNet, embed, predict_proba, stage_count, stem_stride, train_classifier

__all__ = [
    "ConvNet",
    "TrainingJob",
    "train_classifier",
    "train_classifiers",
    "side_by_side",
    "embed",
    "predict_proba",
    "stage_count",
    "stem_stride",
]


@dataclass(frozen=True)
class TrainingJob:
    """One classifier to train: images (N, 1, *spatial), integer labels, seed."""

    images: np.ndarray
    labels: np.ndarray
    seed: int


def train_classifiers(
    jobs: list[TrainingJob],
    n_classes: int,
    *,
    workers: int,
    feature_dim: int,
    steps: int,
    batch_size: int,
    lr: float,
) -> list[ConvNet]:
    """Train several classifiers side by side (:func:`side_by_side`); results do not depend on ``workers``."""
    return side_by_side(
        [
            partial(train_classifier, job.images, job.labels, n_classes, feature_dim=feature_dim, steps=steps,
                    batch_size=batch_size, lr=lr, seed=job.seed)
            for job in jobs
        ],
        workers,
    )


def side_by_side(trainings: list[Callable[[], ConvNet]], workers: int) -> list[ConvNet]:
    """Run independent trainings in ``workers`` threads, each on one intra-op thread; results in order.

    These networks are too small for intra-op parallelism to pay (measured here: 2 threads per op
    were no faster than 1 on an idle 2-core machine, and 2-4x slower when another process held a
    core, as OpenMP threads wait on each other at every tiny op). Torch releases the GIL inside
    its kernels, so independent trainings in threads use the cores instead. The intra-op thread
    count is restored afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [pool.submit(training) for training in trainings]
            return [future.result() for future in futures]
    finally:
        torch.set_num_threads(previous)
