"""The four gates: pass / fail / not_run, each from explicit checks with their thresholds.

A gate fails when any of its checks fails, passes when every check it could evaluate passes, and
is ``not_run`` when none could be evaluated (e.g. too few held-out images for the privacy baseline).
Each check carries a sentence saying what it means, for report.html. :func:`decide_gates` turns the
four metric sections into the report's ``gates`` (:class:`pipeline.contracts.report.Gates`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pipeline.contracts.report import Check, GateName, Gates, GateStatus
from pipeline.evaluate.config import GateThresholds

__all__ = [
    "Check",
    "gate_status",
    "decide_gates",
    "fidelity_checks",
    "diversity_checks",
    "privacy_checks",
    "utility_checks",
]


def decide_gates(
    sections: dict[GateName, dict[str, Any]], thresholds: GateThresholds, holdout_reason: str | None
) -> Gates:
    """Every gate's checks and status from the four metric sections.

    Args:
        sections: the ``fidelity``, ``diversity``, ``privacy`` and ``utility`` sections.
        thresholds: the ``evaluate.gates`` config section.
        holdout_reason: why there is no usable held-out baseline (None: there is); checks that need
            the baseline are then not measurable, with this reason.
    """
    fidelity, diversity, privacy, utility = (sections[gate] for gate in GateName)
    ratios = fidelity["ratios"]
    checks = {
        GateName.FIDELITY: fidelity_checks(ratios, thresholds, holdout_reason),
        GateName.DIVERSITY: diversity_checks(
            ratios,
            diversity.get("ms_ssim_excess"),
            thresholds,
            holdout_reason,
            diversity.get("ms_ssim_excess_reason"),
        ),
        GateName.PRIVACY: privacy_checks(
            privacy.get("memorization_rate"),
            privacy.get("mia_auc"),
            privacy.get("epsilon"),
            thresholds,
            holdout_reason,
            privacy.get("mia_attacks"),
        ),
        GateName.UTILITY: utility_checks(
            utility.get("synthetic_label_accuracy_ratio"),
            utility.get("augmentation_gain_ci_high"),
            thresholds,
            utility.get("synthetic_label_accuracy_ratio_reason"),
            utility.get("augmentation_gain_ci_high_reason"),
        ),
    }
    return Gates(
        **{gate.value: gate_status(found) for gate, found in checks.items()},
        thresholds=thresholds.model_dump(mode="json"),
        checks={gate.value: found for gate, found in checks.items()},
    )


def _check(
    name: str,
    value: float | None,
    comparison: Literal[">=", "<="],
    threshold: float,
    meaning: str,
    reason: str | None = None,
) -> Check:
    if value is None:
        return Check(
            name=name,
            value=None,
            comparison=comparison,
            threshold=threshold,
            passed=None,
            meaning=meaning,
            reason=reason or "not measurable",
        )
    passed = value >= threshold if comparison == ">=" else value <= threshold
    return Check(
        name=name, value=float(value), comparison=comparison, threshold=threshold, passed=bool(passed), meaning=meaning
    )


def gate_status(checks: list[Check]) -> GateStatus:
    """fail if any check failed; pass if at least one ran and all that ran passed; else not_run."""
    ran = [check for check in checks if check.passed is not None]
    if not ran:
        return "not_run"
    return "pass" if all(check.passed for check in ran) else "fail"


def fidelity_checks(ratios: dict[str, float | None], thresholds: GateThresholds, reason: str | None) -> list[Check]:
    """Realism: precision and density relative to the real-vs-real reference."""
    return [
        _check(
            "precision_ratio",
            ratios.get("precision"),
            ">=",
            thresholds.min_precision_ratio,
            "Share of synthetic images that fall inside the real training manifold, relative to the share of "
            "held-out real images that do. Low: many synthetic images look unlike any real image.",
            reason,
        ),
        _check(
            "density_ratio",
            ratios.get("density"),
            ">=",
            thresholds.min_density_ratio,
            "How densely synthetic images sit among real neighbourhoods, relative to held-out real images. "
            "Low: synthetic images lie on the fringe of, or outside, the real distribution.",
            reason,
        ),
    ]


def diversity_checks(
    ratios: dict[str, float | None],
    ms_ssim_excess: float | None,
    thresholds: GateThresholds,
    reason: str | None,
    ms_ssim_reason: str | None,
) -> list[Check]:
    """Variety: coverage and recall at equal sample size, and same-class MS-SSIM against real pairs."""
    return [
        _check(
            "coverage_ratio",
            ratios.get("coverage"),
            ">=",
            thresholds.min_coverage_ratio,
            "Share of real training images with a synthetic image nearby, relative to what an equal number of "
            "held-out real images achieves. Low: parts of the real distribution are missing (mode collapse).",
            reason,
        ),
        _check(
            "recall_ratio",
            ratios.get("recall"),
            ">=",
            thresholds.min_recall_ratio,
            "Share of real training images inside the synthetic manifold, relative to an equal number of held-out "
            "real images. Low: the synthetic set spans a narrower range than real data.",
            reason,
        ),
        _check(
            "ms_ssim_excess",
            ms_ssim_excess,
            "<=",
            thresholds.max_ms_ssim_excess,
            "Mean MS-SSIM of random same-class synthetic pairs minus that of real pairs from different subjects. "
            "High: synthetic images of a class are near-duplicates of each other.",
            ms_ssim_reason,
        ),
    ]


def privacy_checks(
    memorization_rate: float | None,
    mia_auc: float | None,
    epsilon: float | None,
    thresholds: GateThresholds,
    reason: str | None,
    attacks: dict[str, dict[str, Any]] | None = None,
) -> list[Check]:
    """Leakage: memorization rate and membership-inference AUC (and epsilon when gated).

    ``attacks``: the report's ``mia_attacks`` (name -> auc, auc_ci_low, gated); with
    ``mia_requires_significance`` an attack fails the check only when its AUC is above the limit
    *and* its interval lies above chance.
    """
    checks = [
        _check(
            "memorization_rate",
            memorization_rate,
            "<=",
            thresholds.max_memorization_rate,
            "Share of synthetic images closer to a training image than the closest few percent of held-out real "
            "images are. An honest generator reads near the percentile itself; high: near-copies of training images.",
            reason,
        ),
        _mia_check(mia_auc, thresholds, reason, attacks or {}),
    ]
    if thresholds.max_epsilon is not None:
        if epsilon is None:
            checks.append(
                Check(
                    name="epsilon",
                    value=None,
                    comparison="<=",
                    threshold=thresholds.max_epsilon,
                    passed=False,
                    meaning="Differential-privacy budget of the generator's training; a threshold is set, so a "
                    "model without a DP guarantee fails.",
                    reason="no DP epsilon available",
                )
            )
        else:
            checks.append(
                _check(
                    "epsilon",
                    epsilon,
                    "<=",
                    thresholds.max_epsilon,
                    "Differential-privacy budget of the generator's training (smaller = stronger guarantee).",
                )
            )
    return checks


def _mia_check(
    mia_auc: float | None, thresholds: GateThresholds, reason: str | None, attacks: dict[str, dict[str, Any]]
) -> Check:
    meaning = (
        "AUC of the strongest gated membership-inference attack (0.5 = chance): how well an attacker holding the "
        "synthetic data (distance attack) or the trained discriminator (white-box attack, when the model was "
        "given) tells training patients from held-out ones."
    )
    check = _check("mia_auc", mia_auc, "<=", thresholds.max_mia_auc, meaning, reason)
    if check.passed is not False or not thresholds.mia_requires_significance:
        return check
    over = {name: attack for name, attack in attacks.items() if attack.get("gated") and attack["auc"] > thresholds.max_mia_auc}
    # No finite interval to judge by counts as evidence: the check fails rather than guess.
    significant = [
        name for name, attack in over.items()
        if not _finite(attack.get("auc_ci_low")) or not _finite(attack.get("auc_ci_high")) or attack["auc_ci_low"] > 0.5
    ]
    if significant or not over:
        return check
    evidence = ", ".join(f"{name} {attack['auc']:.3f} [{attack['auc_ci_low']:.3f}, {attack['auc_ci_high']:.3f}]" for name, attack in over.items())
    return Check(
        name="mia_auc",
        value=check.value,
        comparison="<=",
        threshold=thresholds.max_mia_auc,
        passed=True,
        meaning=meaning,
        reason=f"inconclusive: above the limit, but every such attack's 95% interval includes chance (0.5): {evidence}. "
        "Too few held-out subjects to tell leakage from noise; more held-out subjects would decide "
        "(gates.mia_requires_significance)",
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def utility_checks(
    label_accuracy_ratio: float | None,
    gain_high: float | None,
    thresholds: GateThresholds,
    label_reason: str | None,
    gain_reason: str | None,
) -> list[Check]:
    """Usefulness: synthetic images carry their labels, and augmentation does not measurably hurt."""
    checks = [
        _check(
            "label_accuracy_ratio",
            label_accuracy_ratio,
            ">=",
            thresholds.min_label_accuracy_ratio,
            "Accuracy of a classifier trained on real images at predicting the synthetic images' labels, relative "
            "to its accuracy on held-out real images. Low: synthetic images do not show the class they claim.",
            label_reason,
        )
    ]
    if thresholds.fail_on_significant_harm:
        checks.append(
            _check(
                "augmentation_gain_ci_high",
                gain_high,
                ">=",
                0.0,
                "Upper end of the 95% interval of the change in balanced accuracy when synthetic images are added "
                "to real training data. Below 0: adding them measurably hurts.",
                gain_reason,
            )
        )
    return checks
