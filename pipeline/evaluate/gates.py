"""The four gates: pass / fail / inconclusive / not_run, each from explicit checks with their thresholds.

Every check has a verdict. Fidelity, diversity and utility checks compare a figure with its
threshold (``not_run`` when the figure could not be measured). Privacy checks are tests: they
**fail** on evidence (significant at ``privacy_alpha`` and above the limit), **pass** only when the
one-sided upper bound is within the limit *and* the test had the power (``privacy_power``) to detect
an effect at the limit, and are **inconclusive** otherwise: too few held-out subjects is never a pass.
"Significant" means the two-sided ``1 - privacy_alpha`` interval lies above the null (0 excess,
AUC 0.5); the pass bound is one-sided ``1 - privacy_alpha``, so a leak at the limit passes at most
``privacy_alpha`` of the time.

A gate fails when any check fails, passes only when **every** check ran and passed, is ``not_run``
when none ran, and is ``inconclusive`` otherwise (a mandatory check that did not run, or a check
that could not tell). Each check carries a sentence saying what it means and, when it did not pass,
what the measurement shows in the direction it was found; :func:`gate_sentence` builds each gate's
verdict sentence from those. :func:`decide_gates` turns the four metric sections into the report's
``gates`` (:class:`pipeline.contracts.report.Gates`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pipeline.contracts.report import Check, GateName, Gates, GateStatus, Verdict
from pipeline.evaluate.config import GateThresholds

__all__ = [
    "Check",
    "gate_status",
    "gate_sentence",
    "decide_gates",
    "fidelity_checks",
    "diversity_checks",
    "privacy_checks",
    "utility_checks",
]


def decide_gates(
    sections: dict[GateName, dict[str, Any]], thresholds: GateThresholds, holdout_reason: str | None
) -> Gates:
    """Every gate's checks, status and sentence from the four metric sections.

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
        GateName.PRIVACY: privacy_checks(privacy, thresholds, holdout_reason),
        GateName.UTILITY: utility_checks(
            utility.get("synthetic_label_accuracy_ratio"),
            utility.get("augmentation_gain_ci_high"),
            thresholds,
            utility.get("synthetic_label_accuracy_ratio_reason"),
            utility.get("augmentation_gain_ci_high_reason"),
        ),
    }
    statuses = {gate: gate_status(found) for gate, found in checks.items()}
    sentences = {gate.value: gate_sentence(gate, statuses[gate], checks[gate]) for gate in GateName}
    if statuses[GateName.FIDELITY] == "fail" and statuses[GateName.PRIVACY] in ("pass", "inconclusive"):
        sentences[GateName.PRIVACY.value] += (
            " Caveat: the fidelity gate failed, so these images do not look like real ones; images far from "
            "every patient are private by default, and a privacy verdict on them says little about a "
            "generator that works."
        )
    return Gates(
        **{gate.value: status for gate, status in statuses.items()},
        thresholds=thresholds.model_dump(mode="json"),
        checks={gate.value: found for gate, found in checks.items()},
        sentences=sentences,
    )


def gate_status(checks: list[Check]) -> GateStatus:
    """fail if any check failed; pass only if every check passed; not_run if none ran; else inconclusive."""
    verdicts = [check.verdict for check in checks]
    if not verdicts or all(verdict == "not_run" for verdict in verdicts):
        return "not_run"
    if "fail" in verdicts:
        return "fail"
    if all(verdict == "pass" for verdict in verdicts):
        return "pass"
    return "inconclusive"


_GATE_TOPIC = {
    GateName.FIDELITY: "realism",
    GateName.DIVERSITY: "variety",
    GateName.PRIVACY: "leakage of training patients",
    GateName.UTILITY: "usefulness for a classifier",
}

_PASS_SENTENCES = {
    GateName.FIDELITY: "Synthetic images lie within the real image distribution about as well as held-out real images do.",
    GateName.DIVERSITY: "Synthetic images cover the variety of the real data about as well as held-out real images do.",
    GateName.PRIVACY: "The tests had the power to see a meaningful leak and found none: synthetic images do not copy "
    "training patients beyond what real held-out patients show.",
    GateName.UTILITY: "Synthetic images carry their labels and do not measurably harm a classifier trained with them.",
}


def gate_sentence(gate: GateName, status: GateStatus, checks: list[Check]) -> str:
    """The gate's verdict in words, from the checks behind it (which failed, and which way)."""
    if status == "pass":
        notes = [check.finding for check in checks if check.finding]
        return " ".join([_PASS_SENTENCES[gate], *notes])
    if status == "not_run":
        reasons = sorted({check.reason for check in checks if check.reason})
        return f"{gate.value.capitalize()} could not be judged: {'; '.join(reasons) or 'nothing could be measured'}."
    failed = [check for check in checks if check.verdict == "fail"]
    open_ = [check for check in checks if check.verdict in ("inconclusive", "not_run")]
    parts: list[str] = []
    if status == "fail":
        parts.append(f"Failed on {_GATE_TOPIC[gate]}:")
        parts.extend(check.finding or f"{check.name} failed." for check in failed)
        if gate is GateName.PRIVACY:
            parts.append("Do not share these synthetic images.")
    else:
        parts.append(f"Inconclusive: {_GATE_TOPIC[gate]} could not be certified, which is not a pass.")
    for check in open_:
        why = check.finding or check.reason or "not measured"
        parts.append(f"{check.name} {'did not run' if check.verdict == 'not_run' else 'is inconclusive'}: {why}")
    notes = [check.finding for check in checks if check.verdict == "pass" and check.finding]
    return " ".join([*parts, *notes])


_OPTIONAL = ("finding", "power", "p_value", "upper")


def _make(**fields: Any) -> Check:
    """A Check without the optional keys that hold nothing (report.json writes no bare nulls).

    ``passed`` stays null (beside its ``reason``) on a check that did not run, as reports always
    wrote it; an inconclusive check leaves it out: its ``verdict`` says what happened.
    """
    if fields.get("passed") is None and fields.get("verdict") == "inconclusive":
        fields.pop("passed", None)
    return Check(**{key: value for key, value in fields.items() if key not in _OPTIONAL or value is not None})


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _check(
    name: str,
    value: float | None,
    comparison: Literal[">=", "<="],
    threshold: float,
    meaning: str,
    reason: str | None = None,
    *,
    too_low: str = "",
    too_high: str = "",
) -> Check:
    """A threshold check: ``fail`` sentences say which way the value missed (``too_low``/``too_high``)."""
    if value is None:
        return _make(
            name=name,
            value=None,
            comparison=comparison,
            threshold=threshold,
            passed=None,
            verdict="not_run",
            meaning=meaning,
            reason=reason or "not measurable",
            finding=None,
        )
    passed = bool(value >= threshold if comparison == ">=" else value <= threshold)
    finding = None
    if not passed:
        direction = "below the minimum" if comparison == ">=" else "above the maximum"
        finding = f"{name} {_fmt(value)} is {direction} {_fmt(threshold)}: {too_low if comparison == '>=' else too_high}"
    return _make(
        name=name,
        value=float(value),
        comparison=comparison,
        threshold=threshold,
        passed=passed,
        verdict="pass" if passed else "fail",
        meaning=meaning,
        finding=finding,
    )


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
            too_low="many synthetic images look unlike any real image of this dataset.",
        ),
        _check(
            "density_ratio",
            ratios.get("density"),
            ">=",
            thresholds.min_density_ratio,
            "How densely synthetic images sit among real neighbourhoods, relative to held-out real images. "
            "Low: synthetic images lie on the fringe of, or outside, the real distribution.",
            reason,
            too_low="synthetic images lie on the fringe of, or outside, the real distribution.",
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
    checks = [
        _check(
            "coverage_ratio",
            ratios.get("coverage"),
            ">=",
            thresholds.min_coverage_ratio,
            "Share of real training images with a synthetic image nearby, relative to what an equal number of "
            "held-out real images achieves. Low: parts of the real distribution are missing.",
            reason,
            too_low="parts of the real distribution have no synthetic image nearby (missing modes, or synthetic "
            "images away from every real one).",
        ),
        _check(
            "recall_ratio",
            ratios.get("recall"),
            ">=",
            thresholds.min_recall_ratio,
            "Share of real training images inside the synthetic manifold, relative to an equal number of held-out "
            "real images. Low: the synthetic set spans a narrower range than real data.",
            reason,
            too_low="the synthetic set does not span the range of the real data.",
        ),
        _check(
            "ms_ssim_excess",
            ms_ssim_excess,
            "<=",
            thresholds.max_ms_ssim_excess,
            "Mean MS-SSIM of random same-class synthetic pairs minus that of real pairs from different subjects. "
            "High: synthetic images of a class are near-duplicates of each other (mode collapse). Far below 0: "
            "synthetic pairs are less alike than real pairs (noise or artefacts), which this check does not fail.",
            ms_ssim_reason,
            too_high="synthetic images of a class are more alike than real pairs: near-duplicates (mode collapse).",
        ),
    ]
    last = checks[-1]
    if last.value is not None and last.value < -thresholds.max_ms_ssim_excess:
        checks[-1] = _make(
            **{
                **last.as_dict(),
                "finding": f"Synthetic pairs are less alike than real pairs (MS-SSIM excess {_fmt(last.value)}): "
                "the synthetic images vary more than real ones do, e.g. noise or artefacts, not mode collapse.",
            }
        )
    return checks


# --------------------------------------------------------------------------------------------
# Privacy: tests with power
# --------------------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _needed(subjects: Any, limiting: Any) -> str:
    if _finite(subjects):
        return f"about {int(subjects)} held-out subjects would be needed for a pass"
    return f"no held-out size alone would do ({limiting})" if limiting else "the needed held-out size is unknown"


def _test_verdict(
    estimate: float, upper: float, significant: bool, powered: bool, limit: float
) -> tuple[Verdict, str]:
    """fail on evidence, pass only with power, else inconclusive; with the rule that decided."""
    if significant and estimate > limit:
        return "fail", "significant and above the limit"
    if powered and upper <= limit:
        return "pass", "upper bound within the limit, with power"
    if not powered:
        return "inconclusive", "too few held-out subjects to detect a leak at the limit"
    if significant:
        return "inconclusive", "significantly above chance, but not above the limit"
    return "inconclusive", "the upper bound exceeds the limit"


def _power_sentence(
    n_holdout: Any, detectable: str, power: float, powered: bool, needed: Any, limiting: Any
) -> str:
    """What a privacy check would have detected at this held-out size, and what a pass would need."""
    sentence = f"with {n_holdout} held-out subjects, {detectable} would be detected with {power:.0%} power"
    return sentence if powered else f"{sentence}; {_needed(needed, limiting)}"


def _tested_check(
    name: str,
    value: float,
    limit: float,
    decision: tuple[Verdict, str],
    meaning: str,
    power: str,
    *,
    failed: str,
    evidence: str,
    p_value: Any,
    upper: Any,
) -> Check:
    """A privacy check decided by :func:`_test_verdict`, its finding worded from the verdict."""
    verdict, rule = decision
    finding = {"fail": f"{failed}.", "inconclusive": f"{rule}: {evidence}; {power}."}.get(verdict)
    return _make(
        name=name,
        value=value,
        comparison="<=",
        threshold=limit,
        passed={"pass": True, "fail": False}.get(verdict),
        verdict=verdict,
        meaning=meaning,
        reason=None if verdict == "pass" else rule,
        finding=finding,
        power=power,
        p_value=p_value,
        upper=upper,
    )


def _memorization_check(privacy: dict[str, Any], thresholds: GateThresholds, reason: str | None) -> Check:
    limit = thresholds.max_memorization_excess
    meaning = (
        "Memorization excess: share of synthetic images closer to a training image than the held-out percentile, "
        "minus the share a held-out real subject reads at the same leave-one-subject-out thresholds (the "
        "finite-sample null rate). 0 for an honest generator at any held-out size; near-copies push it toward "
        "their share. Pixel space."
    )
    excess = privacy.get("memorization_excess")
    if not _finite(excess):
        return _make(
            name="memorization_excess",
            value=None,
            comparison="<=",
            threshold=limit,
            passed=None,
            verdict="not_run",
            meaning=meaning,
            reason=reason or privacy.get("memorization_excess_reason") or privacy.get("memorization_rate_reason")
            or "not measurable",
        )
    upper, p_value = privacy["memorization_excess_upper"], privacy["memorization_p_value"]
    powered = bool(privacy.get("memorization_powered"))
    significant = _finite(privacy.get("memorization_excess_ci_low")) and privacy["memorization_excess_ci_low"] > 0.0
    decision = _test_verdict(excess, upper, significant, powered, limit)
    power = _power_sentence(
        privacy.get("n_holdout_subjects"),
        f"an excess above {_fmt(privacy.get('memorization_detectable_excess'))} (a memorization rate above "
        f"{_fmt(privacy['memorization_null_rate'] + privacy['memorization_detectable_excess'])})",
        thresholds.privacy_power,
        powered,
        privacy.get("memorization_subjects_needed"),
        privacy.get("memorization_subjects_needed_reason"),
    )
    evidence = (
        f"memorization rate {_fmt(privacy.get('memorization_rate'))} against a null rate of "
        f"{_fmt(privacy['memorization_null_rate'])}: excess {_fmt(excess)} "
        f"[{_fmt(privacy.get('memorization_excess_ci_low'))}, {_fmt(privacy.get('memorization_excess_ci_high'))}], "
        f"p = {_fmt(p_value)}, upper bound {_fmt(upper)} (limit {_fmt(limit)})"
    )
    return _tested_check(
        "memorization_excess", float(excess), limit, decision, meaning, power,
        failed=f"synthetic images sit closer to training images than held-out patients do: {evidence}",
        evidence=evidence, p_value=p_value, upper=upper,
    )


def _attack_check(name: str, attack: dict[str, Any], thresholds: GateThresholds, n_holdout: Any) -> Check:
    limit = thresholds.max_mia_auc
    meaning = (
        f"AUC of the gated membership-inference attack {name} (0.5 = chance): how well an attacker holding "
        + ("the trained discriminator" if name.startswith("whitebox") else "the synthetic images (pixel space)")
        + " tells training patients from held-out ones."
    )
    value = attack.get("auc")
    if not _finite(value):
        return _make(
            name=f"mia_auc_{name}", value=None, comparison="<=", threshold=limit, passed=None, verdict="not_run",
            meaning=meaning, reason=attack.get("auc_reason") or "not measurable",
        )
    if not _finite(attack.get("auc_se")):
        return _make(
            name=f"mia_auc_{name}", value=float(value), comparison="<=", threshold=limit, passed=None,
            verdict="inconclusive", meaning=meaning,
            reason=attack.get("auc_se_reason") or "no interval: the attack's uncertainty is unknown",
            finding=f"AUC {_fmt(value)} without an interval: {attack.get('auc_se_reason') or 'too few subjects'}.",
        )
    significant = attack["auc_lower"] > 0.5  # the two-sided interval lies above chance
    powered = bool(attack.get("powered"))
    decision = _test_verdict(value, attack["auc_upper"], significant, powered, limit)
    power = _power_sentence(
        n_holdout, f"an attack AUC above {_fmt(attack.get('detectable_auc'))}", thresholds.privacy_power, powered,
        attack.get("subjects_needed"), attack.get("subjects_needed_reason"),
    )
    evidence = (
        f"AUC {_fmt(value)} (bootstrap interval [{_fmt(attack.get('auc_ci_low'))}, {_fmt(attack.get('auc_ci_high'))}]; "
        f"lower bound {_fmt(attack['auc_lower'])}, upper bound {_fmt(attack['auc_upper'])}, limit {_fmt(limit)}); TPR "
        f"{_fmt(attack.get('tpr_at_1pct_fpr'))} at 1% and {_fmt(attack.get('tpr_at_10pct_fpr'))} at 10% FPR"
    )
    return _tested_check(
        f"mia_auc_{name}", float(value), limit, decision, meaning, power,
        failed=f"the attack {name} tells training patients from held-out ones: {evidence}",
        evidence=evidence, p_value=attack.get("p_value"), upper=attack["auc_upper"],
    )


def privacy_checks(privacy: dict[str, Any], thresholds: GateThresholds, reason: str | None) -> list[Check]:
    """Leakage: the memorization test, one check per gated membership-inference attack, epsilon when gated.

    Args:
        privacy: the report's privacy section (``memorization_*`` test figures, ``mia_attacks``).
        thresholds: the ``evaluate.gates`` section.
        reason: why there is no held-out baseline (None: there is).
    """
    checks = [_memorization_check(privacy, thresholds, reason)]
    gated = {name: attack for name, attack in (privacy.get("mia_attacks") or {}).items() if attack.get("gated")}
    if not gated:
        checks.append(
            _make(
                name="mia_auc",
                value=None,
                comparison="<=",
                threshold=thresholds.max_mia_auc,
                passed=None,
                verdict="not_run",
                meaning="AUC of the gated membership-inference attacks (0.5 = chance).",
                reason=reason or privacy.get("mia_auc_reason") or "no gated attack was run",
            )
        )
    for name, attack in gated.items():
        checks.append(_attack_check(name, attack, thresholds, privacy.get("n_holdout_subjects")))
    epsilon = privacy.get("epsilon")
    if thresholds.max_epsilon is not None:
        if epsilon is None:
            checks.append(
                _make(
                    name="epsilon",
                    value=None,
                    comparison="<=",
                    threshold=thresholds.max_epsilon,
                    passed=False,
                    verdict="fail",
                    meaning="Differential-privacy budget of the generator's training; a threshold is set, so a "
                    "model without a DP guarantee fails.",
                    reason="no DP epsilon available",
                    finding="a DP budget is required (max_epsilon) and the generator has none.",
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
                    too_high="the generator's DP guarantee is weaker than required.",
                )
            )
    return checks


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
            "Balanced accuracy of a classifier trained on real images at predicting the synthetic images' labels, "
            "relative to its balanced accuracy on held-out real images. Low: synthetic images do not show the "
            "class they claim.",
            label_reason,
            too_low="synthetic images do not show the class they claim as clearly as real images do.",
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
                too_low="adding the synthetic images to real training data measurably lowers balanced accuracy.",
            )
        )
    return checks
