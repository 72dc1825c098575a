"""The evaluate stage: fidelity, diversity, privacy, utility, gates, and an auditable report.

Modules:
    config      ``EvaluateConfig`` (the ``evaluate:`` section) and the gate thresholds.
    networks    the small CNN behind the feature spaces and the utility classifiers.
    features    the feature spaces (trained-cnn, random-cnn, user TorchScript).
    fidelity    FID, KID, precision/recall/density/coverage.
    diversity   MS-SSIM of same-class pairs.
    privacy     DCR, memorization, membership-inference AUC.
    utility     balanced accuracy / AUC with subject-bootstrap intervals.
    seeds       every seed the stage draws from, by purpose.
    sections    the report's metric sections, one module each, built from the metrics above.
    gates       pass / fail / not_run from explicit checks.
    evaluation  ``evaluate_sets``: feature spaces, the four sections and the gates on image sets.
    figures     report figures as embedded PNGs.
    report      report.html (``templates/report.html.j2``, embedded figures).
    stage       :func:`run`: real + synthetic datasets -> report.json + report.html.

The public names below load on first use (PEP 562): ``pipeline.config`` imports
``pipeline.evaluate.config``, which runs this file, and must not pull in torch, MONAI or matplotlib.
"""

from __future__ import annotations

from pipeline.core.lazy import lazy_exports

__all__ = ["run", "EvaluateConfig"]

# Public name -> the module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "run": "pipeline.evaluate.stage",
    "EvaluateConfig": "pipeline.evaluate.config",
}

lazy_exports(__name__, _LAZY)
