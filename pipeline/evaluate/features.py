"""Feature spaces that work offline.

No pretrained extractor can be downloaded here (torch-fidelity, clean-fid, torchmetrics' Inception
and MONAI's RadImageNet/MedicalNet all fetch weights), and a random-init InceptionV3 collapses
(FIELD_NOTES). So:

- ``trained-cnn`` (default headline space): the pooled last stage of a small CNN classifier trained,
  seeded, on the real **training** split's labels. It knows what distinguishes the classes and how
  real images vary, and it has never seen the held-out or synthetic images.
- ``random-cnn`` (cross-check): the same architecture at a seeded random initialisation
  (Naeem et al. 2020: random embeddings rank generative models sensibly). If both spaces agree, the
  verdict does not hinge on what the encoder learned.
- ``user:<file>``: a TorchScript extractor named by ``evaluate.feature_weights``; it becomes the
  headline space when given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.errors import InputError
from pipeline.evaluate.networks import ConvNet
from pipeline.core.files import sha256_file

__all__ = ["FeatureSpace", "trained_space", "random_space", "user_space"]


@dataclass(frozen=True)
class FeatureSpace:
    """A named extractor: images (N, 1, *spatial) in [-1, 1] -> features (N, D)."""

    name: str
    description: str
    extractor: Callable[[torch.Tensor], torch.Tensor]
    dim: int


def trained_space(classifier: ConvNet, feature_dim: int, steps: int) -> FeatureSpace:
    """The trained classifier's pooled last stage."""
    return FeatureSpace(
        name="trained-cnn",
        description=(
            f"{feature_dim}-d pooled last stage of a small CNN classifier trained ({steps} steps, seeded) "
            "on the real training split's labels; never saw held-out or synthetic images"
        ),
        extractor=classifier.features,
        dim=feature_dim,
    )


def random_space(spatial_dims: int, spatial: tuple[int, ...], feature_dim: int, seed: int) -> FeatureSpace:
    """The same CNN at a seeded He-normal random initialisation (cross-check space)."""
    network = ConvNet(spatial_dims, spatial, feature_dim, seed=seed).eval()
    return FeatureSpace(
        name="random-cnn",
        description=f"{feature_dim}-d pooled last stage of the same CNN at a random initialisation (seed {seed})",
        extractor=network.features,
        dim=feature_dim,
    )


def user_space(path: Path, example: np.ndarray) -> FeatureSpace:
    """A TorchScript extractor from ``evaluate.feature_weights``, checked on ``example`` images.

    Raises:
        InputError: the file is not TorchScript, or its output is not (N, D).
    """
    where = "config key 'evaluate.feature_weights'"
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # torch raises several types for a non-TorchScript file
        raise InputError(
            f"{where}: {path.name} is not a TorchScript module ({type(exc).__name__}). "
            "Fix: save the extractor with torch.jit.save(torch.jit.script(model), FILE)."
        ) from exc

    def extract(images: torch.Tensor) -> torch.Tensor:
        return module(images).reshape(images.shape[0], -1)

    with torch.inference_mode():
        try:
            probe = module(torch.from_numpy(np.ascontiguousarray(example[:2], dtype=np.float32)))
        except Exception as exc:
            raise InputError(
                f"{where}: {path.name} fails on images of shape {tuple(example.shape[1:])} "
                f"({type(exc).__name__}). Fix: give an extractor that takes (N, 1, *spatial) in [-1, 1]."
            ) from exc
    if probe.shape[0] != min(2, example.shape[0]):
        raise InputError(
            f"{where}: {path.name} must return one feature vector per image (got shape {tuple(probe.shape)})."
        )
    dim = int(np.prod(probe.shape[1:]))
    return FeatureSpace(
        name=f"user:{path.name}",
        description=f"{dim}-d features of the user-supplied TorchScript extractor {path.name} (sha256 {sha256_file(path)[:16]})",
        extractor=extract,
        dim=dim,
    )
