"""Writing the report: report.json, report.html and the CLI's summary lines.

report.html is one self-contained page (figures as base64 PNG data URIs) from a Jinja2 template,
written for an auditor who did not run the evaluation: the gates come first, each with its measured
value, threshold and what it means; then the evidence (image grids, closest pairs, distance
histograms, precision/recall/coverage, the utility table) and the provenance (feature spaces,
preprocessing, dataset digests, MLflow run ids).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from pipeline.contracts.report import REPORT_HTML, REPORT_JSON, GateName, Report
from pipeline.core.files import atomic_write_json, atomic_write_text
from pipeline.evaluate import figures
from pipeline.evaluate.figures import Evidence

__all__ = ["render_html", "write_report", "summary_lines", "gate_sentences", "VERDICT_WORDS", "TEMPLATE", "MLFLOW_UI_URL"]

TEMPLATE = "report.html.j2"
# Where report.html links MLflow run ids when the report does not say (``mlflow.ui_url``); `medsynth ui`
# prints the address it actually serves on.
MLFLOW_UI_URL = "http://127.0.0.1:5000"
_TEMPLATES = Path(__file__).parent / "templates"

# Fallback sentences for reports written before each gate carried its own (``gates.sentences``).
_GATE_SENTENCES = {
    "fidelity": {
        "pass": "Synthetic images lie within the real image distribution about as well as held-out real images do.",
        "fail": "Fidelity failed: see the checks below for which figure missed and which way.",
        "inconclusive": "Fidelity could not be certified (a check did not run or could not tell): not a pass.",
        "not_run": "Fidelity could not be judged (see the reason below).",
    },
    "diversity": {
        "pass": "Synthetic images cover the variety of the real data about as well as held-out real images do.",
        "fail": "Diversity failed: see the checks below for which figure missed and which way.",
        "inconclusive": "Diversity could not be certified (a check did not run or could not tell): not a pass.",
        "not_run": "Diversity could not be judged (see the reason below).",
    },
    "privacy": {
        "pass": "No evidence that synthetic images copy training patients beyond what real held-out patients show.",
        "fail": "Synthetic images reproduce training images or reveal who was in the training set: do not share.",
        "inconclusive": "Privacy could not be certified at this held-out size: not a pass; do not share until it is.",
        "not_run": "Privacy could not be judged: do not share until it has been.",
    },
    "utility": {
        "pass": "Synthetic images carry their labels and do not measurably harm a classifier trained with them.",
        "fail": "Utility failed: see the checks below for which figure missed and which way.",
        "inconclusive": "Utility could not be certified (a check did not run or could not tell): not a pass.",
        "not_run": "Utility could not be measured (see the reason below).",
    },
}

# How each verdict reads in the CLI summary: a failure and an inconclusive verdict stand out.
VERDICT_WORDS = {"pass": "pass", "fail": "FAIL", "inconclusive": "INCONCLUSIVE", "not_run": "not run"}


def gate_sentences(report: Mapping[str, Any]) -> dict[str, str]:
    """Each gate's verdict sentence: the one evaluate wrote, else the generic one for its status."""
    gates = report["gates"]
    written = gates.get("sentences") or {}
    return {
        gate.value: written.get(gate.value) or _GATE_SENTENCES[gate.value].get(gates[gate.value], "")
        for gate in GateName
    }


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value)
    number = float(value)
    if not math.isfinite(number):
        return "n/a"
    if number != 0 and (abs(number) >= 1e4 or abs(number) < 10 ** (-digits)):
        return f"{number:.{digits}g}"
    return f"{number:.{digits}f}"


def _interval(low: Any, high: Any) -> str:
    if low is None or high is None:
        return "n/a"
    return f"[{_num(low)}, {_num(high)}]"


def _run_url(ui: str, experiment_id: Any, run_id: Any) -> str | None:
    """The MLflow UI page of a run (None without a run id)."""
    if not run_id:
        return None
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id or 0}/runs/{run_id}"


def _reid_block(privacy: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The re-identification attack's block of the privacy section, if the evaluation ran it."""
    for key in ("reidentification", "reid"):
        block = privacy.get(key)
        if isinstance(block, Mapping):
            return block
    return None


def render_html(report: Mapping[str, Any], evidence: Evidence, mlflow_ui_url: str | None = None) -> str:
    """Render report.html from the report as written to report.json and the evidence arrays.

    ``mlflow_ui_url``: the MLflow UI that run ids link to (default: the report's ``mlflow.ui_url``,
    else ``config.mlflow_ui_url`` (``evaluate.mlflow_ui_url``), else :data:`MLFLOW_UI_URL`).
    """
    environment = Environment(
        loader=FileSystemLoader(str(_TEMPLATES)),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["num"] = _num
    environment.globals["interval"] = _interval
    images = {
        "grids": figures.class_grids(evidence.grids),
        "pairs": figures.closest_pairs(evidence.closest_pairs, evidence.baseline_pair),
        "dcr": figures.dcr_histograms(evidence.dcr),
        "prdc": figures.prdc_bars(evidence.prdc),
        "ms_ssim": figures.ms_ssim_histograms(evidence.ms_ssim),
        "reid": figures.reid_pairs(evidence.reid_pairs),
        "learning_curve": figures.learning_curve_plot(report["utility"].get("learning_curve")),
    }
    links = report.get("mlflow") or {}
    ui = mlflow_ui_url or links.get("ui_url") or (report.get("config") or {}).get("mlflow_ui_url") or MLFLOW_UI_URL
    experiment = links.get("experiment_id")
    return environment.get_template(TEMPLATE).render(
        report=report,
        images=images,
        gate_names=[gate.value for gate in GateName],
        sentences=gate_sentences(report),
        flagged_shown=report["privacy"].get("flagged", [])[:50],
        reid=_reid_block(report["privacy"]),
        mlflow_ui=ui,
        run_urls={
            "evaluate": _run_url(ui, experiment, links.get("run_id")),
            "model": _run_url(ui, links.get("model_experiment_id") or experiment, links.get("model_run_id")),
        },
    )


def write_report(
    out: str | os.PathLike[str], report: Report, evidence: Evidence, mlflow_ui_url: str | None = None
) -> tuple[Path, Path]:
    """Write ``out/report.json`` and ``out/report.html`` atomically (``out`` is created); returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    document = report.as_dict()
    json_path = atomic_write_json(out / REPORT_JSON, document)
    html_path = atomic_write_text(out / REPORT_HTML, render_html(document, evidence, mlflow_ui_url))
    return json_path, html_path


def summary_lines(report: Report, out: str | os.PathLike[str]) -> list[str]:
    """A few lines for the CLI: gates first, then the headline figures."""

    def show(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    fidelity, diversity, privacy, utility, gates = (
        report.fidelity, report.diversity, report.privacy, report.utility, report.gates
    )
    thresholds = gates.thresholds
    verdicts = ", ".join(f"{gate} {VERDICT_WORDS.get(status, status)}" for gate, status in gates.statuses().items())
    extra = privacy.model_extra or {}
    inputs = report.inputs
    synthetic_images = inputs.synthetic.images if inputs is not None and inputs.synthetic is not None else None
    real_images = inputs.real.images if inputs is not None and inputs.real is not None else None
    return [
        f"Evaluated {synthetic_images} synthetic vs {real_images} real images "
        f"(feature space {fidelity.feature_space}); report: {Path(out) / REPORT_HTML}",
        f"  gates: {verdicts}",
        f"  fidelity: FID {show(fidelity.fid)} (held-out reference {show(fidelity.reference.fid)}), "
        f"precision {show(fidelity.precision)}, recall {show(fidelity.recall)}, "
        f"density {show(fidelity.density)}, coverage {show(fidelity.coverage)}",
        f"  diversity: MS-SSIM {show(diversity.ms_ssim)} (real pairs {show(diversity.ms_ssim_real)})",
        f"  privacy: memorization_rate {show(privacy.memorization_rate)} (null rate "
        f"{show(extra.get('memorization_null_rate'))}, excess {show(extra.get('memorization_excess'))}, max "
        f"{show(thresholds.get('max_memorization_excess'))}), mia_auc {show(privacy.mia_auc)} "
        f"(max {show(thresholds.get('max_mia_auc'))}; TPR {show(extra.get('mia_tpr_at_1pct_fpr'))} at 1% FPR), "
        f"{len(privacy.flagged)} flagged, epsilon {show(privacy.epsilon)}",
        f"  utility: synthetic_label_accuracy {show(utility.synthetic_label_accuracy)}, augmentation_gain "
        f"{show(utility.augmentation_gain)} [{show(utility.augmentation_gain_ci_low)}, "
        f"{show(utility.augmentation_gain_ci_high)}]: {utility.augmentation_verdict or 'not run'}",
        *_open_lines(report),
    ]


def _open_lines(report: Report) -> list[str]:
    """One line per gate that did not pass: its sentence (which check, which way, what power)."""
    sentences = gate_sentences(report.as_dict())
    return [
        f"  {gate}: {VERDICT_WORDS[status]}: {sentences[gate]}"
        for gate, status in report.gates.statuses().items()
        if status != "pass"
    ]
