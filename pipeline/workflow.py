"""``medsynth run``: every stage in order under one parent MLflow run, a nested run per stage.

Outputs go under the config's run root (DESIGN.md):

```
<root>/private/    key, source map, quarantine originals (never shared, never logged)
<root>/ingested/   real dataset          <root>/model/      generator + checkpoints
<root>/synthetic/  synthetic dataset     <root>/report/     report.json + report.html
<root>/export/     augmented dataset + data_card.md
<root>/stages.json what each stage last finished with (input digest, MLflow run id)
```

A stage is skipped when the digest of its inputs and its config section equals the one recorded
when it last finished; a skipped stage still gets a nested run (tagged ``medsynth.skipped``) that
points at the run that produced its outputs, so the lineage stays complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import MedsynthConfig, check_input_paths, config_digest, flatten
from pipeline.core.errors import CheckFailed, InputError
from pipeline.core.paths import is_inside
from pipeline.core.files import atomic_write_json, sha256_file

__all__ = [
    "STAGES",
    "RunPaths",
    "StageOutcome",
    "RunSummary",
    "run_all",
    "source_digest",
    "headline_lines",
    "default_demo_config",
    "tracked_params",
]

STAGES: tuple[str, ...] = ("ingest", "train", "generate", "evaluate", "export")


@dataclass(frozen=True)
class RunPaths:
    """Where each stage of one run root reads and writes."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def private(self) -> Path:
        return self.root / "private"

    @property
    def ingested(self) -> Path:
        return self.root / "ingested"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def record(self) -> Path:
        return self.root / "stages.json"


@dataclass
class StageOutcome:
    """What happened to one stage in this run."""

    stage: str
    status: str  # "ran" | "skipped"
    run_id: str | None
    seconds: float
    lines: list[str] = field(default_factory=list)


@dataclass
class RunSummary:
    """The end-of-run summary: stage outcomes, where the outputs are, headline figures."""

    paths: RunPaths
    parent_run_id: str | None
    tracking_uri: str
    outcomes: list[StageOutcome]
    report: dict[str, Any]
    exported: bool

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
        out.append(f"MLflow: parent run {self.parent_run_id}; browse with:")
        out.append(f"  mlflow ui --backend-store-uri {self.tracking_uri}")
        return out


def headline_lines(report: dict[str, Any]) -> list[str]:
    """The report's gates and headline figures, one line each (empty when there is no report)."""
    if not report:
        return []
    gates = report.get("gates", {})

    def figure(section: str, key: str) -> str:
        value = report.get(section, {}).get(key)
        return "n/a" if value is None else f"{value:.3g}" if isinstance(value, (int, float)) else str(value)

    return [
        "Report: "
        + ", ".join(f"{name} {gates.get(name, 'not_run')}" for name in ("fidelity", "diversity", "privacy", "utility")),
        f"  FID {figure('fidelity', 'fid')}, precision {figure('fidelity', 'precision')}, "
        f"recall {figure('fidelity', 'recall')}, coverage {figure('fidelity', 'coverage')}",
        f"  MS-SSIM {figure('diversity', 'ms_ssim')}, memorization rate {figure('privacy', 'memorization_rate')}, "
        f"MIA AUC {figure('privacy', 'mia_auc')}, synthetic label accuracy {figure('utility', 'synthetic_label_accuracy')}",
    ]


def source_digest(sources: list[Path], labels: Path | None) -> str:
    """SHA-256 over every source file's relative path and content, and the labels file.

    The files are the ones ingest reads (:func:`pipeline.ingest.discover.walk_sources`), so a
    change ingest would not see (inside a hidden folder) does not re-run it. Only the digest is
    recorded; the paths themselves (which may contain PHI) are not.
    """
    from pipeline.ingest.discover import walk_sources

    digest = hashlib.sha256()
    for file in walk_sources(sources):
        digest.update(f"{file.source}/{file.rel}\0".encode("utf-8", "surrogateescape"))
        try:
            digest.update(sha256_file(file.path).encode())
        except OSError:  # unreadable or gone: ingest quarantines it; here it only has to count as a change
            digest.update(b"unreadable")
    if labels is not None:
        digest.update(b"labels\0" + sha256_file(labels).encode())
    return digest.hexdigest()


def _combine(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _read_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}  # a damaged record only costs a re-run


def _file_digest(path: Path) -> str:
    return sha256_file(path) if path.is_file() else "missing"


def _dataset_digest(root: Path) -> str:
    from pipeline.contracts.dataset import read_dataset

    return read_dataset(root, check_files=False).digest if (root / "manifest.csv").is_file() else "missing"


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
    """Run ingest → train → generate → evaluate → export for ``config``.

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
    from pipeline import tracking

    check_input_paths(config, where)
    if not config.sources:
        raise InputError(f"{where}: key 'sources' is empty. Fix: list the folders of DICOM/NIfTI scans to ingest.")
    paths = RunPaths(config.resolved_run_root)
    for index, source in enumerate(config.sources):
        # Checked before anything is written: the run's files would land in the source folder.
        if is_inside(paths.root, Path(source)):
            raise InputError(
                f"{where}: key 'run_root' lies inside key 'sources[{index}]'. "
                "Fix: put the run root outside the source folders (e.g. runs/<name>)."
            )
    paths.root.mkdir(parents=True, exist_ok=True)
    record = {} if force else _read_record(paths.record)
    outcomes: list[StageOutcome] = []
    run_ids: dict[str, str] = {}

    def stage_digest(stage: str) -> str:
        if stage == "ingest":
            return _combine(source_digest(config.sources, config.labels), config_digest(config.ingest), str(config.seed))
        if stage == "train":
            return _combine(_dataset_digest(paths.ingested), config_digest(config.model), str(config.seed))
        if stage == "generate":
            return _combine(_file_digest(paths.model / "checkpoint.pt"), config_digest(config.generate))
        if stage == "evaluate":
            return _combine(
                _dataset_digest(paths.ingested), _dataset_digest(paths.synthetic),
                _file_digest(paths.model / "checkpoint.pt"), config_digest(config.evaluate),
            )
        # Export preprocesses real images with the model and cites its checkpoint: both are inputs.
        return _combine(
            _dataset_digest(paths.ingested), _dataset_digest(paths.synthetic),
            _file_digest(paths.report / "report.json"), _file_digest(paths.model / "model.json"),
            _file_digest(paths.model / "checkpoint.pt"), config_digest(config.export),
        )

    def execute(stage: str, tracker: tracking.Tracker, resume: bool) -> list[str]:
        if stage == "ingest":
            from pipeline import ingest

            summary = ingest.run(
                list(config.sources), paths.ingested, config.ingest, labels=config.labels, private=paths.private,
                tracker=tracker, progress=progress, seed=config.seed,
            )
        elif stage == "train":
            from pipeline.models import train

            if not resume:
                _reset(paths.model)
            summary = train.run(paths.ingested, paths.model, config.model, seed=config.seed, resume=resume,
                                tracker=tracker, progress=progress)
        elif stage == "generate":
            from pipeline.models import generate

            _reset(paths.synthetic)
            generate.run(paths.model, paths.synthetic, config.generate, tracker=tracker)
            return [f"synthetic dataset written to {paths.synthetic}"]
        elif stage == "evaluate":
            from pipeline import evaluate

            _reset(paths.report)
            evaluate.run(paths.ingested, paths.synthetic, paths.report, config.evaluate, model_dir=paths.model,
                         tracker=tracker, progress=progress)
            return [f"report written to {paths.report}"]
        else:
            from pipeline import export

            _reset(paths.export)
            summary = export.run(
                paths.ingested, paths.synthetic, paths.report, paths.export, config.export, model_dir=paths.model,
                tracker=tracker, allow_failed_gates=config.export.allow_failed_gates, links=dict(run_ids),
            )
        return list(summary.lines())

    params = tracked_params(config)
    with tracking.stage_run(
        "run", config.experiment_name, params=params,
        tags={"medsynth.config_digest": config_digest(config), "medsynth.run_root": str(paths.root)},
        run_name=f"{config.name}",
    ) as parent:
        for stage in STAGES:
            digest = stage_digest(stage)
            previous = record.get(stage, {})
            unchanged = previous.get("digest") == digest and previous.get("finished")
            started = time.perf_counter()
            if unchanged:
                with tracking.stage_run(
                    stage, config.experiment_name,
                    tags={"medsynth.skipped": "true", "medsynth.previous_run_id": previous.get("run_id", ""),
                          "medsynth.input_digest": digest},
                ) as tracker:
                    run_ids[stage] = previous.get("run_id") or tracker.run_id
                outcomes.append(StageOutcome(stage, "skipped", run_ids[stage], 0.0))
                echo(f"[{stage}] unchanged since run {run_ids[stage]}: skipped")
                continue
            # An interrupted train with the same inputs resumes from its checkpoint.
            resume = stage == "train" and previous.get("digest") == digest and (paths.model / "checkpoint.pt").is_file()
            record[stage] = {"digest": digest, "finished": False}
            atomic_write_json(paths.record, record)
            echo(f"[{stage}] running{' (resuming)' if resume else ''} ...")
            with tracking.stage_run(
                stage, config.experiment_name, params=_stage_params(params, stage),
                tags={"medsynth.input_digest": digest},
            ) as tracker:
                try:
                    lines = execute(stage, tracker, resume)
                except CheckFailed:
                    tracker.set_tags({"medsynth.refused": "true"})
                    raise
                run_ids[stage] = tracker.run_id
            seconds = time.perf_counter() - started
            record[stage] = {"digest": digest, "finished": True,
                             "run_id": run_ids[stage], "seconds": round(seconds, 2)}
            atomic_write_json(paths.record, record)
            outcomes.append(StageOutcome(stage, "ran", run_ids[stage], seconds, lines))
            for line in lines:
                echo(f"  {line}")
            echo(f"[{stage}] done in {seconds:.1f} s")
        parent.set_tags({f"medsynth.{stage}_run_id": run_id for stage, run_id in run_ids.items()})
        report = _load_report(paths.report / "report.json")
        parent.log_metrics(_headline_metrics(report))
        return RunSummary(
            paths=paths, parent_run_id=parent.run_id, tracking_uri=tracking.tracking_uri(), outcomes=outcomes,
            report=report, exported=(paths.export / "manifest.csv").is_file(),
        )


# Source folders and the labels file are often named after patients (".../Smith_John_MRN123/"):
# their paths never reach MLflow. The ingest run's input digest covers their content instead.
_PATH_KEYS = ("sources", "labels")


def tracked_params(config: MedsynthConfig) -> dict[str, Any]:
    """The resolved config as MLflow params, without the source and labels paths (counts instead)."""
    dump = config.model_dump(mode="json")
    params = flatten({key: value for key, value in dump.items() if key not in _PATH_KEYS})
    params["sources.count"] = len(config.sources)
    params["labels.given"] = config.labels is not None
    return params


_STAGE_SECTION = {"ingest": "ingest", "train": "model", "generate": "generate", "evaluate": "evaluate", "export": "export"}


def _stage_params(params: dict[str, Any], stage: str) -> dict[str, Any]:
    """The stage's own config section plus the run-wide keys (name, seed)."""
    section = _STAGE_SECTION[stage]
    return {key: value for key, value in params.items() if key.startswith(f"{section}.") or key in ("name", "seed")}


def _load_report(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _headline_metrics(report: dict[str, Any]) -> dict[str, float]:
    keys = {
        "fid": ("fidelity", "fid"), "precision": ("fidelity", "precision"), "recall": ("fidelity", "recall"),
        "coverage": ("fidelity", "coverage"), "ms_ssim": ("diversity", "ms_ssim"),
        "memorization_rate": ("privacy", "memorization_rate"), "mia_auc": ("privacy", "mia_auc"),
        "synthetic_label_accuracy": ("utility", "synthetic_label_accuracy"),
    }
    metrics: dict[str, float] = {}
    for name, (section, key) in keys.items():
        value = report.get(section, {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[name] = float(value)
    return metrics


def default_demo_config() -> Path:
    """``configs/demo.yaml`` of the checkout (the package is installed in editable mode by the Makefile)."""
    return Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

