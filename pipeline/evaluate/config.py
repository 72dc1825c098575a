"""Configuration of the evaluate stage (``evaluate:``): feature spaces, metrics, gate thresholds.

Every gate compares the synthetic set with a **real-vs-real reference**: the held-out real images
(val + test) measured against the real training split in exactly the same way. Ratios to that
reference mean the same thing on any dataset, whatever the feature space's scale, and they absorb
the known biases of the metrics (k-NN precision and recall read ~0.7 even for identical
distributions). ``docs/evaluate.md`` explains every threshold.
"""

from __future__ import annotations

from pathlib import Path

from typing import Any

from pydantic import Field, field_validator, model_validator

from pipeline.core.section import Section

__all__ = ["GateThresholds", "EvaluateConfig"]


# Keys of earlier versions whose meaning changed: a config that still sets them is told what replaced them.
_REPLACED_GATE_KEYS = {
    "max_memorization_rate": "max_memorization_excess (the rate above what held-out subjects read by chance; "
    "default 0.07)",
    "mia_requires_significance": "privacy_alpha and privacy_power (an attack fails only on significant "
    "evidence and passes only with power; otherwise it is inconclusive)",
}


class GateThresholds(Section):
    """Pass/fail thresholds of the four gates (defaults documented in docs/evaluate.md)."""

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, replacement in _REPLACED_GATE_KEYS.items():
                if key in data:
                    raise ValueError(f"'{key}' was replaced by {replacement}; remove '{key}' from evaluate.gates")
        return data

    min_precision_ratio: float = Field(
        0.5,
        ge=0.0,
        description="Fidelity: synthetic precision / reference precision must reach this.",
    )
    min_density_ratio: float = Field(
        0.5,
        ge=0.0,
        description="Fidelity: synthetic density / reference density must reach this.",
    )
    min_coverage_ratio: float = Field(
        0.5,
        ge=0.0,
        description="Diversity: synthetic coverage / reference coverage (same sample size) must reach this.",
    )
    min_recall_ratio: float = Field(
        0.3,
        ge=0.0,
        description="Diversity: synthetic recall / reference recall (same sample size) must reach this.",
    )
    max_ms_ssim_excess: float = Field(
        0.25,
        ge=0.0,
        description="Diversity: mean same-class MS-SSIM of synthetic pairs may exceed that of real pairs by at most this.",
    )
    max_memorization_excess: float = Field(
        0.07,
        gt=0.0,
        le=1.0,
        description=(
            "Privacy: the memorization excess (share of synthetic images below the held-out percentile, minus "
            "the share a fresh held-out subject reads at the same leave-one-subject-out thresholds) that counts "
            "as a meaningful leak. Fail: significant at privacy_alpha and above this; pass: the one-sided upper "
            "bound is at or below it and the test has privacy_power to detect it; else inconclusive."
        ),
    )
    max_mia_auc: float = Field(
        0.65,
        ge=0.5,
        le=1.0,
        description=(
            "Privacy: AUC of a gated membership-inference attack that counts as a meaningful leak. Fail: the "
            "AUC is above this and significantly above chance (0.5); pass: the one-sided upper bound is at or "
            "below it and the attack's interval is narrow enough to detect it; else inconclusive."
        ),
    )
    privacy_alpha: float = Field(
        0.05,
        gt=0.0,
        lt=0.5,
        description="Privacy: one-sided level of the privacy tests (evidence of a leak, and the upper bounds a pass needs).",
    )
    privacy_power: float = Field(
        0.8,
        gt=0.5,
        lt=1.0,
        description=(
            "Privacy: power a check must have to detect an effect at its limit before it may pass; the report "
            "states the effect each check detects with this power and the held-out subjects a pass would need."
        ),
    )
    max_epsilon: float | None = Field(
        None,
        gt=0.0,
        description="Privacy: largest DP epsilon allowed; null = epsilon not gated (reported only).",
    )
    min_label_accuracy_ratio: float = Field(
        0.8,
        ge=0.0,
        description="Utility: synthetic_label_accuracy / the same classifier's accuracy on held-out real images.",
    )
    fail_on_significant_harm: bool = Field(
        True,
        description="Utility: fail when the augmentation_gain interval lies entirely below 0.",
    )


class EvaluateConfig(Section):
    """Evaluation settings: feature spaces, metric sizes, the privacy baseline and the gates."""

    seed: int = Field(0, ge=0, description="Seed for the encoder, classifiers, subsets, pairs and bootstraps.")
    feature_dim: int = Field(
        128,
        ge=16,
        le=1024,
        description="Width of the feature spaces (last CNN stage); modest keeps FID's matrix square root fast.",
    )
    feature_weights: Path | None = Field(
        None,
        description=(
            "Optional TorchScript file of a pretrained extractor: (N, 1, *spatial) in [-1, 1] -> (N, D). "
            "When given it becomes the headline feature space."
        ),
    )
    cross_check: bool = Field(True, description="Also report fidelity in a random-init CNN space (Naeem et al. 2020).")
    classifier_steps: int = Field(
        300,
        ge=1,
        description="Optimizer steps of the trained encoder / utility classifiers (same recipe for every arm).",
    )
    classifier_batch_size: int = Field(32, ge=2)
    utility_seeds: int = Field(
        2,
        ge=1,
        description=(
            "Training seeds per utility arm; every figure (and each bootstrap resample of its interval) is "
            "the mean over the seeds, so a single unlucky training run does not read as a gain or loss."
        ),
    )
    classifier_lr: float = Field(2e-3, gt=0.0)
    augmentation_ratio: float | None = Field(
        None,
        gt=0.0,
        description=(
            "Utility's real+synthetic arm: at most this many synthetic images per real image of the same class "
            "(null: every synthetic image)."
        ),
    )
    augmentation_filter: bool = Field(
        False,
        description=(
            "Utility's real+synthetic arm: keep only the synthetic images that the real-only classifier of the "
            "same seed reads as their own label."
        ),
    )
    augmentation_pretrain: bool = Field(
        True,
        description=(
            "Utility's real+synthetic arm: train on the admitted synthetic images for half the steps, then "
            "fine-tune on the real images (false: one mixed training set). The default is the lever the "
            "learning curves measured best on the validation split (docs/models.md, 'Does augmentation help?')."
        ),
    )
    learning_curve: bool = Field(
        False,
        description=(
            "Also measure real-only vs real+synthetic classifiers at learning_curve_sizes real training subjects "
            "per class (with this evaluation's generator) and plot the curve in report.html."
        ),
    )
    learning_curve_sizes: list[int] = Field(
        default_factory=lambda: [4, 8, 16, 32],
        description="Real training subjects per class at which the learning curve is measured (each at least 1).",
    )
    k_nearest: int = Field(5, ge=1, description="k of the k-NN manifolds for precision/recall/density/coverage.")
    kid_subsets: int = Field(50, ge=1, description="Number of random subsets averaged for KID.")
    kid_subset_size: int = Field(
        200,
        ge=2,
        description="Subset size for KID; capped at the smaller set's size (small data).",
    )
    match_repeats: int = Field(
        20,
        ge=1,
        description=(
            "Draws averaged for the size-matched comparison (fidelity.matched): each takes one image per "
            "held-out subject and as many synthetic images; recall, coverage and FID ratios are read there."
        ),
    )
    ms_ssim_pairs: int = Field(100, ge=1, description="Random same-class pairs per class for MS-SSIM diversity.")
    memorization_percentile: float = Field(
        5.0,
        gt=0.0,
        lt=100.0,
        description="Percentile of held-out-to-train distances below which a synthetic image counts as memorized.",
    )
    min_holdout: int = Field(
        10,
        ge=2,
        description=(
            "Fewest held-out real subjects (val + test) needed for the privacy baseline and the references; "
            "subjects, not slices, because slices of one volume are not independent."
        ),
    )
    min_test_subjects: int = Field(
        10,
        ge=2,
        description=(
            "Fewest real test subjects needed for the augmentation comparison (the harm check): with fewer, "
            "the balanced-accuracy interval is too wide to show harm, and the check is not run (with the reason)."
        ),
    )
    bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples (by subject) for 95% intervals.")
    max_images: int = Field(
        20000,
        ge=10,
        description="Cap per image set (real slices, synthetic images); larger sets are subsampled with the seed.",
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch during evaluation (null: torch's default); restored afterwards.",
    )
    reid_steps: int = Field(
        200,
        ge=1,
        description=(
            "Optimizer steps of the re-identification attack's siamese network (same- vs different-patient "
            "pairs of real training images)."
        ),
    )
    reid_width: int = Field(32, ge=8, le=256, description="Embedding width of the re-identification network.")
    reid_batch_size: int = Field(32, ge=4, description="Image pairs per step of the re-identification network.")
    flagged_pairs_shown: int = Field(8, ge=1, description="Closest synthetic-training pairs shown in report.html.")
    grid_per_class: int = Field(8, ge=1, description="Images per class in the real/synthetic grids of report.html.")
    mlflow_ui_url: str = Field(
        "http://127.0.0.1:5000",
        description="MLflow UI that report.html links run ids to (`medsynth ui` prints the address it serves on).",
    )
    gates: GateThresholds = Field(default_factory=GateThresholds)

    @field_validator("learning_curve_sizes")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if not value or any(size < 1 for size in value):
            raise ValueError("learning_curve_sizes needs at least one size, each at least 1 subject per class")
        return sorted(set(value))

    @field_validator("feature_weights")
    @classmethod
    def _weights_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"file {value} not found; give a TorchScript extractor saved with torch.jit.save")
        return value
