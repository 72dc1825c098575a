"""The stage registry: every stage's name, config section, inputs, outputs and ``run``.

``medsynth run`` (:mod:`pipeline.workflow`) iterates :data:`STAGES` for digests, skipping and
execution; each single-stage CLI command runs its entry with the paths given on the command line.
Adding a stage is one :class:`Stage` entry here plus its package (docs/architecture.md).

A stage's ``run`` receives a :class:`StageContext` (the validated config, the folders by role,
the MLflow tracker) and returns one :class:`pipeline.contracts.stages.StageResult`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pipeline.config import MedsynthConfig, check_start_model
from pipeline.contracts.model import CHECKPOINT, MODEL_JSON
from pipeline.contracts.report import REPORT_JSON
from pipeline.contracts.stages import StageResult
from pipeline.core.errors import InputError
from pipeline.core.files import sha256_file
from pipeline.core.locks import hold_all, lock_id
from pipeline.core.section import config_digest
from pipeline.models.config import PATH_KEYS as MODEL_PATH_KEYS
from pipeline.tracking import NullTracker, Tracker

__all__ = [
    "StageContext",
    "Stage",
    "Input",
    "SourcesInput",
    "DatasetInput",
    "FileInput",
    "SectionInput",
    "SeedInput",
    "STAGES",
    "stage",
    "source_digest",
    "combine_digests",
]


@dataclass(frozen=True)
class StageContext:
    """Everything a stage's ``run`` needs: config, folders by role, tracker and run options.

    Attributes:
        config: the validated configuration (explicit CLI flags already applied).
        paths: role (``ingested``, ``model``, ...) -> folder; roles a command did not give are absent.
        tracker: where the stage logs params, metrics, artifacts and dataset lineage.
        progress: show progress (a bar on a terminal, a line every 30 s in a log).
        resume: continue an interrupted stage from its checkpoint (train).
        links: MLflow run ids of the stages that ran before, by stage name (the data card cites them).
    """

    config: MedsynthConfig
    paths: Mapping[str, Path]
    tracker: Tracker = field(default_factory=NullTracker)
    progress: bool = False
    resume: bool = False
    links: Mapping[str, str] = field(default_factory=dict)

    def path(self, role: str) -> Path:
        """The folder of ``role``; a stage asks only for roles its command always gives."""
        if role not in self.paths:
            raise InputError(f"no folder given for '{role}'. Fix: pass it on the command line (see --help).")
        return Path(self.paths[role])

    def optional(self, role: str) -> Path | None:
        """The folder of ``role``, or None where the command did not give one."""
        return Path(self.paths[role]) if role in self.paths else None


# ------------------------------------------------------------------------------------------ inputs


class Input(Protocol):
    """One thing a stage's outputs depend on; its digest decides whether the stage re-runs."""

    def digest(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> str:
        """SHA-256 (or a marker such as ``missing``) of the input's current content."""
        ...

    def check(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> None:
        """Raise :class:`InputError` when the input is missing: cheap, before any heavy import."""
        ...


@dataclass(frozen=True)
class SourcesInput:
    """The source files ingest reads, and the labels file (by content, never by path)."""

    def digest(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> str:
        return source_digest(list(config.sources), config.labels)

    def check(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> None:
        if not config.sources:
            raise InputError("no --source given. Fix: pass --source DIR (repeatable) or list 'sources' in the config.")
        for index, source in enumerate(config.sources):
            if not Path(source).is_dir():  # the path is not echoed: source paths can name patients
                raise InputError(
                    f"source folder #{index + 1}: not found or not a folder. "
                    "Fix: pass an existing folder of DICOM/NIfTI files."
                )
        if config.labels is not None and not Path(config.labels).is_file():
            raise InputError(f"{config.labels}: labels file not found. Fix: correct --labels or remove it.")


@dataclass(frozen=True)
class DatasetInput:
    """A dataset folder of the run root, by its manifest digest."""

    role: str

    def digest(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> str:
        from pipeline.contracts.dataset import read_dataset

        root = paths[self.role]
        return read_dataset(root, check_files=False).digest if (root / "manifest.csv").is_file() else "missing"

    def check(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> None:
        from pipeline.contracts.dataset import locate_manifest

        if self.role in paths:
            locate_manifest(paths[self.role])


@dataclass(frozen=True)
class FileInput:
    """One file of the run root, by content."""

    role: str
    name: str
    what: str = "file"

    def digest(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> str:
        path = paths[self.role] / self.name
        return sha256_file(path) if path.is_file() else "missing"

    def check(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> None:
        if self.role in paths and not (paths[self.role] / self.name).is_file():
            producer = next((entry.name for entry in STAGES if self.role in entry.outputs), "medsynth")
            raise InputError(
                f"{paths[self.role] / self.name}: {self.what} not found. "
                f"Fix: pass a folder written by `medsynth {producer}`."
            )


@dataclass(frozen=True)
class InitialWeightsInput:
    """``model.init_from``: the model whose weights start training, by its checkpoint's content."""

    def digest(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> str:
        if config.model.init_from is None:
            return "none"
        checkpoint = Path(config.model.init_from) / CHECKPOINT
        return sha256_file(checkpoint) if checkpoint.is_file() else "missing"

    def check(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> None:
        check_start_model(config)


# Where and how wide ingest runs: the same bytes come out of one process, a pool or a Dask cluster.
INGEST_RUNTIME_KEYS = ("workers", "executor")


@dataclass(frozen=True)
class SectionInput:
    """The stage's own config section, less the keys that never change its outputs (``ignore``)."""

    section: str
    ignore: tuple[str, ...] = ()

    def digest(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> str:
        values = getattr(config, self.section).model_dump(mode="json")
        return config_digest({key: value for key, value in values.items() if key not in self.ignore})

    def check(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> None:
        """A section is validated when the config loads."""


@dataclass(frozen=True)
class SeedInput:
    """The run's global seed."""

    def digest(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> str:
        return str(config.seed)

    def check(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> None:
        """The seed is validated when the config loads."""


def combine_digests(*parts: str) -> str:
    """One digest of several: the order of ``parts`` matters."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


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


# ------------------------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: the stage's name (CLI command, MLflow run name, ``stages.json`` key).
        section: its config section (``model`` for train).
        inputs: what its outputs depend on, in digest order.
        outputs: the roles it writes; the workflow empties them before a fresh run.
        run: the stage itself.
        resumable: an interrupted run with the same inputs continues instead of starting over.
    """

    name: str
    section: str
    inputs: tuple[Input, ...]
    outputs: tuple[str, ...]
    run: Callable[[StageContext], StageResult]
    resumable: bool = False

    def digest(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> str:
        """Digest of the inputs: equal to the recorded one means the outputs are up to date."""
        return combine_digests(*(item.digest(config, paths) for item in self.inputs))

    def check_inputs(self, config: MedsynthConfig, paths: Mapping[str, Path]) -> None:
        """Refuse missing inputs before anything is imported, opened or written (an MLflow run included)."""
        for item in self.inputs:
            item.check(config, paths)

    def output_folders(self, paths: Mapping[str, Path]) -> list[Path]:
        """The folders this stage writes, of the roles ``paths`` gives."""
        return [Path(paths[role]) for role in self.outputs if role in paths]

    def owner(self, paths: Mapping[str, Path]) -> str | None:
        """The id its MLflow runs carry (:func:`pipeline.core.locks.lock_id` of its first output folder)."""
        folders = self.output_folders(paths)
        return lock_id(folders[0]) if folders else None

    @contextlib.contextmanager
    def writing(self, paths: Mapping[str, Path], notes: list[str] | None = None) -> Iterator[None]:
        """Hold the write lock of every output folder for the block: one writer per output.

        Also checks each output location before any work (a file in the way is bad input).

        Raises:
            InputError: another live process writes one of the folders (or a folder above it),
                or an output location cannot be a folder.
        """
        with hold_all(self.output_folders(paths), notes):
            yield


def _run_ingest(ctx: StageContext) -> StageResult:
    from pipeline import ingest

    out = ctx.path("ingested")
    summary = ingest.run(
        list(ctx.config.sources), out, ctx.config.ingest, labels=ctx.config.labels, private=ctx.optional("private"),
        tracker=ctx.tracker, progress=ctx.progress, seed=ctx.config.seed,
    )
    metrics = {
        "files_seen": summary.files_seen, "series_written": summary.series_written,
        "images_written": summary.images_written, "quarantined_files": summary.quarantined_files,
    }
    return StageResult(
        "ingest", summary.lines(), {name: float(value) for name, value in metrics.items()}, outputs={"dataset": out}
    )


def _run_train(ctx: StageContext) -> StageResult:
    from pipeline.models import train

    out = ctx.path("model")
    summary = train.run(
        ctx.path("ingested"), out, ctx.config.model, seed=ctx.config.seed, resume=ctx.resume,
        tracker=ctx.tracker, progress=ctx.progress,
    )
    metrics = {"steps": float(summary.steps), "train_seconds": float(summary.train_seconds)}
    from pipeline.planning.record import plan_lines

    lines = [*plan_lines(out), *summary.lines()]
    incomplete = None
    if summary.stopped_early and not ctx.config.model.accept_early_stop:
        # A model stopped far short of its plan generates noise that every later gate then fails:
        # say so here, where the cause and the fix are known.
        incomplete = (
            f"the model stopped early ({summary.stop_reason}) after {summary.steps} of {summary.steps_planned} "
            f"planned steps; {out / MODEL_JSON} marks it stopped_early. Fix: raise model.max_minutes (or free the "
            "machine) and run again, or set model.accept_early_stop: true (--accept-early-stop) to go on with it."
        )
    return StageResult("train", lines, metrics, outputs={"model": out}, incomplete=incomplete)


def _run_generate(ctx: StageContext) -> StageResult:
    from pipeline.models import generate

    out = ctx.path("synthetic")
    dataset = generate.run(ctx.path("model"), out, ctx.config.generate, tracker=ctx.tracker)
    counts = dataset.manifest.groupby("label").size()
    lines = [
        f"Generated {len(dataset.manifest)} synthetic images in {out}: "
        + ", ".join(f"{count} {label}" for label, count in counts.items()),
        f"  preview: {out / generate.GRID_NAME}",
    ]
    return StageResult("generate", lines, {"images": float(len(dataset.manifest))}, outputs={"dataset": out})


def _run_evaluate(ctx: StageContext) -> StageResult:
    from pipeline import evaluate
    from pipeline.contracts.report import Report, headline_figures
    from pipeline.evaluate.report import summary_lines

    out = ctx.path("report")
    report = Report.model_validate(
        evaluate.run(
            ctx.path("ingested"), ctx.path("synthetic"), out, ctx.config.evaluate, model_dir=ctx.optional("model"),
            tracker=ctx.tracker, progress=ctx.progress,
        )
    )
    metrics = {name: value for name, value in headline_figures(report).items() if value is not None}
    return StageResult("evaluate", summary_lines(report, out), metrics, report.gates.statuses(), {"report": out})


def _run_export(ctx: StageContext) -> StageResult:
    from pipeline import export

    out = ctx.path("export")
    summary = export.run(
        ctx.path("ingested"), ctx.path("synthetic"), ctx.path("report"), out, ctx.config.export,
        model_dir=ctx.optional("model"), tracker=ctx.tracker,
        allow_failed_gates=ctx.config.export.allow_failed_gates, links=dict(ctx.links),
    )
    metrics = {
        "real_images": float(summary.real_images), "synthetic_images": float(summary.synthetic_images),
        "excluded_synthetic": float(summary.excluded_synthetic),
    }
    return StageResult("export", summary.lines(), metrics, dict(summary.gates), {"dataset": out, "card": summary.card})


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "ingest", (SourcesInput(), SectionInput("ingest", ignore=INGEST_RUNTIME_KEYS), SeedInput()), ("ingested",), _run_ingest),
    # The start's path is not an input (moving an identical model re-runs nothing); its checkpoint's content is.
    Stage(
        "train", "model",
        (DatasetInput("ingested"), SectionInput("model", ignore=tuple(MODEL_PATH_KEYS)), SeedInput(), InitialWeightsInput()),
        ("model",),
        _run_train,
        resumable=True,
    ),
    Stage("generate", "generate", (FileInput("model", CHECKPOINT, "checkpoint"), SectionInput("generate")), ("synthetic",),
          _run_generate),
    Stage(
        "evaluate", "evaluate",
        (DatasetInput("ingested"), DatasetInput("synthetic"), FileInput("model", CHECKPOINT, "checkpoint"),
         SectionInput("evaluate")),
        ("report",), _run_evaluate,
    ),
    # Export preprocesses real images with the model and cites its checkpoint: both are inputs.
    Stage(
        "export", "export",
        (DatasetInput("ingested"), DatasetInput("synthetic"), FileInput("report", REPORT_JSON, "report"),
         FileInput("model", MODEL_JSON, "model description"), FileInput("model", CHECKPOINT, "checkpoint"), SectionInput("export")),
        ("export",), _run_export,
    ),
)


def stage(name: str) -> Stage:
    """The registry entry called ``name``."""
    for entry in STAGES:
        if entry.name == name:
            return entry
    raise KeyError(name)
