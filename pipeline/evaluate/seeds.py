"""Every seed the evaluate stage draws from, by purpose, in one table.

Each random draw of an evaluation (image subsampling, KID subsets, the recall/coverage subsamples,
MS-SSIM pairs, bootstrap resamples, classifier initialisations, the report's image grids) takes its
seed from :func:`purpose_seed`, so how seeds are derived is decided here and nowhere else. The
offsets are the ones the report's figures have always been computed with: changing one changes the
report's numbers.
"""

from __future__ import annotations

from types import MappingProxyType

from pipeline.evaluate.config import EvaluateConfig

__all__ = ["SEED_OFFSETS", "purpose_seed"]

SEED_OFFSETS = MappingProxyType(
    {
        "subsample": 0,  # the max_images cap on each image set (export re-measures with it: keep in step)
        "kid": 0,  # KID's random subsets
        "classifier": 0,  # + the training seed's index: encoder and utility classifiers
        "random_space": 1,  # the random-init CNN feature space
        "matched": 11,  # equal-size subsamples for recall/coverage against the reference
        "diversity": 21,  # same-class MS-SSIM pairs
        "mia_bootstrap": 31,  # subject bootstrap of the membership-inference AUC intervals
        "utility_bootstrap": 41,  # subject/seed bootstrap of the utility arms
        "chance_bootstrap": 43,  # subject/seed bootstrap of "beats chance on held-out real"
        "grids": 51,  # the images shown per class in report.html
    }
)


def purpose_seed(config: EvaluateConfig, purpose: str, index: int = 0) -> int:
    """The seed of one purpose's draws (``index``: which of several, e.g. the n-th classifier).

    Raises:
        KeyError: ``purpose`` is not in :data:`SEED_OFFSETS`.
    """
    return config.seed + SEED_OFFSETS[purpose] + index
