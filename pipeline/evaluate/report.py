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

__all__ = ["render_html", "write_report", "summary_lines", "TEMPLATE"]

TEMPLATE = "report.html.j2"
_TEMPLATES = Path(__file__).parent / "templates"

_GATE_SENTENCES = {
    "fidelity": {
        "pass": "Synthetic images lie within the real image distribution about as well as held-out real images do.",
        "fail": "Many synthetic images do not look like real images of this dataset.",
        "not_run": "Fidelity could not be judged (see the reason below).",
    },
    "diversity": {
        "pass": "Synthetic images cover the variety of the real data; no sign of mode collapse.",
        "fail": "Synthetic images are too alike or miss parts of the real data (mode collapse).",
        "not_run": "Diversity could not be judged (see the reason below).",
    },
    "privacy": {
        "pass": "No evidence that synthetic images copy training patients beyond what real held-out patients show.",
        "fail": "Synthetic images reproduce training images or reveal who was in the training set: do not share.",
        "not_run": "Privacy could not be judged: do not share until it has been.",
    },
    "utility": {
        "pass": "Synthetic images carry their labels and do not measurably harm a classifier trained with them.",
        "fail": "Synthetic images do not carry their labels, or adding them measurably harms a classifier.",
        "not_run": "Utility could not be measured (see the reason below).",
    },
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


def render_html(report: Mapping[str, Any], evidence: Evidence) -> str:
    """Render report.html from the report as written to report.json and the evidence arrays."""
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
    }
    return environment.get_template(TEMPLATE).render(
        report=report,
        images=images,
        gate_names=[gate.value for gate in GateName],
        sentences=_GATE_SENTENCES,
        flagged_shown=report["privacy"].get("flagged", [])[:50],
    )


def write_report(out: str | os.PathLike[str], report: Report, evidence: Evidence) -> tuple[Path, Path]:
    """Write ``out/report.json`` and ``out/report.html`` atomically (``out`` is created); returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    document = report.as_dict()
    json_path = atomic_write_json(out / REPORT_JSON, document)
    html_path = atomic_write_text(out / REPORT_HTML, render_html(document, evidence))
    return json_path, html_path


def summary_lines(report: Report, out: str | os.PathLike[str]) -> list[str]:
    """A few lines for the CLI: gates first, then the headline figures."""

    def show(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    fidelity, diversity, privacy, utility, gates = (
        report.fidelity, report.diversity, report.privacy, report.utility, report.gates
    )
    thresholds = gates.thresholds
    verdicts = ", ".join(
        f"{gate} {status if status != 'fail' else 'FAIL'}" for gate, status in gates.statuses().items()
    )
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
        f"  privacy: memorization_rate {show(privacy.memorization_rate)} "
        f"(max {show(thresholds.get('max_memorization_rate'))}), "
        f"mia_auc {show(privacy.mia_auc)} (max {show(thresholds.get('max_mia_auc'))}), "
        f"{len(privacy.flagged)} flagged, epsilon {show(privacy.epsilon)}",
        f"  utility: synthetic_label_accuracy {show(utility.synthetic_label_accuracy)}, augmentation_gain "
        f"{show(utility.augmentation_gain)} [{show(utility.augmentation_gain_ci_low)}, "
        f"{show(utility.augmentation_gain_ci_high)}]: {utility.augmentation_verdict or 'not run'}",
    ]
