"""Fréchet distance between feature sets (FID, Heusel et al. 2017), shared by train and evaluate.

The trace of the matrix square root is taken from the eigenvalues of ``sqrt(S1) S2 sqrt(S1)``
(symmetric, so ``eigh``), which equals ``tr sqrtm(S1 S2)`` (``monai.metrics.FIDMetric``'s formula)
but stays real and stable when a covariance is singular, as it is whenever a set has fewer images
than feature dimensions (small medical data), where ``scipy.linalg.sqrtm`` returns complex noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GaussianFit", "gaussian_fit", "fid", "fid_to_fit", "standardize"]


def standardize(reference: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Z-score every array with the mean and standard deviation of ``reference``.

    Puts every feature space on one scale (KID's kernel assumes unit-scale features) without
    changing FID or the k-NN structure's meaning; dimensions constant in ``reference`` are kept
    unscaled.
    """
    mean = reference.mean(axis=0)
    std = reference.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return [(array - mean) / std for array in (reference, *others)]


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


@dataclass(frozen=True)
class GaussianFit:
    """Mean, covariance and covariance square root of one feature set (FID's real side, reusable)."""

    mean: np.ndarray
    cov: np.ndarray
    root: np.ndarray


def gaussian_fit(features: np.ndarray) -> GaussianFit:
    """The Gaussian fit of ``features`` (N >= 2), with the square root FID needs."""
    features = np.asarray(features, dtype=np.float64)
    cov = np.atleast_2d(np.cov(features, rowvar=False))
    return GaussianFit(mean=features.mean(axis=0), cov=cov, root=_sqrt_psd(cov))


def fid_to_fit(real_fit: GaussianFit, fake: np.ndarray) -> float:
    """Fréchet distance between a fitted real set and the Gaussian fit of ``fake`` (M >= 2 vectors; >= 0)."""
    fake = np.asarray(fake, dtype=np.float64)
    if fake.shape[0] < 2:
        raise ValueError("FID needs at least 2 vectors per set")
    mu_f = fake.mean(axis=0)
    cov_f = np.atleast_2d(np.cov(fake, rowvar=False))
    middle = real_fit.root @ cov_f @ real_fit.root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    value = float(((real_fit.mean - mu_f) ** 2).sum() + np.trace(real_fit.cov) + np.trace(cov_f) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def fid(real: np.ndarray, fake: np.ndarray, real_fit: GaussianFit | None = None) -> float:
    """Fréchet distance between the Gaussian fits of ``real`` and ``fake`` (>= 0).

    Args:
        real: (N, D) features.
        fake: (M, D) features.
        real_fit: :func:`gaussian_fit` of ``real``, when one real set is compared with many fake ones.

    Raises:
        ValueError: a set has fewer than 2 vectors.
    """
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError("FID needs at least 2 vectors per set")
    return fid_to_fit(real_fit if real_fit is not None else gaussian_fit(real), fake)
