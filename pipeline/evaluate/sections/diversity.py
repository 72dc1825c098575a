"""The ``diversity`` section: MS-SSIM of random same-class synthetic pairs against real pairs."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.diversity import ms_ssim_pairs, ms_ssim_settings, same_class_pairs
from pipeline.evaluate.sections.common import put
from pipeline.evaluate.seeds import purpose_seed
from pipeline.imaging.images import ImageSet

__all__ = ["diversity_section"]


def diversity_section(
    train: ImageSet, synthetic: ImageSet, config: EvaluateConfig
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Mean MS-SSIM per class and overall, for synthetic pairs and for real pairs from different subjects.

    Returns:
        The section and, for report.html, every pair's MS-SSIM per class (``synthetic``, ``real``).
    """
    settings = ms_ssim_settings(tuple(train.images.shape[2:]))
    rng = np.random.default_rng(purpose_seed(config, "diversity"))
    synthetic_pairs = same_class_pairs(synthetic.labels, np.arange(len(synthetic)), config.ms_ssim_pairs, rng)
    real_pairs = same_class_pairs(train.labels, train.subject_ids, config.ms_ssim_pairs, rng)
    per_class: dict[str, Any] = {}
    evidence: dict[str, dict[str, np.ndarray]] = {}
    synthetic_means, real_means = [], []
    for label in sorted(set(synthetic_pairs) | set(real_pairs)):
        entry: dict[str, Any] = {}
        values_syn = ms_ssim_pairs(synthetic.images, synthetic_pairs.get(label, np.zeros((0, 2), int)), settings)
        values_real = ms_ssim_pairs(train.images, real_pairs.get(label, np.zeros((0, 2), int)), settings)
        put(
            entry,
            "ms_ssim",
            values_syn.mean() if values_syn.size else None,
            "fewer than 2 synthetic images of this class",
        )
        put(
            entry,
            "ms_ssim_real",
            values_real.mean() if values_real.size else None,
            "no pair of real training images of this class from different subjects",
        )
        entry["pairs"], entry["pairs_real"] = int(values_syn.size), int(values_real.size)
        per_class[label] = entry
        evidence[label] = {"synthetic": values_syn, "real": values_real}
        if entry["ms_ssim"] is not None and entry["ms_ssim_real"] is not None:
            synthetic_means.append(entry["ms_ssim"])
            real_means.append(entry["ms_ssim_real"])
    result: dict[str, Any] = {}
    reason = "no class has both synthetic pairs and real pairs from different subjects"
    put(result, "ms_ssim", float(np.mean(synthetic_means)) if synthetic_means else None, reason)
    put(result, "ms_ssim_real", float(np.mean(real_means)) if real_means else None, reason)
    excess = result["ms_ssim"] - result["ms_ssim_real"] if synthetic_means else None
    put(result, "ms_ssim_excess", excess, reason)
    result["per_class"] = per_class
    result["ms_ssim_settings"] = settings.record()
    return result, evidence
