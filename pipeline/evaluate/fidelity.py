"""Fidelity metrics on feature vectors: FID, KID, and precision/recall/density/coverage.

All functions take ``real`` and ``fake`` feature arrays of shape (N, D) and return plain floats.

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to the two sets. The trace of
  the matrix square root is taken from the eigenvalues of ``sqrt(S1) S2 sqrt(S1)`` (symmetric, so
  ``eigh``), which equals ``tr sqrtm(S1 S2)`` (``monai.metrics.FIDMetric``'s formula; the tests check
  the two agree) but stays real and stable when a covariance is singular, as it is whenever a set
  has fewer images than feature dimensions (small medical data), where ``scipy.linalg.sqrtm``
  returns complex noise and MONAI raises.
- KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel
  ``(x.y / D + 1)^3``, averaged over random subsets (``monai.metrics.MMDMetric`` uses a linear kernel,
  which only compares means, so it is not KID).
- Precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020) from k-NN
  balls.
"""

from __future__ import annotations


import numpy as np
import torch

from pipeline.imaging.frechet import GaussianFit, fid, gaussian_fit, standardize
from pipeline.imaging.neighbours import distance_chunks, kth_neighbour_radius

__all__ = ["GaussianFit", "gaussian_fit", "fid", "kid", "prdc", "standardize"]


def kid(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    subsets: int = 50,
    subset_size: int = 200,
    seed: int = 0,
) -> tuple[float, float, int]:
    """Kernel Inception Distance: unbiased MMD² (cubic polynomial kernel) over random subsets.

    Args:
        real: (N, D) features.
        fake: (M, D) features.
        subsets: number of random subsets.
        subset_size: images per subset; capped at min(N, M) so small sets still work.
        seed: subset sampling seed.

    Returns:
        (mean over subsets, standard deviation over subsets, the subset size used).

    Raises:
        ValueError: a set has fewer than 2 vectors.
    """
    size = int(min(subset_size, real.shape[0], fake.shape[0]))
    if size < 2:
        raise ValueError("KID needs at least 2 vectors per set")
    rng = np.random.default_rng(seed)
    dim = real.shape[1]
    # float32 kernels: twice as fast as float64, and the subset means carry far less error than
    # the subset-to-subset spread that KID's standard deviation reports.
    real_t = torch.from_numpy(np.asarray(real, dtype=np.float32))
    fake_t = torch.from_numpy(np.asarray(fake, dtype=np.float32))
    pick_r = torch.from_numpy(np.stack([rng.choice(real.shape[0], size, replace=False) for _ in range(subsets)]))
    pick_f = torch.from_numpy(np.stack([rng.choice(fake.shape[0], size, replace=False) for _ in range(subsets)]))
    x, y = real_t[pick_r], fake_t[pick_f]  # (S, m, D)
    k_xx = (x @ x.transpose(1, 2) / dim + 1.0) ** 3
    k_yy = (y @ y.transpose(1, 2) / dim + 1.0) ** 3
    k_xy = (x @ y.transpose(1, 2) / dim + 1.0) ** 3
    off = size * (size - 1)
    diag_xx = torch.diagonal(k_xx, dim1=1, dim2=2).sum(1)
    diag_yy = torch.diagonal(k_yy, dim1=1, dim2=2).sum(1)
    mmd = (k_xx.sum((1, 2)) - diag_xx) / off + (k_yy.sum((1, 2)) - diag_yy) / off - 2.0 * k_xy.sum((1, 2)) / size**2
    values = mmd.double().numpy()
    return float(values.mean()), float(values.std()), size


def prdc(
    real: np.ndarray,
    fake: np.ndarray,
    k: int = 5,
    real_radii: np.ndarray | None = None,
    real_groups: np.ndarray | None = None,
    fake_groups: np.ndarray | None = None,
) -> dict[str, float]:
    """Improved precision/recall and density/coverage with k-NN manifolds.

    precision: share of fake points inside some real point's k-NN ball (realism).
    recall: share of real points inside some fake point's k-NN ball (diversity).
    density: mean number of real balls holding each fake point, divided by k (~1 when the
    distributions match; rewards fakes where real data is dense).
    coverage: share of real points whose own ball holds at least one fake point.

    With subjects (``real_groups``), the real manifold is counted in subjects: a ball's radius is
    the distance to the k-th nearest other subject, and density counts the subjects (not the
    slices) whose balls hold a fake point. With one image per subject this is exactly the
    per-image definition.

    Args:
        real: (N, D) features, N > k.
        fake: (M, D) features, M > k.
        k: neighbourhood size (Naeem et al. recommend 5).
        real_radii: precomputed k-NN radii of ``real`` (reused across comparisons).
        real_groups, fake_groups: subject of each point (see
            :func:`pipeline.imaging.neighbours.kth_neighbour_radius`). Without them, 2D slices of
            one volume are each other's nearest neighbours, the balls shrink to nothing, and every
            figure reads 0.

    Raises:
        ValueError: a set has k or fewer points.
    """
    if real.shape[0] <= k or fake.shape[0] <= k:
        raise ValueError(f"precision/recall need more than k={k} points per set")
    radii_r = torch.from_numpy(real_radii if real_radii is not None else kth_neighbour_radius(real, k, real_groups))
    radii_f = torch.from_numpy(kth_neighbour_radius(fake, k, fake_groups))
    codes, n_groups = _group_codes(real_groups, real.shape[0])
    # Per (real subject, fake point): does any of the subject's balls hold the fake point?
    per_subject = torch.zeros((n_groups, fake.shape[0]), dtype=torch.float32) if codes is not None else None
    inside_count = torch.zeros(fake.shape[0], dtype=torch.float64)
    recalled = torch.zeros(real.shape[0], dtype=torch.bool)
    covered = torch.zeros(real.shape[0], dtype=torch.bool)
    for start, block in distance_chunks(real, fake):  # rows: real points, columns: fake points
        rows = slice(start, start + block.shape[0])
        in_real_ball = block < radii_r[rows, None]
        if per_subject is not None:
            per_subject.index_add_(0, codes[rows], in_real_ball.float())
        else:
            inside_count += in_real_ball.sum(0, dtype=torch.float64)
        recalled[rows] = (block < radii_f[None, :]).any(1)
        covered[rows] = in_real_ball.any(1)
    if per_subject is not None:
        inside_count = (per_subject > 0).sum(0, dtype=torch.float64)
    return {
        "precision": float((inside_count > 0).double().mean()),
        "recall": float(recalled.double().mean()),
        "density": float(inside_count.mean() / k),
        "coverage": float(covered.double().mean()),
    }


def _group_codes(groups: np.ndarray | None, count: int) -> tuple[torch.Tensor | None, int]:
    """Integer subject codes, or (None, count) when every point is its own subject (no grouping needed)."""
    if groups is None:
        return None, count
    names, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    if names.size == count:
        return None, count
    return torch.from_numpy(codes.astype(np.int64)), int(names.size)
