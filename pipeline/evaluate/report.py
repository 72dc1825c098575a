"""report.html: one self-contained page (figures as base64 PNG data URIs) from a Jinja2 template.

The page is written for an auditor who did not run the evaluation: the gates come first, each with
its measured value, threshold and what it means; then the evidence (image grids, closest pairs,
distance histograms, precision/recall/coverage, the utility table) and the provenance (feature
spaces, preprocessing, dataset digests, MLflow run ids).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from pipeline.evaluate import figures

__all__ = ["render_html", "TEMPLATE"]

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


def render_html(report: dict[str, Any], evidence: Any) -> str:
    """Render report.html from the report dict and the evidence arrays (:class:`stage.Evidence`)."""
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
        gate_names=("fidelity", "diversity", "privacy", "utility"),
        sentences=_GATE_SENTENCES,
        flagged_shown=report["privacy"].get("flagged", [])[:50],
    )
