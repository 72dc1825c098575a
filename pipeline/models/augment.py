"""Differentiable augmentation for small data (DiffAugment, Zhao et al. 2020), 2D and 3D.

The same random transform family is applied to real and fake images before the discriminator,
so D cannot memorise the few real images while G still learns the un-augmented distribution
(every operation is differentiable with respect to the images). Randomness comes from an
explicit ``torch.Generator`` so a training step is reproducible (and resumable) from its seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["diff_augment"]


def _per_sample(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    shape = (images.shape[0],) + (1,) * (images.dim() - 1)
    return torch.rand(shape, generator=generator, device=images.device, dtype=torch.float32).to(images.dtype)


def brightness(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Add a per-image offset in [-0.5, 0.5] (images live in [-1, 1])."""
    return images + (_per_sample(images, generator) - 0.5)


def contrast(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scale each image about its mean by a factor in [0.5, 1.5]."""
    mean = images.mean(dim=tuple(range(1, images.dim())), keepdim=True)
    return (images - mean) * (_per_sample(images, generator) + 0.5) + mean


def translation(images: torch.Tensor, generator: torch.Generator, ratio: float) -> torch.Tensor:
    """Shift each image by a whole number of voxels up to ``ratio`` of each side; exposed borders read -1 (air)."""
    batch, spatial = images.shape[0], images.shape[2:]
    dims = len(spatial)
    theta = torch.zeros(batch, dims, dims + 1, device=images.device, dtype=torch.float32)
    for axis in range(dims):
        theta[:, axis, axis] = 1.0
        limit = int(spatial[axis] * ratio + 0.5)
        shift = torch.randint(-limit, limit + 1, (batch,), generator=generator, device=images.device)
        # affine_grid/grid_sample order the coordinates last-axis-first; align_corners=False: 1 voxel = 2/size.
        theta[:, dims - 1 - axis, dims] = shift.float() * 2.0 / spatial[axis]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False).to(images.dtype)
    # zero padding is added to (x + 1) so that exposed borders become -1, the background value.
    return F.grid_sample(images + 1.0, grid, mode="nearest", padding_mode="zeros", align_corners=False) - 1.0


def cutout(images: torch.Tensor, generator: torch.Generator, ratio: float) -> torch.Tensor:
    """Blank one box per image (side ``ratio`` of each image side) to 0, at a random position."""
    batch, spatial = images.shape[0], images.shape[2:]
    box = torch.ones((batch, 1, *spatial), device=images.device, dtype=torch.bool)
    for axis, side in enumerate(spatial):
        half = max(int(side * ratio + 0.5), 2) // 2
        centre = torch.randint(0, side, (batch,), generator=generator, device=images.device)
        coords = torch.arange(side, device=images.device)
        inside = (coords[None, :] >= centre[:, None] - half) & (coords[None, :] < centre[:, None] + half)
        view = [batch] + [1] * (len(spatial) + 1)
        view[2 + axis] = side
        box = box & inside.view(view)
    return images * (~box).to(images.dtype)


def diff_augment(
    images: torch.Tensor,
    policy: Sequence[str],
    generator: torch.Generator,
    translation_ratio: float = 0.125,
    cutout_ratio: float = 0.25,
) -> torch.Tensor:
    """Apply the augmentations named in ``policy`` (colour first, then translation, then cutout)."""
    if "brightness" in policy:
        images = brightness(images, generator)
    if "contrast" in policy:
        images = contrast(images, generator)
    if "translation" in policy and translation_ratio > 0:
        images = translation(images, generator, translation_ratio)
    if "cutout" in policy and cutout_ratio > 0:
        images = cutout(images, generator, cutout_ratio)
    return images
