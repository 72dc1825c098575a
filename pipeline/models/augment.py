"""Differentiable discriminator augmentation for small data, fixed or adaptive, 2D and 3D.

Two ways to augment, both applied to real **and** fake images before the discriminator with
operations that are differentiable with respect to the images, so G still learns the
un-augmented distribution while D cannot memorise the few real images:

- a fixed list (DiffAugment, Zhao et al. 2020): every operation on every image, every step;
- adaptive (ADA, Karras et al. 2020, "Training Generative Adversarial Networks with Limited
  Data"): each operation is applied to each image independently with probability ``p``, and
  :class:`AdaController` moves ``p`` with an overfitting signal measured on the discriminator,
  ``r_t = E[sign(D(real))]``: D that calls (nearly) every real image real is memorising them, so
  ``p`` rises; D that is unsure lowers it.

ADA's augmentations do not *leak* into the generator (G does not learn to produce augmented
images) as long as every operation leaves some images untouched (``p`` < 1 with an identity
outcome) and its distribution can be told apart from the original's: integer translation, cutout,
brightness and contrast all qualify (Karras et al. 2020, Sec. 2.2). Flips and 90-degree rotations,
which ADA also uses, are left out: left and right are not interchangeable in medical images.
Brightness and contrast are for intensities without absolute units (MR, X-ray); for CT the
planner leaves them out (HU are absolute: a lesion is a density difference).

Randomness comes from an explicit ``torch.Generator``, and every call draws the same numbers
whatever ``p`` is, so a step is reproducible (and resumable) from its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["diff_augment", "ada_augment", "AdaController", "ADA_BRIGHTNESS_STD", "ADA_CONTRAST_LOG2_STD"]

# ADA's colour parameters (StyleGAN2-ADA's augment pipe defaults) on images in [-1, 1].
ADA_BRIGHTNESS_STD = 0.2
ADA_CONTRAST_LOG2_STD = 0.5


def _per_sample(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    shape = (images.shape[0],) + (1,) * (images.dim() - 1)
    return torch.rand(shape, generator=generator, device=images.device, dtype=torch.float32).to(images.dtype)


def _sample_view(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return values.view((images.shape[0],) + (1,) * (images.dim() - 1)).to(images.dtype)


def brightness(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Add a per-image offset in [-0.5, 0.5] (images live in [-1, 1])."""
    return images + (_per_sample(images, generator) - 0.5)


def contrast(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scale each image about its mean by a factor in [0.5, 1.5]."""
    mean = images.mean(dim=tuple(range(1, images.dim())), keepdim=True)
    return (images - mean) * (_per_sample(images, generator) + 0.5) + mean


def _shift(images: torch.Tensor, shifts: list[torch.Tensor]) -> torch.Tensor:
    """Shift each image by whole voxels (``shifts[axis]``: (N,) ints per spatial axis); exposed borders read -1."""
    batch, spatial = images.shape[0], images.shape[2:]
    dims = len(spatial)
    theta = torch.zeros(batch, dims, dims + 1, device=images.device, dtype=torch.float32)
    for axis in range(dims):
        theta[:, axis, axis] = 1.0
        # affine_grid/grid_sample order the coordinates last-axis-first; align_corners=False: 1 voxel = 2/size.
        theta[:, dims - 1 - axis, dims] = shifts[axis].float() * 2.0 / spatial[axis]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False).to(images.dtype)
    # zero padding is added to (x + 1) so that exposed borders become -1, the background value.
    return F.grid_sample(images + 1.0, grid, mode="nearest", padding_mode="zeros", align_corners=False) - 1.0


def _random_shifts(images: torch.Tensor, generator: torch.Generator, ratio: float) -> list[torch.Tensor]:
    shifts = []
    for side in images.shape[2:]:
        limit = int(side * ratio + 0.5)
        shifts.append(torch.randint(-limit, limit + 1, (images.shape[0],), generator=generator, device=images.device))
    return shifts


def translation(images: torch.Tensor, generator: torch.Generator, ratio: float) -> torch.Tensor:
    """Shift each image by a whole number of voxels up to ``ratio`` of each side; exposed borders read -1 (air)."""
    return _shift(images, _random_shifts(images, generator, ratio))


def _cutout_box(images: torch.Tensor, generator: torch.Generator, ratio: float) -> torch.Tensor:
    """(N, 1, *spatial) bool: one box per image, side ``ratio`` of each image side, at a random position."""
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
    return box


def cutout(images: torch.Tensor, generator: torch.Generator, ratio: float) -> torch.Tensor:
    """Blank one box per image (side ``ratio`` of each image side) to 0, at a random position."""
    return images * (~_cutout_box(images, generator, ratio)).to(images.dtype)


def diff_augment(
    images: torch.Tensor,
    policy: Sequence[str],
    generator: torch.Generator,
    translation_ratio: float = 0.125,
    cutout_ratio: float = 0.25,
) -> torch.Tensor:
    """Apply the augmentations named in ``policy`` to every image (colour first, then translation, then cutout)."""
    if "brightness" in policy:
        images = brightness(images, generator)
    if "contrast" in policy:
        images = contrast(images, generator)
    if "translation" in policy and translation_ratio > 0:
        images = translation(images, generator, translation_ratio)
    if "cutout" in policy and cutout_ratio > 0:
        images = cutout(images, generator, cutout_ratio)
    return images


def _chosen(images: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """(N,) bool: which images an operation applies to (each independently with probability ``p``)."""
    return torch.rand(images.shape[0], generator=generator, device=images.device) < p


def ada_augment(
    images: torch.Tensor,
    ops: Sequence[str],
    p: float,
    generator: torch.Generator,
    translation_ratio: float = 0.125,
    cutout_ratio: float = 0.25,
) -> torch.Tensor:
    """ADA's stochastic pipeline: each operation in ``ops`` hits each image independently with probability ``p``.

    Parameters follow StyleGAN2-ADA's augment pipe where it has them: integer translation uniform
    up to ``translation_ratio`` of each side, brightness ``b ~ N(0, 0.2)`` added, contrast
    ``c = 2^N(0, 0.5)`` about the image mean, and one cutout box of side ``cutout_ratio`` set to
    0. The random draws do not depend on ``p`` (the stream stays the same when ``p`` moves).

    Args:
        images: (N, 1, *spatial) in [-1, 1] (real or fake; gradients flow through).
        ops: names among translation, cutout, brightness, contrast.
        p: the augmentation probability in [0, 1].
        generator: the step's random stream.
        translation_ratio: the largest shift as a fraction of each side.
        cutout_ratio: the cutout box side as a fraction of each side.
    """
    if "brightness" in ops:
        chosen = _chosen(images, generator, p)
        offset = torch.randn(images.shape[0], generator=generator, device=images.device) * ADA_BRIGHTNESS_STD
        images = _where(chosen, images + _sample_view(offset, images), images)
    if "contrast" in ops:
        chosen = _chosen(images, generator, p)
        log2 = torch.randn(images.shape[0], generator=generator, device=images.device) * ADA_CONTRAST_LOG2_STD
        mean = images.mean(dim=tuple(range(1, images.dim())), keepdim=True)
        images = _where(chosen, (images - mean) * _sample_view(torch.exp2(log2), images) + mean, images)
    if "translation" in ops and translation_ratio > 0:
        chosen = _chosen(images, generator, p)
        images = _where(chosen, _shift(images, _random_shifts(images, generator, translation_ratio)), images)
    if "cutout" in ops and cutout_ratio > 0:
        chosen = _chosen(images, generator, p)
        images = _where(chosen, images * (~_cutout_box(images, generator, cutout_ratio)).to(images.dtype), images)
    return images


def _where(chosen: torch.Tensor, augmented: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per image: the augmented version where ``chosen``, the untouched input (exactly) elsewhere."""
    return torch.where(chosen.view((images.shape[0],) + (1,) * (images.dim() - 1)), augmented, images)


@dataclass
class AdaController:
    """ADA's feedback loop: moves the augmentation probability ``p`` towards the overfitting target.

    Every ``interval`` steps, ``r_t`` is the mean of ``sign(D(real))`` over those steps (on the
    augmented real images D saw), and ``p`` moves by ``sign(r_t - target) * images / speed_images``
    where ``images`` are the real images shown in the interval: ``p`` can go from 0 to 1 in
    ``speed_images`` images. ``p`` stays in [0, 1].

    Attributes:
        target: the ``r_t`` to hold (ADA: 0.6).
        interval: steps between adjustments (ADA: 4).
        speed_images: images over which ``p`` can change by 1 (ADA: 500k at its scale).
        images_per_step: real images per step over all processes.
        p: the current probability.
        sign_sum: sum of the per-step ``E[sign(D(real))]`` since the last adjustment.
        sign_steps: steps in that sum.
        last_rt: the ``r_t`` of the last adjustment (None before the first).
    """

    target: float
    interval: int
    speed_images: int
    images_per_step: int
    p: float = 0.0
    sign_sum: float = 0.0
    sign_steps: int = 0
    last_rt: float | None = None

    def observe(self, step: int, real_sign: float) -> None:
        """Add step ``step``'s ``E[sign(D(real))]`` (already averaged over processes); adjust ``p`` when due."""
        self.sign_sum += real_sign
        self.sign_steps += 1
        if step % self.interval != 0:
            return
        rt = self.sign_sum / self.sign_steps
        direction = (rt > self.target) - (rt < self.target)
        adjust = direction * self.images_per_step * self.sign_steps / self.speed_images
        self.p = min(1.0, max(0.0, self.p + adjust))
        self.last_rt = rt
        self.sign_sum, self.sign_steps = 0.0, 0

    def state_dict(self) -> dict[str, float | int | None]:
        """What a checkpoint keeps so that a resumed run goes on with the same ``p`` and accumulator."""
        return {"p": self.p, "sign_sum": self.sign_sum, "sign_steps": self.sign_steps, "last_rt": self.last_rt}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        """Restore :meth:`state_dict`'s values."""
        self.p = float(state["p"])  # type: ignore[arg-type]
        self.sign_sum = float(state["sign_sum"])  # type: ignore[arg-type]
        self.sign_steps = int(state["sign_steps"])  # type: ignore[arg-type]
        last = state.get("last_rt")
        self.last_rt = None if last is None else float(last)
