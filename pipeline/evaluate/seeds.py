"""Every seed the evaluate stage draws from, by purpose, in one table.

Each random draw of an evaluation (image subsampling, KID subsets, the matched-size references, MS-SSIM
pairs, bootstrap resamples, classifier initialisations, the re-identification network, the report's
image grids) takes its seed from :func:`purpose_seed`: one named stream per purpose
(:func:`pipeline.core.seeds.stream_seed` of the run's seed, the purpose and an index), so no two
purposes share a seed, e.g. the random-CNN feature space never starts from the weights of a utility
classifier, whatever ``evaluate.seed`` is.

The ``subsample`` stream also fixes the default preprocessing's intensity sampling; the export
stage re-measures distances with ``stream_seed(seed, "subsample", 0)`` (it may not import this
module), so that purpose's name must not change.
"""

from __future__ import annotations

from pipeline.core.seeds import stream_seed
from pipeline.evaluate.config import EvaluateConfig

__all__ = ["PURPOSES", "purpose_seed"]

PURPOSES: frozenset[str] = frozenset(
    {
        "subsample",  # the max_images cap and the intensity sampling (export re-measures with it)
        "kid",  # KID's random subsets
        "classifier",  # + the training seed's index: encoder and utility classifiers
        "random_space",  # the random-init CNN feature space
        "matched",  # subject draws of the size-matched references
        "diversity",  # same-class MS-SSIM pairs
        "mia_bootstrap",  # subject bootstrap of the membership-inference intervals
        "reid_network",  # the re-identification attack's siamese network and its training pairs
        "reid_bootstrap",  # subject bootstrap of the re-identification interval
        "utility_bootstrap",  # subject bootstrap of the utility arms
        "chance_bootstrap",  # subject bootstrap of "beats chance on held-out real"
        "learning_curve",  # + the training seed's index: the learning curve's classifiers (index 0: its bootstrap)
        "grids",  # the images shown per class in report.html
    }
)


def purpose_seed(config: EvaluateConfig, purpose: str, index: int = 0) -> int:
    """The seed of one purpose's draws (``index``: which of several, e.g. the n-th classifier).

    Raises:
        KeyError: ``purpose`` is not in :data:`PURPOSES`.
    """
    if purpose not in PURPOSES:
        raise KeyError(f"unknown seed purpose {purpose!r}; add it to pipeline.evaluate.seeds.PURPOSES")
    return stream_seed(config.seed, purpose, index)
