"""The evaluate stage: fidelity, diversity, privacy, utility, gates, and an auditable report.

Modules:
    config      ``EvaluateConfig`` (the ``evaluate:`` section) and the gate thresholds.
    images      real and synthetic images onto one grid and intensity scale.
    networks    the small CNN behind the feature spaces and the utility classifiers.
    features    the feature spaces (trained-cnn, random-cnn, user TorchScript).
    fidelity    FID, KID, precision/recall/density/coverage.
    diversity   MS-SSIM of same-class pairs.
    privacy     DCR, memorization, membership-inference AUC.
    utility     balanced accuracy / AUC with subject-bootstrap intervals.
    gates       pass / fail / not_run from explicit checks.
    report      report.html (Jinja2 template, embedded figures).
    stage       ``run`` and ``evaluate_sets``.
    controlled  datasets with known verdicts (tests, benchmarks).

``pipeline.config`` imports this package for the config section, so heavy modules (torch,
MONAI, matplotlib) load only when :func:`run` is called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run"]


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: ``pipeline.evaluate.run`` is ``pipeline.evaluate.stage.run``,
    # imported on first use so loading the config section stays fast.
    if name == "run":
        from pipeline.evaluate.stage import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
