"""Diversity: mean MS-SSIM of random same-class pairs (MONAI's ``MultiScaleSSIMMetric``).

A collapsed generator draws near-identical images, so its pairs score close to 1; the same figure
for real pairs (from different subjects) is the yardstick. MS-SSIM's standard settings (11-pixel
kernel, 5 scales) need images larger than 160 pixels; :func:`ms_ssim_settings` picks the most
scales, then the largest kernel, that MONAI accepts for the image size (64x64: kernel 7, 4 scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric

__all__ = ["MsSsimSettings", "ms_ssim_settings", "ms_ssim_pairs", "same_class_pairs"]

_STANDARD_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_KERNELS = ((11, 1.5), (7, 1.0), (5, 0.75))
_PAIR_BATCH = 256


@dataclass(frozen=True)
class MsSsimSettings:
    """Kernel and scale weights used for MS-SSIM at one image size."""

    kernel_size: int
    kernel_sigma: float
    weights: tuple[float, ...]

    def record(self) -> dict[str, object]:
        """Plain dict for the report."""
        return {
            "kernel_size": self.kernel_size,
            "kernel_sigma": self.kernel_sigma,
            "scales": len(self.weights),
            "weights": [round(w, 4) for w in self.weights],
            "data_range": 2.0,
        }


def _fits(side: int, scales: int, kernel: int) -> bool:
    # MONAI's own check (side // (scales - 1)^2 > kernel - 1), and the coarsest scale
    # (side / 2^(scales - 1)) must still hold the kernel, which MONAI's check alone does not ensure.
    return side // max(1, scales - 1) ** 2 > kernel - 1 and side // 2 ** (scales - 1) >= kernel


def ms_ssim_settings(spatial: tuple[int, ...]) -> MsSsimSettings:
    """Most scales (5 down to 1), then the largest Gaussian kernel (11, 7, 5, else 3) that fit."""
    side = int(min(spatial))
    for scales in range(5, 0, -1):
        for kernel, sigma in _KERNELS:
            if _fits(side, scales, kernel):
                weights = np.asarray(_STANDARD_WEIGHTS[:scales])
                return MsSsimSettings(kernel, sigma, tuple(float(w) for w in weights / weights.sum()))
    return MsSsimSettings(3, 0.5, (1.0,))


def same_class_pairs(
    labels: np.ndarray,
    groups: np.ndarray,
    per_class: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Random pairs (i, j) of images of the same class from different groups (subjects).

    Returns a dict label -> (n, 2) index array; classes with no valid pair map to an empty array.
    """
    pairs: dict[str, np.ndarray] = {}
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        found: list[tuple[int, int]] = []
        if members.size >= 2:
            # Draw extra candidates and keep cross-subject ones; vectorised, no rejection loop.
            first = rng.choice(members, size=per_class * 4)
            second = rng.choice(members, size=per_class * 4)
            keep = (first != second) & (groups[first] != groups[second])
            found = list(zip(first[keep][:per_class].tolist(), second[keep][:per_class].tolist()))
        pairs[str(label)] = np.asarray(found, dtype=np.int64).reshape(-1, 2)
    return pairs


def ms_ssim_pairs(images: np.ndarray, pairs: np.ndarray, settings: MsSsimSettings) -> np.ndarray:
    """MS-SSIM of each (i, j) pair of ``images`` (N, 1, *spatial) in [-1, 1]; NaNs dropped."""
    if pairs.size == 0:
        return np.zeros(0)
    metric = MultiScaleSSIMMetric(
        spatial_dims=images.ndim - 2,
        data_range=2.0,
        kernel_size=settings.kernel_size,
        kernel_sigma=settings.kernel_sigma,
        weights=settings.weights,
    )
    values = []
    with torch.inference_mode():
        for start in range(0, pairs.shape[0], _PAIR_BATCH):
            chunk = pairs[start : start + _PAIR_BATCH]
            first = torch.from_numpy(np.ascontiguousarray(images[chunk[:, 0]]))
            second = torch.from_numpy(np.ascontiguousarray(images[chunk[:, 1]]))
            values.append(metric(first, second).reshape(-1).double().numpy())
    result = np.concatenate(values)
    return result[np.isfinite(result)]
