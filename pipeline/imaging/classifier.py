"""The small CNN classifier shared by model selection (train) and the evaluation (evaluate).

One architecture serves several roles: trained on the real training labels it is a feature space
(its pooled last stage) and a label judge; left at its seeded random initialisation it is a
cross-check feature space (Naeem et al. 2020 showed random CNN embeddings rank generative models
sensibly). It works at the images' native resolution, in 2D or 3D, and trains in seconds on a CPU.
Training uses an explicit random generator, never torch's global one, so the same seed gives the
same weights wherever it runs (a training loop, a thread pool).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["ConvNet", "train_classifier", "embed", "predict_proba", "stage_count", "stem_stride"]

_INFERENCE_BATCH = 256


def stem_stride(spatial: tuple[int, ...]) -> int:
    """Patch size of the stem: brings the smallest side to <= 16 voxels, at most 4 (keeps detail)."""
    return int(min(4, max(1, min(spatial) // 16)))


def stage_count(spatial: tuple[int, ...]) -> int:
    """Stride-2 stages after the stem that keep the smallest side at >= 2 voxels (1 to 5)."""
    smallest = max(2, min(spatial) // stem_stride(spatial))
    return int(min(5, max(1, math.floor(math.log2(smallest)) - 1)))


def _conv_norm_relu(
    spatial_dims: int, channels_in: int, channels_out: int, kernel: int, stride: int
) -> list[nn.Module]:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    padding = kernel // 2 if kernel == 3 else 0
    return [
        conv(channels_in, channels_out, kernel, stride=stride, padding=padding, bias=False),
        norm(channels_out),
        nn.ReLU(inplace=True),
    ]


class ConvNet(nn.Module):
    """Plain CNN: a patch stem, stride-2 conv stages doubling the width, global average pooling.

    Every input pixel is seen (the stem is a non-overlapping patch embedding, no resizing), and
    the cost stays a few MFLOP per 64x64 image so training takes seconds on two CPU cores. Weights
    start from He-normal initialisation, which keeps activations at unit scale through the
    stages: the random-init cross-check space needs that.

    Args:
        spatial_dims: 2 or 3.
        spatial: input spatial shape (decides the stem's patch size and the number of stages).
        feature_dim: channels of the last stage = the feature dimension.
        n_classes: size of the linear classification head (0: no head).
        seed: seed of the initial weights.
    """

    def __init__(
        self, spatial_dims: int, spatial: tuple[int, ...], feature_dim: int, n_classes: int = 0, seed: int = 0
    ) -> None:
        super().__init__()
        patch, stages = stem_stride(spatial), stage_count(spatial)
        widths = [max(8, feature_dim // 2 ** (stages - i)) for i in range(stages + 1)]
        widths[-1] = feature_dim
        layers = _conv_norm_relu(spatial_dims, 1, widths[0], patch, patch)
        for channels_in, channels_out in zip(widths[:-1], widths[1:]):
            layers += _conv_norm_relu(spatial_dims, channels_in, channels_out, 3, 2)
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(feature_dim, n_classes) if n_classes > 0 else None
        # An explicit generator, not torch's global RNG: networks built concurrently in threads
        # (see train_classifiers) get the same weights for the same seed.
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.weight, -bound, bound, generator=generator)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled last-stage activations (N, feature_dim)."""
        return self.pool(self.body(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        return self.head(features) if self.head is not None else features


def _balanced_indices(labels: np.ndarray, count: int, generator: torch.Generator) -> torch.Tensor:
    """Indices drawn so every class is equally likely (small, imbalanced medical sets)."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    weights = torch.as_tensor(1.0 / counts[inverse], dtype=torch.float64)
    return torch.multinomial(weights, count, replacement=True, generator=generator)


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips along every spatial axis and a random shift of up to 1/8 of the size.

    Small medical training sets are memorized within a few hundred steps; these label-preserving
    changes (position and side of a finding do not change its class) make the classifier, and
    with it the trained feature space, generalize to held-out images.
    """
    shape = (-1, *([1] * (batch.ndim - 1)))
    for axis in range(2, batch.ndim):
        flip = torch.rand(batch.shape[0], generator=generator) < 0.5
        batch = torch.where(flip.view(shape), batch.flip(axis), batch)
    shifts = []
    for axis in range(2, batch.ndim):
        limit = max(1, batch.shape[axis] // 8)
        shifts.append(int(torch.randint(-limit, limit + 1, (1,), generator=generator)))
    # One shift per batch keeps this a single tensor op; the background fills the wrapped edge.
    return torch.roll(batch, shifts=tuple(shifts), dims=tuple(range(2, batch.ndim)))


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    feature_dim: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    init: ConvNet | None = None,
) -> ConvNet:
    """Train a :class:`ConvNet` classifier (class-balanced batches, flips and shifts); eval mode.

    Args:
        images: (N, 1, *spatial) float32 in [-1, 1].
        labels: (N,) integer class ids in [0, n_classes).
        n_classes: number of classes.
        feature_dim: width of the last stage.
        steps: optimizer steps.
        batch_size: images per step.
        lr: Adam learning rate.
        seed: same seed, same weights (no global RNG is touched, so it is safe in threads).
        init: continue from this network's weights (fine-tuning; trained in place) instead of a
            fresh one: the schedule restarts (warm-up, cosine decay), the usual transfer recipe.
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_dims = images.ndim - 2
    model = init if init is not None else ConvNet(spatial_dims, tuple(images.shape[2:]), feature_dim, n_classes, seed=seed)
    # foreach: one fused update over all parameters instead of ~14 tiny ops per tensor per step.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4, foreach=True)
    # Cosine decay to zero: the last iterate (the one we keep) is a settled one, not a noisy step.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    order = _balanced_indices(np.asarray(labels), steps * batch_size, generator).view(steps, batch_size)
    model.train()
    for step in range(steps):
        batch = _augment(data[order[step]], generator)
        loss = loss_fn(model(batch), targets[order[step]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray) -> np.ndarray:
    outputs = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], _INFERENCE_BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + _INFERENCE_BATCH], dtype=np.float32))
            outputs.append(fn(batch).float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def embed(extractor: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray) -> np.ndarray:
    """Features (N, D) float64 of ``images`` under ``extractor`` (batched, no gradients)."""
    return _batched(extractor, images).astype(np.float64)


def predict_proba(model: ConvNet, images: np.ndarray) -> np.ndarray:
    """Class probabilities (N, n_classes) of a trained classifier."""
    return _batched(lambda x: torch.softmax(model(x), dim=1), images).astype(np.float64)
