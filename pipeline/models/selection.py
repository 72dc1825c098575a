"""Model selection on held-out real images: which EMA generator to export, and when training has converged.

At every evaluation the EMA generator draws a fixed set of images (the same noise each time, the
validation split's class mix) and is scored against the real **validation** split (never the
test split) with a judge trained once per run on the real **training** split:

- ``fid``: Fréchet distance in the judge's feature space (its pooled last stage, the space
  evaluate's headline FID uses), features z-scored by the training images' statistics;
- ``label_accuracy``: the judge's balanced accuracy on the synthetic images' intended labels
  (GAN-test, Shmelkov et al. 2018), beside ``real_accuracy``, its balanced accuracy on the real
  validation images.

One number ranks the evaluations (lower is better)::

    criterion = fid * (1 + max(0, LABEL_RATIO * real_accuracy - label_accuracy) / LABEL_TOLERANCE)

A generator whose images carry their labels as well as 95 % of what the judge reads on real ones
is ranked by FID alone; below that, each ``LABEL_TOLERANCE`` of missing label accuracy adds one
more FID: a sharp generator of the wrong class never beats a slightly blurrier correct one.

:class:`Selector` keeps the best generator's weights (and the discriminator of the same step),
counts the evaluations since the last improvement (an improvement lowers the best criterion by
more than ``MIN_IMPROVEMENT``, so noise does not keep a finished run going), and says when
``patience`` evaluations passed without one: the run has converged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.seeds import stream_seed
from pipeline.imaging.classifier import ConvNet, embed, predict_proba, train_classifier
from pipeline.imaging.frechet import fid_to_fit, gaussian_fit, standardize

__all__ = [
    "LABEL_RATIO",
    "LABEL_TOLERANCE",
    "MIN_IMPROVEMENT",
    "JUDGE_STEPS",
    "SelectionScore",
    "selection_criterion",
    "HeldOutJudge",
    "Selector",
]

# Label accuracy a selected generator should reach, relative to the judge on real images (the
# issue's acceptance reads GAN-test >= 0.95 x real held-out accuracy).
LABEL_RATIO = 0.95
# Each this much label accuracy below LABEL_RATIO x real adds one FID to the criterion.
LABEL_TOLERANCE = 0.05
# A new best must lower the criterion by more than this fraction (FID fluctuates by a few % between
# evaluations of a settled generator).
MIN_IMPROVEMENT = 0.02
# The judge: a small CNN, seconds to train on a CPU (the recipe of evaluate's encoder, fewer steps).
JUDGE_STEPS = 200
JUDGE_BATCH = 32
JUDGE_LR = 2e-3
JUDGE_FEATURES = 64
# Synthetic images per evaluation: the validation class mix, repeated to at least this many (FID's
# bias falls with the sample size) and at most the cap (keeps an evaluation to about a second).
MIN_FAKES = 128
MAX_FAKES = 512


def selection_criterion(fid_value: float, label_accuracy: float, real_accuracy: float) -> float:
    """The ranking number (lower is better): FID, inflated when the labels fall short (module docstring)."""
    shortfall = max(0.0, LABEL_RATIO * real_accuracy - label_accuracy)
    return fid_value * (1.0 + shortfall / LABEL_TOLERANCE)


@dataclass(frozen=True)
class SelectionScore:
    """One evaluation of the EMA generator on the validation split.

    Attributes:
        step: the training step evaluated.
        fid: Fréchet distance to the validation images in the judge's feature space.
        label_accuracy: the judge's balanced accuracy on the synthetic images' labels.
        real_accuracy: the judge's balanced accuracy on the real validation images.
        criterion: :func:`selection_criterion` of the three.
        augment_p: the augmentation probability at that step (ADA; None for a fixed list).
    """

    step: int
    fid: float
    label_accuracy: float
    real_accuracy: float
    criterion: float
    augment_p: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Rounded for ``model.json``."""
        return {key: (round(value, 5) if isinstance(value, float) else value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> SelectionScore:
        """Inverse of :meth:`as_dict` (a checkpoint's history)."""
        return cls(**{key: payload.get(key) for key in cls.__dataclass_fields__})  # type: ignore[arg-type]


def _balanced_accuracy(predicted: np.ndarray, targets: np.ndarray) -> float:
    classes = np.unique(targets)
    return float(np.mean([np.mean(predicted[targets == label] == label) for label in classes]))


class HeldOutJudge:
    """What every evaluation of a run shares: the judge, the validation features and the fixed noise.

    Args:
        train_images: the real training images (N, 1, *spatial) in [-1, 1].
        train_targets: their label ids (N,).
        val_images: the real validation images, preprocessed the same way.
        val_targets: their label ids.
        n_classes: number of labels.
        latent_dim: the generator's noise length.
        seed: the run's seed (judge weights, noise).
    """

    def __init__(
        self,
        train_images: torch.Tensor,
        train_targets: torch.Tensor,
        val_images: np.ndarray,
        val_targets: np.ndarray,
        n_classes: int,
        latent_dim: int,
        seed: int,
    ) -> None:
        self.judge: ConvNet = train_classifier(
            train_images.numpy(),
            train_targets.numpy(),
            n_classes,
            feature_dim=JUDGE_FEATURES,
            steps=JUDGE_STEPS,
            batch_size=JUDGE_BATCH,
            lr=JUDGE_LR,
            seed=stream_seed(seed, "selection-judge"),
        )
        self.judge.requires_grad_(False)
        # z-scored by the training images' statistics: more images than the validation split, so a
        # feature that happens to be nearly constant on a few validation subjects is not blown up.
        self._train_features = embed(self.judge.features, train_images.numpy())
        _, val_features = standardize(self._train_features, embed(self.judge.features, val_images))
        self._fit = gaussian_fit(val_features)
        self.real_accuracy = _balanced_accuracy(predict_proba(self.judge, val_images).argmax(1), val_targets)
        repeats = max(1, math.ceil(MIN_FAKES / len(val_targets)))
        labels = np.tile(np.asarray(val_targets, dtype=np.int64), repeats)
        if len(labels) > MAX_FAKES:  # an even subsample keeps the validation class mix
            labels = labels[np.linspace(0, len(labels) - 1, MAX_FAKES).astype(np.int64)]
        self.labels = torch.from_numpy(labels)
        noise = torch.Generator().manual_seed(stream_seed(seed, "selection-noise"))
        self.noise = torch.randn(len(labels), latent_dim, generator=noise)
        self.n_val = len(val_targets)

    @torch.no_grad()
    def score(self, ema: nn.Module, step: int, device: torch.device, augment_p: float | None = None) -> SelectionScore:
        """Score the EMA generator at ``step`` (its images are drawn on ``device``, judged on the CPU)."""
        fakes = []
        for start in range(0, len(self.labels), 256):
            z = self.noise[start : start + 256].to(device)
            y = self.labels[start : start + 256].to(device)
            fakes.append(ema(z, y).float().cpu())
        images = torch.cat(fakes).numpy()
        features = embed(self.judge.features, images)
        _, fake_features = standardize(self._train_features, features)
        fid_value = fid_to_fit(self._fit, fake_features)
        accuracy = _balanced_accuracy(predict_proba(self.judge, images).argmax(1), self.labels.numpy())
        return SelectionScore(
            step=step,
            fid=fid_value,
            label_accuracy=accuracy,
            real_accuracy=self.real_accuracy,
            criterion=selection_criterion(fid_value, accuracy, self.real_accuracy),
            augment_p=augment_p,
        )


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone().contiguous() for key, value in module.state_dict().items()}


@dataclass
class Selector:
    """The best evaluation so far, its weights, and how many evaluations have passed without a better one.

    Attributes:
        patience: evaluations without improvement after which the run has converged.
        history: every evaluation, in order.
        best: the best evaluation (None before the first).
        best_state: ``{"ema": ..., "discriminator": ...}`` CPU state dicts of the best step.
        stale: evaluations since ``best``.
    """

    patience: int
    history: list[SelectionScore] = field(default_factory=list)
    best: SelectionScore | None = None
    best_state: dict[str, dict[str, torch.Tensor]] | None = None
    stale: int = 0

    @property
    def converged(self) -> bool:
        """``patience`` evaluations in a row failed to improve on the best."""
        return self.best is not None and self.stale >= self.patience

    @property
    def evaluated_steps(self) -> set[int]:
        """Steps already evaluated."""
        return {score.step for score in self.history}

    def update(self, score: SelectionScore, ema: nn.Module, discriminator: nn.Module) -> bool:
        """Record ``score``; keep the networks' weights when it is a new best. Returns True on a new best."""
        self.history.append(score)
        improved = self.best is None or (
            math.isfinite(score.criterion) and score.criterion < self.best.criterion * (1.0 - MIN_IMPROVEMENT)
        )
        if improved:
            self.best, self.stale = score, 0
            self.best_state = {"ema": _cpu_state(ema), "discriminator": _cpu_state(discriminator)}
        else:
            self.stale += 1
        return improved

    def state_dict(self) -> dict[str, Any]:
        """The history and counters a checkpoint keeps (the best weights are saved as the exported networks)."""
        return {
            "history": [score.as_dict() for score in self.history],
            "best_step": self.best.step if self.best is not None else None,
            "stale": self.stale,
        }

    def load_state_dict(self, state: dict[str, Any], best_state: dict[str, dict[str, torch.Tensor]] | None) -> None:
        """Restore :meth:`state_dict` and the best step's weights (from the checkpoint's exported networks)."""
        self.history = [SelectionScore.from_dict(item) for item in state["history"]]
        best_step = state.get("best_step")
        self.best = next((score for score in self.history if score.step == best_step), None)
        self.best_state = best_state if self.best is not None else None
        self.stale = int(state["stale"])

    def record(self) -> dict[str, Any] | None:
        """``model.json``'s ``selection`` entry (None before the first evaluation)."""
        if self.best is None:
            return None
        return {
            "criterion": "fid * (1 + max(0, 0.95 * real_accuracy - label_accuracy) / 0.05), validation split, "
            "judge trained on the training split",
            "selected_step": self.best.step,
            "best": self.best.as_dict(),
            "patience": self.patience,
            "evaluations_since_best": self.stale,
            "history": [score.as_dict() for score in self.history],
        }
