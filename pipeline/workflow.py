"""``medsynth run``: every registered stage in order under one parent MLflow run, a nested run per stage.

The stages and what each depends on are in :mod:`pipeline.registry`; the run root's layout and
``stages.json`` are in :mod:`pipeline.contracts.stages`.

A stage is skipped when the digest of its inputs and its config section equals the one recorded
when it last finished; a skipped stage still gets a nested run (tagged ``medsynth.skipped``) that
points at the run that produced its outputs, so the lineage stays complete.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import MedsynthConfig, check_input_paths
from pipeline.contracts.model import CHECKPOINT
from pipeline.contracts.report import REPORT_JSON, GateName, Report, headline_figures, read_report
from pipeline.contracts.stages import RunPaths, StageRecord, StageResult, read_stages, write_stages
from pipeline.core.errors import CheckFailed, InputError
from pipeline.core.locks import hold, lock_id
from pipeline.core.paths import is_inside
from pipeline.core.section import config_digest, flatten
from pipeline.registry import STAGES, Stage, StageContext
from pipeline.tracking import Tracker

__all__ = [
    "unaccepted_gates",
    "StageOutcome",
    "RunSummary",
    "run_all",
    "default_demo_config",
    "tracked_params",
]


@dataclass
class StageOutcome:
    """What happened to one stage in this run."""

    stage: str
    status: str  # "ran" | "skipped"
    run_id: str | None
    seconds: float
    result: StageResult | None = None


@dataclass
class RunSummary:
    """The end-of-run summary: stage outcomes, where the outputs are, headline figures."""

    paths: RunPaths
    parent_run_id: str | None
    tracking_uri: str
    outcomes: list[StageOutcome]
    report: Report | None = None
    exported: bool = False
    server_run_url: str | None = None  # the parent run in the tracking server's UI, when one is used

    def lines(self) -> list[str]:
        out = [f"medsynth run finished: {self.paths.root}"]
        for outcome in self.outcomes:
            note = "unchanged, skipped" if outcome.status == "skipped" else f"{outcome.seconds:.1f} s"
            out.append(f"  {outcome.stage:<9} {note}  (MLflow run {outcome.run_id})")
        out.extend(headline_lines(self.report))
        out.append("Outputs:")
        out.append(f"  real dataset       {self.paths.ingested}")
        out.append(f"  synthetic dataset  {self.paths.synthetic}")
        out.append(f"  report             {self.paths.report / 'report.html'}")
        if self.exported:
            out.append(f"  augmented dataset  {self.paths.export}")
            out.append(f"  data card          {self.paths.export / 'data_card.md'}")
        out.append(f"  private (never share) {self.paths.private}")
        if self.server_run_url is not None:
            out.append(f"MLflow: parent run {self.parent_run_id} on the tracking server; open {self.server_run_url}")
            return out
        out.append(f"MLflow: parent run {self.parent_run_id} in {self.tracking_uri}; browse with:")
        out.append("  medsynth ui      (or .venv/bin/medsynth ui outside the activated environment)")
        return out


def _check_run_root(config: MedsynthConfig, paths: RunPaths, where: str) -> None:
    check_input_paths(config, where)
    if not config.sources:
        raise InputError(f"{where}: key 'sources' is empty. Fix: list the folders of DICOM/NIfTI scans to ingest.")
    for index, source in enumerate(config.sources):
        # Checked before anything is written: the run's files would land in the source folder.
        if is_inside(paths.root, Path(source)):
            raise InputError(
                f"{where}: key 'run_root' lies inside key 'sources[{index}]'. "
                "Fix: put the run root outside the source folders (e.g. runs/<name>)."
            )


def _reset(folder: Path) -> None:
    """Remove a derived output folder before its stage re-runs, so no stale file survives."""
    if folder.exists():
        shutil.rmtree(folder)


def run_all(
    config: MedsynthConfig,
    where: str = "config",
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = lambda line: None,
) -> RunSummary:
    """Run every stage of :data:`pipeline.registry.STAGES` for ``config``.

    Args:
        config: the validated configuration.
        where: the config's file name, for error messages.
        force: re-run every stage even when its inputs are unchanged.
        progress: show progress bars.
        echo: receives one line as each stage starts/ends (the CLI prints them).

    Raises:
        InputError: missing sources/labels, or a stage's bad input.
        CheckFailed: export refused because the privacy gate failed (after the report is written).
    """
    paths = RunPaths(config.resolved_run_root)
    _check_run_root(config, paths, where)
    notes: list[str] = []
    with hold(paths.root, notes):  # one `medsynth run` per run root; stale RUNNING runs of it are closed below
        for note in notes:
            echo(note)
        paths.root.mkdir(parents=True, exist_ok=True)
        return _run_locked(config, paths, force, progress, echo)


def _run_locked(
    config: MedsynthConfig, paths: RunPaths, force: bool, progress: bool, echo: Callable[[str], None]
) -> RunSummary:
    """:func:`run_all` once the run root's lock is held."""
    from pipeline import tracking

    record = read_stages(paths.record)
    if force:
        record.stages.clear()
    outcomes: list[StageOutcome] = []
    run_ids: dict[str, str] = {}
    params = tracked_params(config)
    with tracking.stage_run(
        "run", config.experiment_name, params=params,
        tags={"medsynth.config_digest": config_digest(config), "medsynth.run_root": str(paths.root)},
        run_name=f"{config.name}", owner=lock_id(paths.root),
    ) as parent:
        for entry in STAGES:
            digest = entry.digest(config, paths.roles())
            previous = record.stages.get(entry.name)
            if previous is not None and previous.digest == digest and previous.finished:
                outcomes.append(_skip(entry, previous, digest, config, run_ids))
                echo(f"[{entry.name}] unchanged since run {run_ids[entry.name]}: skipped")
                continue
            # An interrupted resumable stage with the same inputs continues from its checkpoint.
            resume = entry.resumable and previous is not None and previous.digest == digest and any(
                (paths.roles()[role] / CHECKPOINT).is_file() for role in entry.outputs
            )
            record.stages[entry.name] = StageRecord(digest=digest, finished=False)
            write_stages(paths.record, record)
            echo(f"[{entry.name}] running{' (resuming)' if resume else ''} ...")
            outcome = _execute(entry, config, paths, params, digest, resume, progress, run_ids)
            for line in outcome.result.lines if outcome.result else []:
                echo(f"  {line}")
            if outcome.result is not None and outcome.result.incomplete is not None:
                # Not finished: the next run does not skip it (train resumes from its checkpoint).
                outcome.result.raise_if_incomplete()
            record.stages[entry.name] = StageRecord(
                digest=digest, finished=True, run_id=outcome.run_id, seconds=round(outcome.seconds, 2)
            )
            write_stages(paths.record, record)
            outcomes.append(outcome)
            echo(f"[{entry.name}] done in {outcome.seconds:.1f} s")
        parent.set_tags({f"medsynth.{stage}_run_id": run_id for stage, run_id in run_ids.items()})
        report = _load_report(paths.report)
        _track_outcome(parent, paths, report)
        return RunSummary(
            paths=paths, parent_run_id=parent.run_id, tracking_uri=tracking.tracking_uri(), outcomes=outcomes,
            report=report, exported=(paths.export / "manifest.csv").is_file(),
            server_run_url=tracking.server_run_url(parent.experiment_id, parent.run_id),
        )


def unaccepted_gates(summary: RunSummary, config: MedsynthConfig) -> str | None:
    """Why a finished run's result is not what was asked for: a failed gate, or an unaccepted inconclusive one.

    The outputs stay written (the report says what went wrong); the command then exits 1, so a script
    never mistakes a failed or undecided result for a good one. ``export.allow_failed_gates`` accepts
    every verdict, ``export.accept_inconclusive`` the inconclusive ones.
    """
    if summary.report is None or config.export.allow_failed_gates:
        return None
    statuses = summary.report.gates.statuses()
    failed = [gate for gate, status in statuses.items() if status == "fail"]
    undecided = [gate for gate, status in statuses.items() if status in ("inconclusive", "not_run")]
    if config.export.accept_inconclusive:
        undecided = []
    if not failed and not undecided:
        return None
    parts = [f"gate(s) failed: {', '.join(failed)}"] if failed else []
    parts += [f"gate(s) inconclusive or not run: {', '.join(undecided)}"] if undecided else []
    return (
        f"{'; '.join(parts)}. The outputs are written; {summary.paths.report / 'report.html'} says which check "
        "missed and which way. Fix: act on the report (more data, more steps, another recipe); or, knowingly, set "
        "export.accept_inconclusive (undecided gates) or export.allow_failed_gates (any gate): the card says so."
    )


def _skip(
    entry: Stage, previous: StageRecord, digest: str, config: MedsynthConfig, run_ids: dict[str, str]
) -> StageOutcome:
    """A nested run tagged skipped that points at the run whose outputs are reused."""
    from pipeline import tracking

    with tracking.stage_run(
        entry.name, config.experiment_name,
        tags={"medsynth.skipped": "true", "medsynth.previous_run_id": previous.run_id or "",
              "medsynth.input_digest": digest},
    ) as tracker:
        run_ids[entry.name] = previous.run_id or tracker.run_id
    return StageOutcome(entry.name, "skipped", run_ids[entry.name], 0.0)


def _execute(
    entry: Stage,
    config: MedsynthConfig,
    paths: RunPaths,
    params: dict[str, Any],
    digest: str,
    resume: bool,
    progress: bool,
    run_ids: dict[str, str],
) -> StageOutcome:
    """Run one stage in its nested MLflow run, its outputs locked, and emptied first unless it resumes."""
    from pipeline import tracking

    with entry.writing(paths.roles()):
        if not resume:
            for role in entry.outputs:
                _reset(paths.roles()[role])
        started = time.perf_counter()
        with tracking.stage_run(
            entry.name, config.experiment_name, params=_stage_params(params, entry.section),
            tags={"medsynth.input_digest": digest}, owner=entry.owner(paths.roles()),
        ) as tracker:
            context = StageContext(
                config=config, paths=paths.roles(), tracker=tracker, progress=progress, resume=resume,
                links=dict(run_ids),
            )
            try:
                result = entry.run(context)
            except CheckFailed:
                tracker.set_tags({"medsynth.refused": "true"})
                raise
            run_ids[entry.name] = tracker.run_id
        return StageOutcome(entry.name, "ran", run_ids[entry.name], time.perf_counter() - started, result)


# Source folders and the labels file are often named after patients (".../Smith_John_MRN123/"):
# their paths never reach MLflow, nor do the model section's paths (ModelConfig.tracked). The stages'
# input digests cover their content instead.
_PATH_KEYS = ("sources", "labels")


def tracked_params(config: MedsynthConfig) -> dict[str, Any]:
    """The resolved config as MLflow params, without the source and labels paths (counts instead)."""
    dump = {**config.model_dump(mode="json"), "model": config.model.tracked()}
    params = flatten({key: value for key, value in dump.items() if key not in _PATH_KEYS})
    params["sources.count"] = len(config.sources)
    params["labels.given"] = config.labels is not None
    return params


def _stage_params(params: dict[str, Any], section: str) -> dict[str, Any]:
    """The stage's own config section plus the run-wide keys (name, seed)."""
    return {key: value for key, value in params.items() if key.startswith(f"{section}.") or key in ("name", "seed")}


def headline_lines(report: Report | None) -> list[str]:
    """The report's gates and headline figures, one line each (empty when there is no report)."""
    if report is None:
        return []
    figures = headline_figures(report)

    def figure(name: str) -> str:
        value = figures.get(name)
        return "n/a" if value is None else f"{value:.3g}"

    return [
        "Report: " + ", ".join(f"{gate.value} {report.gates.status(gate)}" for gate in GateName),
        f"  FID {figure('fid')}, precision {figure('precision')}, recall {figure('recall')}, "
        f"coverage {figure('coverage')}",
        f"  MS-SSIM {figure('ms_ssim')}, memorization rate {figure('memorization_rate')}, "
        f"MIA AUC {figure('mia_auc')}, synthetic label accuracy {figure('synthetic_label_accuracy')}",
    ]


def _load_report(report_dir: Path) -> Report | None:
    """The run's report, or None before evaluate has written one."""
    path = report_dir / REPORT_JSON
    return read_report(path) if path.is_file() else None


def _track_outcome(parent: Tracker, paths: RunPaths, report: Report | None) -> None:
    """The parent run carries what a reader of the run list wants first: verdicts, figures, report and card."""
    if report is not None:
        parent.set_tags({f"gate.{gate}": status for gate, status in report.gates.statuses().items()})
        parent.log_metrics({name: value for name, value in headline_figures(report).items() if value is not None})
    for path, folder in (
        (paths.report / REPORT_JSON, "report"),
        (paths.report / "report.html", "report"),
        (paths.export / "data_card.md", "export"),
    ):
        if path.is_file():
            parent.log_artifact(path, artifact_path=folder)


def default_demo_config() -> Path:
    """``configs/demo.yaml`` of the checkout (the package is installed in editable mode by the Makefile)."""
    return Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
