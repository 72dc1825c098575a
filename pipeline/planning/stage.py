"""Resolve ``auto`` model keys and guard the preprocessing: what ``train`` runs before its first step.

:func:`plan_training` computes (fingerprint -> plan -> resolved config -> guards) and writes
nothing; :func:`prepare_training` is the hook at the start of training: it writes the plan beside
the model (``MODEL_DIR/plan.json``, ``MODEL_DIR/preprocessed.png``), records both in MLflow and
stops with exit 2 when a guard fires (``model.guards: error``), or warns (``warn``).
``medsynth plan`` calls :func:`plan_training` and prints the same lines.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.contracts.dataset import read_dataset, verify_files
from pipeline.contracts.model import check_image_size
from pipeline.core.errors import InputError
from pipeline.core.files import atomic_write_json
from pipeline.imaging.preprocess import build_spec
from pipeline.planning.figures import save_preprocessed_grid
from pipeline.planning.fingerprint import fingerprint, load_sample
from pipeline.planning.guards import GuardReport, run_guards
from pipeline.planning.plan import Plan, compute_budget, make_plan
from pipeline.planning.record import PLAN_JSON, PREPROCESSED_PNG, plan_lines, plan_record, read_plan
from pipeline.tracking import NullTracker, Tracker

__all__ = [
    "PLAN_JSON",
    "PREPROCESSED_PNG",
    "PlanResult",
    "plan_training",
    "prepare_training",
    "read_plan",
    "plan_record",
    "plan_lines",
]

_log = logging.getLogger(__name__)


@dataclass
class PlanResult:
    """The plan of one training run and what the guards measured.

    Attributes:
        config: the ``model:`` section with every ``auto`` key replaced by its planned value.
        plan: the planned values, their reasons and the fingerprint.
        spec: the preprocessing spec the resolved config gives (as ``model.json`` will record it).
        guards: the guards' verdicts (None with ``model.guards: off``).
        mode: ``model.guards`` (error, warn or off).
    """

    config: Any
    plan: Plan
    spec: dict[str, Any]
    guards: GuardReport | None
    mode: str

    def to_dict(self) -> dict[str, Any]:
        """plan.json."""
        return {
            **self.plan.to_dict(),
            "preprocess": self.spec,
            "guards_mode": self.mode,
            **(self.guards.to_dict() if self.guards is not None else {"guards": [], "probe": None}),
        }

    def lines(self) -> list[str]:
        """The fingerprint, the plan and the guards, for the console."""
        lines = [*self.plan.fingerprint.lines(), *self.plan.lines()]
        if self.guards is not None:
            lines += self.guards.lines()
        return lines

    def failure(self) -> str | None:
        """One message naming every fired guard and its fix, or None."""
        if self.guards is None or not self.guards.failed:
            return None
        return "preprocessing guard(s) fired: " + " | ".join(f"{g.name}: {g.message}" for g in self.guards.failed)


def plan_training(data: str | os.PathLike[str], config: Any, seed: int = 0) -> PlanResult:
    """Fingerprint ``data``'s real training split, plan ``config``'s ``auto`` keys and run the guards.

    Args:
        data: a dataset folder written by ``medsynth ingest``.
        config: the ``model:`` section (a ModelConfig).
        seed: seed of the sample and the probe.

    Raises:
        InputError: no real training images, or an unreadable one.
    """
    data = Path(data)
    dataset = read_dataset(data)
    rows = dataset.subset(split="train", origin="real")
    if rows.empty:
        raise InputError(
            f"{data / 'manifest.csv'}: no real images in split 'train'. "
            "Fix: plan from a dataset written by `medsynth ingest` (it assigns splits by subject)."
        )
    verify_files(dataset, rows)  # a tampered image is named by its row before anything decodes it
    sample = load_sample(dataset, rows, seed=seed)
    fp = fingerprint(dataset, rows, sample, seed=seed)
    plan = make_plan(fp, config, compute_budget(config.device))
    try:
        resolved = type(config).model_validate({**config.model_dump(), **plan.updates()})
    except ValueError as exc:  # an explicit key the planned ones contradict (e.g. a 3-value image_size in 2D)
        raise InputError(f"model: the plan does not fit the explicit keys ({exc}). Fix: set them consistently or to auto.") from exc
    problem = check_image_size(list(resolved.image_size), resolved.spatial_dims)
    if problem is not None:  # before the guards preprocess anything onto that grid
        raise InputError(
            f"model.image_size {list(resolved.image_size)} {problem}. Fix: set a smaller model.image_size "
            "(e.g. 64 x 64 slices or 64^3 volumes), or auto."
        )
    spec = build_spec(resolved, dataset, rows)
    guards = None if config.guards == "off" else run_guards(sample, spec, fp.modality, fp.intensity, seed)
    return PlanResult(resolved, plan, spec, guards, config.guards)


def prepare_training(
    data: str | os.PathLike[str], out: str | os.PathLike[str], config: Any, seed: int = 0, tracker: Tracker = NullTracker()
) -> Any:
    """The hook at the start of training: plan, write ``plan.json`` and ``preprocessed.png``, guard.

    Returns:
        The resolved ``model:`` section (no ``auto`` left).

    Raises:
        InputError: a guard fired and ``model.guards`` is ``error`` (exit 2; the files are written
            first, so the user can look at them).
    """
    out = Path(out)
    result = plan_training(data, config, seed)
    out.mkdir(parents=True, exist_ok=True)
    plan_path = atomic_write_json(out / PLAN_JSON, result.to_dict())
    tracker.log_artifact(plan_path, "plan")
    if result.guards is not None and result.guards.preview.images:
        grid = save_preprocessed_grid(result.guards.preview.images, result.guards.preview.labels, out / PREPROCESSED_PNG)
        tracker.log_artifact(grid, "plan")
    tracker.log_params({f"plan.source.{key}": item.source for key, item in result.plan.values.items()})
    if result.guards is not None:
        tracker.set_tags({"medsynth.guards": ",".join(g.name for g in result.guards.failed) or "pass"})
        tracker.log_metrics(
            {f"guard_{guard.name}": guard.value for guard in result.guards.guards if guard.value is not None}
        )
    failure = result.failure()
    if failure is not None:
        if result.mode == "error":
            raise InputError(
                f"{failure} The plan and a grid of preprocessed images are in {out}. "
                "To train anyway, set model.guards: warn."
            )
        _log.warning("warning: %s", failure)
    return result.config
