"""The ingest stage: sources → anonymized real dataset, quarantine, audit log, private folder.

Outputs (DATASET = ``out``)::

    DATASET/manifest.csv          one row per image (dataset contract) + modality, shape, spacing...
    DATASET/images/<subject>/<sample>.nii.gz
    DATASET/dicom/<subject>/<sample>/<nnnn>.dcm   anonymized DICOM, slices in z order
    DATASET/quarantine.csv        ref, reason, sample_id, format: every input not in the output
    DATASET/audit.jsonl           per series: which rule acted on which tag (never a value)
    DATASET/ingest.json           options, profile edition, counts (no PHI)
    PRIVATE/pseudonym.key         the HMAC key (same key → same pseudonyms and UIDs)
    PRIVATE/source_map.csv        source file → sample/subject pseudonym
    PRIVATE/quarantine.csv        quarantine ref → original source path
    PRIVATE/state/<sample>.json   per-series resume records
    PRIVATE/failed-<UTC time>/    what a run whose leak audit failed had written in DATASET (moved there)

Nothing that reaches the console, MLflow or DATASET names a source path or a header value.

A failure of the machine (disk full, I/O error, permission, memory, a killed worker) stops the
stage with exit 1 (:class:`pipeline.core.faults.EnvironmentFailure`): nothing of it is written
to quarantine.csv or to a state record, ``manifest.csv`` is removed (a partial dataset must not
look complete), and the series finished before it are kept for the re-run to skip.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from pipeline.contracts.dataset import read_dataset, write_manifest
from pipeline.core.errors import CheckFailed, InputError
from pipeline.core.faults import EnvironmentFailure, environment_cause, environment_failure, environment_fix
from pipeline.core.paths import is_inside
from pipeline.core.files import PRIVATE_MODE, atomic_write_json, atomic_write_text
from pipeline.ingest.audit import (
    INGEST_RECORD,
    AuditReport,
    Finding,
    Identifiers,
    Matcher,
    audit,
    name_findings,
    path_identifiers,
    scan_output_file,
)
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.discover import (
    LabelBook,
    ScannedFile,
    SourceFile,
    group_series,
    read_labels,
    scan_files,
    walk_sources,
)
from pipeline.ingest.executors import check_executor, map_tasks
from pipeline.ingest.labels import label_folder_problems, template_rows
from pipeline.ingest.keys import file_reference, load_or_create_key, sample_pseudonym
from pipeline.ingest.pool import pool_map
from pipeline.ingest.profile import TABLE_EDITION, TABLE_MODULE, TABLE_PACKAGE, profile_for
from pipeline.ingest.split import assign_splits
from pipeline.ingest.task import SeriesResult, SeriesTask, process_series
from pipeline.core.progress import progress as progress_bar
from pipeline.tracking import NullTracker, Tracker

__all__ = [
    "IngestSummary",
    "LabelsTemplate",
    "run",
    "write_labels_template",
    "default_private",
    "QUARANTINE_NAME",
    "AUDIT_LOG_NAME",
]

QUARANTINE_NAME = "quarantine.csv"
# A DICOMDIR is an index, not an image: the files it lists are found and read directly.
DICOMDIR_REASON = "DICOMDIR index file (not an image; the files it lists are read directly)"
AUDIT_LOG_NAME = "audit.jsonl"
_SCAN_CHUNK = 64
# Scanning a header takes ~50 us; below this many files starting a process pool costs more than it saves.
_PARALLEL_SCAN_MIN = 1000
PRIVATE_DIR_MODE = 0o700
# Everything ingest writes in the dataset folder (what a failed leak audit moves out of it).
_WRITTEN = ("images", "dicom", "manifest.csv", QUARANTINE_NAME, AUDIT_LOG_NAME, INGEST_RECORD)


@dataclass
class IngestSummary:
    """Counts of one ingest run. No PHI: no path below the dataset, no header value."""

    out: Path
    files_seen: int = 0
    series_found: int = 0
    series_written: int = 0
    series_resumed: int = 0
    images_written: int = 0
    dicom_files_written: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)  # reason -> files
    subjects: dict[str, int] = field(default_factory=dict)  # split -> subjects
    labels: dict[str, int] = field(default_factory=dict)  # label -> images
    options: list[str] = field(default_factory=list)
    audit_findings: int = 0
    audit_identifiers: int = 0

    @property
    def quarantined_files(self) -> int:
        return sum(self.quarantined.values())

    def lines(self) -> list[str]:
        lines = [
            f"Ingested {self.series_written} of {self.series_found} series into {self.out} "
            f"({self.images_written} NIfTI images, {self.dicom_files_written} anonymized DICOM files; "
            f"{self.series_resumed} unchanged since the last run)",
            f"  files seen: {self.files_seen}; quarantined: {self.quarantined_files}",
        ]
        for reason, count in sorted(self.quarantined.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"    {count:5d}  {reason}")
        if self.labels:
            lines.append("  images per label: " + ", ".join(f"{label} {count}" for label, count in sorted(self.labels.items())))
        if self.subjects:
            lines.append("  subjects per split: " + ", ".join(f"{split} {self.subjects.get(split, 0)}" for split in ("train", "val", "test")))
        lines.append("  profile: PS3.15 E.1-1 basic" + (" + " + ", ".join(self.options) if self.options else ""))
        lines.append(
            f"  leak audit: {self.audit_identifiers} identifying values searched, {self.audit_findings} found"
        )
        return lines

    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {
            "files_seen": self.files_seen,
            "series_found": self.series_found,
            "series_written": self.series_written,
            "series_resumed": self.series_resumed,
            "images_written": self.images_written,
            "dicom_files_written": self.dicom_files_written,
            "quarantined_files": self.quarantined_files,
            "audit_findings": self.audit_findings,
        }
        for reason, count in self.quarantined.items():
            metrics[f"quarantined.{_metric_key(reason)}"] = count
        for split, count in self.subjects.items():
            metrics[f"subjects.{split}"] = count
        return metrics


def _metric_key(reason: str) -> str:
    head = reason.split("(")[0].split(":")[0].strip().lower()
    return "".join(char if char.isalnum() else "_" for char in head).strip("_")[:60] or "other"


def default_private(out: Path) -> Path:
    """``<out>.private`` beside the dataset (never inside it)."""
    out = Path(out)
    return out.with_name(out.name + ".private")


def _check_locations(sources: list[Path], out: Path, private: Path) -> None:
    if not sources:
        raise InputError("no --source given. Fix: pass --source DIR (repeatable) or list 'sources' in the config.")
    if is_inside(private, out):
        raise InputError("--private is inside --out: the private folder must never be part of the dataset. Fix: put it beside the dataset.")
    if is_inside(out, private):
        raise InputError("--out is inside --private. Fix: use separate folders for the dataset and the private folder.")
    for index, source in enumerate(sources, start=1):
        if is_inside(out, source) or is_inside(source, out):
            raise InputError(f"--source #{index} and --out overlap. Fix: write the dataset outside the source folders.")
        if is_inside(private, source):
            raise InputError(f"--private is inside --source #{index}. Fix: put the private folder outside the sources.")
    for flag, folder in (("--out", out), ("--private", private)):
        existing = next(path for path in (folder, *folder.parents) if path.exists() or path == Path(path.anchor))
        if existing.exists() and not existing.is_dir():
            raise InputError(
                f"{flag} {folder}: {existing} exists and is not a folder. Fix: pass a new folder (or an earlier one)."
            )
    foreign = _foreign_outputs(out)
    if foreign:
        raise InputError(
            f"--out {out}: {foreign} file(s) under images/ or dicom/ were not written by medsynth ingest, and a re-run "
            "deletes what it did not write there. Fix: pass --out a new or empty folder, or a dataset written by ingest."
        )


# What ingest writes under images/ and dicom/ (pseudonymous names), and its temp files.
_OWN_OUTPUT = re.compile(
    r"^(images/sub-[0-9a-f]{16}/img-[0-9a-f]{16}\.nii\.gz|dicom/sub-[0-9a-f]{16}/img-[0-9a-f]{16}/[0-9]{4,}\.dcm"
    r"|(images|dicom)/(.+/)?\.[^/]+\.tmp(\.nii\.gz)?)$"
)


def _foreign_outputs(out: Path) -> int:
    """How many files under ``out/images`` and ``out/dicom`` ingest did not write (it removes those it does not own)."""
    count = 0
    for folder in ("images", "dicom"):
        root = out / folder
        if root.is_dir():
            count += sum(
                1 for path in root.rglob("*") if not path.is_dir() and not _OWN_OUTPUT.match(path.relative_to(out).as_posix())
            )
    return count


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run(
    sources: list[Path],
    out: Path,
    config: IngestConfig,
    labels: Path | None = None,
    private: Path | None = None,
    tracker: Tracker = NullTracker(),
    progress: bool = False,
    seed: int = 0,
) -> IngestSummary:
    """Ingest ``sources`` into the real dataset ``out`` (see the module docstring).

    Args:
        sources: folders of DICOM and/or NIfTI files (searched recursively).
        out: dataset folder to write (created; re-running resumes and skips finished series).
        config: the ``ingest`` config section.
        labels: ``key,label`` CSV; None: the first folder level under each source is the label.
        private: private folder (key, source map, quarantine originals); default ``<out>.private``.
        tracker: where counts, options and the output dataset are logged.
        progress: show progress bars on stderr.
        seed: the run's global seed (combined with ``config.split.seed`` for the split).

    Returns:
        An :class:`IngestSummary`.

    Raises:
        InputError: bad sources/labels/locations, label folders that look like patient identifiers
            (nothing written), or nothing usable found (exit 2).
        CheckFailed: the leak audit of the output found an identifier (exit 1); what ingest wrote in
            ``out`` is then in ``<private>/failed-<UTC time>/``. Also when the files used and
            quarantined do not add up to the files found.
        EnvironmentFailure: the machine failed (disk full, I/O error, permission, memory, a killed
            worker; exit 1): nothing of it is quarantined or remembered, and a re-run continues.
    """
    sources = [Path(source) for source in sources]
    out = Path(out)
    private = Path(private) if private is not None else default_private(out)
    if config.executor.kind == "dask":  # a Dask worker does not share the client's working directory
        sources, out, private = [source.absolute() for source in sources], out.absolute(), private.absolute()
    _check_locations(sources, out, private)
    book = read_labels(Path(labels) if labels is not None else None)
    files = walk_sources(sources)
    if not files:
        raise InputError("the source folders hold no files. Fix: point --source at folders of DICOM/NIfTI files.")
    workers = max(1, int(config.workers or _default_workers()))
    scanned = _scan(files, workers, progress)
    if book.from_folders:
        _refuse_identifying_label_folders(scanned)
    check_executor(config.executor)
    try:
        return _ingest(sources, files, scanned, book, out, private, config, workers, tracker, progress, seed)
    except (OSError, MemoryError) as exc:
        failure = environment_failure(
            exc, f"writing the dataset {out} or its private folder",
            "nothing was lost: the series finished so far are kept, and a re-run skips them",
        )
        if failure is None:
            raise
        _drop_manifest(out)
        raise failure from exc


def _ingest(
    sources: list[Path],
    files: list[SourceFile],
    scanned: list[ScannedFile],
    book: LabelBook,
    out: Path,
    private: Path,
    config: IngestConfig,
    workers: int,
    tracker: Tracker,
    progress: bool,
    seed: int,
) -> IngestSummary:
    """Everything :func:`run` does once the inputs are accepted: the writing part."""
    # Nothing is written before this line: a refused input leaves no dataset and no private folder.
    key = load_or_create_key(private)
    out.mkdir(parents=True, exist_ok=True)
    summary = IngestSummary(out=out, files_seen=len(files), options=list(profile_for(config).options))

    quarantine: list[tuple[SourceFile, str, str, str]] = []  # file, reason, sample_id, format
    for item in scanned:
        if item.kind == "other":
            quarantine.append((item.file, item.reason, "", "other"))
        elif item.kind == "dicomdir":
            quarantine.append((item.file, DICOMDIR_REASON, "", "dicomdir"))
    groups = group_series(scanned, label_from_folder=book.from_folders)
    patient_of = {item.file: item.patient_id for item in scanned if item.kind == "dicom"}
    tasks: list[SeriesTask] = []
    for group in groups:
        sample_id = sample_pseudonym(key, group.key)
        for duplicate in group.duplicates:
            quarantine.append((duplicate, "duplicate instance (same SOPInstanceUID as another file of the series)", sample_id, group.kind))
        label, problem = book.label_for(group, patient_of.get(group.files[0], "") if group.files else "")
        if label is None:
            quarantine.extend((file, problem, sample_id, group.kind) for file in group.files)
            continue
        tasks.append(
            SeriesTask(
                kind=group.kind,
                series_key=group.key,
                subject_key=group.subject_key,
                label=label,
                files=tuple(group.files),
                out=str(out),
                private=str(private),
            )
        )
    summary.series_found = len(groups)
    # Dask workers must see every folder a task reads or writes (checked on each worker first).
    folders = [(f"--source #{index}", str(source)) for index, source in enumerate(sources, start=1)]
    results = _process(tasks, key, config, workers, progress, [*folders, ("--out", str(out)), ("--private", str(private))])
    _stop_on_failures(out, results)
    for task, result in zip(tasks, results):
        quarantine.extend((file, reason, result.sample_id, task.kind) for file, reason in result.quarantined)
    written = [result for result in results if result.row is not None]
    summary.series_written = len(written)
    summary.series_resumed = sum(result.resumed for result in written)
    summary.images_written = len(written)
    summary.dicom_files_written = sum(
        1 for result in written for rel in result.outputs if rel.startswith("dicom/")
    )
    summary.quarantined = dict(Counter(reason for _, reason, _, _ in quarantine))
    _check_accounting(len(files), quarantine, written)

    _write_quarantine(out, private, key, quarantine)
    _write_private_map(private, written)
    _write_audit_log(out, results)
    _remove_orphans(out, {rel for result in written for rel in result.outputs})
    if not written:
        _write_record(out, config, summary)
        raise InputError(
            f"no usable image series found in the sources ({len(quarantine)} file(s) quarantined, "
            f"reasons in {out / QUARANTINE_NAME}). Fix: check the sources and the labels."
        )

    subject_labels: dict[str, list[str]] = defaultdict(list)
    for result in written:
        subject_labels[result.subject_id].append(result.label)
    splits = assign_splits(subject_labels, config.split, seed=seed)
    rows = []
    for result in written:
        row = dict(result.row or {})
        row["split"] = splits[result.subject_id]
        rows.append(row)
    manifest = pd.DataFrame(rows)
    write_manifest(out, manifest)
    summary.subjects = dict(Counter(splits.values()))
    summary.labels = dict(Counter(result.label for result in written))
    _write_record(out, config, summary)

    if config.audit_output:
        report = _self_audit(out, files, results, book, config, workers)
        summary.audit_identifiers = report.identifiers
        summary.audit_findings = len(report.findings)
        _write_record(out, config, summary)
        if not report.ok:
            report.record(private)  # each finding's reference and matched value, for `medsynth audit --explain`
            moved_to = _withdraw(out, private)
            # After the move: the tracker gets counts and tags, never the withdrawn record or dataset.
            _track(tracker, summary, out, config)
            raise CheckFailed(
                "\n".join(report.lines())
                + f"\nThe dataset may hold identifying data, so ingest moved everything it wrote out of {out} into "
                f"the private folder: {moved_to}. Do not share it. Cause: an identifying value reached the output "
                "(the findings name file and place). Fix: if the finding is in manifest.csv, a label holds an "
                "identifier: change it in the --labels file; otherwise report it. Then re-run ingest."
            )
    _track(tracker, summary, out, config)
    return summary


@dataclass
class LabelsTemplate:
    """What :func:`write_labels_template` wrote (counts and the file's path; no key, no label)."""

    path: Path
    dicom_patients: int
    nifti_files: int
    filled: int
    without_id: int
    folders_look_like_ids: bool

    def lines(self) -> list[str]:
        rows = self.dicom_patients + self.nifti_files
        lines = [
            f"Wrote the labels template {self.path}: {rows} row(s) ({self.dicom_patients} DICOM PatientID(s), "
            f"{self.nifti_files} NIfTI file(s)); {self.filled} label(s) filled from class folders, "
            f"{rows - self.filled} left empty for you to fill in.",
            "  It holds patient identifiers (PatientIDs, file paths): it is readable by you only; keep it private "
            "and outside any folder you share.",
        ]
        if self.folders_look_like_ids:
            lines.append("  The first-level folders look like patient identifiers, so no label was taken from them.")
        if self.without_id:
            lines.append(
                f"  {self.without_id} DICOM file(s) have no PatientID: a labels file cannot name them, and ingest "
                "quarantines them when --labels is given."
            )
        lines.append(f"  Next: fill in the label column, then run `medsynth ingest ... --labels {self.path}`.")
        return lines


def write_labels_template(
    sources: list[Path], out: Path, workers: int | None = None, progress: bool = False
) -> LabelsTemplate:
    """Write a ``key,label`` labels template for ``sources`` to ``out`` (owner-only, mode 0600).

    One row per DICOM PatientID and per NIfTI file (its path relative to its source), the keys
    ``--labels`` reads; the label is the first folder when the folders are ordinary class names,
    otherwise empty (ingest refuses empty labels, so every row must be filled in or deleted).

    Args:
        sources: the folders ingest will read.
        out: the CSV to write; must not exist yet (a template never overwrites filled-in labels).
        workers: processes to scan with (default: all cores).
        progress: show a progress bar on stderr.

    Raises:
        InputError: no source, a missing source, ``out`` exists or lies inside a source, no image found.
    """
    sources = [Path(source) for source in sources]
    out = Path(out)
    if not sources:
        raise InputError("no --source given. Fix: pass --source DIR (repeatable), the folders ingest will read.")
    if out.exists():
        raise InputError(
            f"--out {out}: the file exists, and a template never overwrites labels you may have filled in. "
            "Fix: pass a new file name, or delete the old file first."
        )
    for index, source in enumerate(sources, start=1):
        if is_inside(out, source):
            raise InputError(
                f"--out is inside --source #{index}: ingest would then read the template as an input. "
                "Fix: write it outside the source folders."
            )
    files = walk_sources(sources)
    scanned = _scan(files, max(1, int(workers or _default_workers())), progress)
    rows = template_rows(scanned)
    if not rows.rows:
        raise InputError(
            "the source folders hold no DICOM file with a PatientID and no NIfTI file. "
            "Fix: point --source at the folders of DICOM/NIfTI files you will ingest."
        )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["key", "label"])
    writer.writerows(rows.rows)
    atomic_write_text(out, buffer.getvalue(), PRIVATE_MODE)
    return LabelsTemplate(
        path=out,
        dicom_patients=rows.dicom_patients,
        nifti_files=rows.nifti_files,
        filled=rows.filled,
        without_id=rows.without_id,
        folders_look_like_ids=rows.folders_look_like_ids,
    )


def _refuse_identifying_label_folders(scanned: list[ScannedFile]) -> None:
    """Stop (exit 2, nothing written) when the label folders look like patients, not classes."""
    problems = label_folder_problems(scanned)
    if not problems.found:
        return
    # The message counts folders and never names one: the names are what must not leak.
    raise InputError(
        "the label folders look like patient identifiers, so ingest stopped before writing anything. Cause: "
        "without --labels the first folder level under each source is the class label, written into manifest.csv "
        f"and every later output; here {'; '.join(problems.reasons())}. Fix: pass --labels FILE, a CSV with the "
        "columns key,label (key: the DICOM PatientID, or a NIfTI file's path relative to its source). "
        "`medsynth labels-template --source DIR --out FILE` writes one with every key for you to fill in; it "
        "holds patient identifiers, so it is written readable by you only: keep it private and outside any "
        "folder you share."
    )


def _withdraw(out: Path, private: Path) -> Path:
    """Move what ingest wrote in ``out`` into ``<private>/failed-<UTC time>/``; return that folder.

    Moved, not deleted: the owner can inspect what leaked. ``out`` is removed when nothing else is left in it.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = private / f"failed-{stamp}"
    target.mkdir(parents=True, exist_ok=False)
    os.chmod(target, PRIVATE_DIR_MODE)
    for name in _WRITTEN:
        path = out / name
        if path.exists():
            shutil.move(str(path), str(target / name))
    for stray in out.glob(".*.tmp"):
        stray.unlink()
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    return target


def _scan(files: list[SourceFile], workers: int, progress: bool) -> list[ScannedFile]:
    chunks = [files[start : start + _SCAN_CHUNK] for start in range(0, len(files), _SCAN_CHUNK)]
    scanned: list[list[ScannedFile]] = [[] for _ in chunks]
    with progress_bar(len(files), "scan", "file", progress) as bar:
        scan_workers = workers if len(files) >= _PARALLEL_SCAN_MIN else 1
        for index, result in pool_map(scan_files, [(chunk,) for chunk in chunks], scan_workers, lambda done: bar.update(len(done))):
            if isinstance(result, BaseException):
                cause = environment_cause(result)
                scanned[index] = [
                    ScannedFile(file=file, kind="unread", reason=cause, fix=environment_fix(result))
                    if cause is not None
                    else ScannedFile(file=file, kind="other", reason=f"scan failed ({type(result).__name__})")
                    for file in chunks[index]
                ]
            else:
                scanned[index] = result
    items = [item for chunk in scanned for item in chunk]
    _stop_on_unread(items)
    return items


def _stop_on_unread(scanned: list[ScannedFile]) -> None:
    """Fail (exit 1) before anything is written when the machine could not read some sources.

    A file left unread for a permission or an I/O error would otherwise drop out of the dataset,
    and `medsynth run` would count ingest finished without it. The message names the source
    folder by number only: its path can name a patient.
    """
    unread = [item for item in scanned if item.kind == "unread"]
    if unread:
        first = unread[0]
        raise EnvironmentFailure(
            f"{first.reason} while reading {len(unread)} source file(s) or folder(s), the first under source "
            f"folder #{first.file.source + 1}: {first.fix}; nothing was written"
        )


def _process(
    tasks: list[SeriesTask], key: bytes, config: IngestConfig, workers: int, progress: bool, folders: list[tuple[str, str]]
) -> list[SeriesResult]:
    # Big series first: the pool stays busy until the end instead of waiting on one late giant.
    order = sorted(range(len(tasks)), key=lambda index: -len(tasks[index].files))
    jobs = [(tasks[index],) for index in order]
    results: list[SeriesResult | None] = [None] * len(tasks)
    with progress_bar(sum(len(task.files) for task in tasks), "ingest", "file", progress) as bar:
        for position, result in map_tasks(
            process_series, jobs, (key, config), config.executor, workers,
            lambda done: bar.update(len(done.used) + len(done.quarantined)),
            folders=folders, priorities=[len(tasks[index].files) for index in order],
        ):
            index = order[position]
            if isinstance(result, BaseException):
                cause = environment_cause(result)
                if cause is None:
                    raise result  # a bug, not the machine: exit 3 with --debug's traceback
                task = tasks[index]
                failed = SeriesResult(
                    sample_id=sample_pseudonym(key, task.series_key), subject_id="", label=task.label, kind=task.kind
                )
                failed.failure = f"{cause} while ingesting into {task.out}"
                failed.failure_fix = environment_fix(result)
                results[index] = failed
            else:
                results[index] = result
    return [result for result in results if result is not None]


def _stop_on_failures(out: Path, results: list[SeriesResult]) -> None:
    """Fail the stage (exit 1) when the machine failed any series; nothing of it is remembered.

    The finished series keep their outputs and state records (a re-run skips them); the failed
    ones have neither. ``manifest.csv`` is removed: an earlier one would describe another dataset.
    """
    failed = [result for result in results if result.failure]
    if not failed:
        return
    _drop_manifest(out)
    finished = len(results) - len(failed)
    raise EnvironmentFailure(
        f"{failed[0].failure} ({len(failed)} of {len(results)} series not finished): {failed[0].failure_fix}; "
        f"nothing was lost: the {finished} finished series are kept, and a re-run skips them."
    )


def _drop_manifest(out: Path) -> None:
    """Remove ``manifest.csv`` of an unfinished run: no reader may take a partial dataset for a complete one."""
    try:
        (out / "manifest.csv").unlink(missing_ok=True)
    except OSError:
        pass  # the message that follows says the stage failed; a later run rewrites the manifest


def _check_accounting(seen: int, quarantine: list[tuple[SourceFile, str, str, str]], written: list[SeriesResult]) -> None:
    """Every source file is behind an output image or in quarantine.csv, once: else the stage fails (exit 1)."""
    used = sum(len(result.used) for result in written)
    if used + len(quarantine) != seen:
        raise CheckFailed(
            f"ingest accounted for {used} used and {len(quarantine)} quarantined file(s) of the {seen} it found: "
            "they must add up, so nothing was written as finished. Cause: a medsynth bug or files changing during "
            "the run. Fix: re-run ingest; if the counts still differ, report it."
        )


def _write_quarantine(out: Path, private: Path, key: bytes, entries: list[tuple[SourceFile, str, str, str]]) -> None:
    public = io.StringIO()
    secret = io.StringIO()
    public_writer = csv.writer(public, lineterminator="\n")
    secret_writer = csv.writer(secret, lineterminator="\n")
    public_writer.writerow(["ref", "reason", "sample_id", "format"])
    secret_writer.writerow(["ref", "source_index", "path", "reason"])
    for file, reason, sample_id, kind in sorted(entries, key=lambda entry: (entry[0].source, entry[0].rel)):
        ref = file_reference(key, f"{file.source}:{file.rel}")
        public_writer.writerow([ref, reason, sample_id, kind])
        secret_writer.writerow([ref, file.source, file.path, reason])
    atomic_write_text(out / QUARANTINE_NAME, public.getvalue())
    atomic_write_text(private / QUARANTINE_NAME, secret.getvalue(), PRIVATE_MODE)


def _write_private_map(private: Path, written: list[SeriesResult]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sample_id", "subject_id", "source_index", "path", "output"])
    for result in sorted(written, key=lambda item: item.sample_id):
        image = (result.row or {}).get("path", "")
        for file in result.used:
            writer.writerow([result.sample_id, result.subject_id, file.source, file.path, image])
    atomic_write_text(private / "source_map.csv", buffer.getvalue(), PRIVATE_MODE)


def _write_audit_log(out: Path, results: list[SeriesResult]) -> None:
    lines = []
    for result in sorted(results, key=lambda item: item.sample_id):
        entry = {
            "sample_id": result.sample_id,
            "format": result.kind,
            "status": "written" if result.row is not None else "quarantined",
            "files": len(result.used),
            "rules": result.audit,
        }
        lines.append(json.dumps(entry, sort_keys=True))
    atomic_write_text(out / AUDIT_LOG_NAME, "\n".join(lines) + ("\n" if lines else ""))


def _write_record(out: Path, config: IngestConfig, summary: IngestSummary) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        table_version = version(TABLE_PACKAGE)
    except PackageNotFoundError:
        table_version = "unknown"
    atomic_write_json(
        out / INGEST_RECORD,
        {
            "profile": {
                "standard": "DICOM PS3.15 Annex E, Table E.1-1",
                "edition": TABLE_EDITION,
                "table_source": f"{TABLE_PACKAGE}=={table_version} ({TABLE_MODULE})",
                "options": summary.options,
            },
            "deid": config.deid.model_dump(mode="json"),
            "burned_in": config.burned_in.model_dump(mode="json"),
            "split": config.split.model_dump(mode="json"),
            # Counts of the dataset itself (not of this run: a resumed run writes the same record).
            "counts": {key: value for key, value in summary.metrics().items() if key != "series_resumed"},
            "quarantined": summary.quarantined,
        },
    )


def _remove_orphans(out: Path, keep: set[str]) -> None:
    """Delete outputs no current series owns (earlier runs, killed runs) and stray temp files."""
    for folder in ("images", "dicom"):
        root = out / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*"), reverse=True):
            rel = path.relative_to(out).as_posix()
            if path.is_file() and rel not in keep:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    for stray in out.glob(".*.tmp"):
        stray.unlink()


def _self_audit(
    out: Path, files: list[SourceFile], results: list[SeriesResult], book: LabelBook, config: IngestConfig, workers: int
) -> AuditReport:
    """The leak audit of ingest's own output, with the identifiers its workers removed.

    DICOM outputs were tokenized and structure-checked by the workers as they wrote them; only
    series whose tokens could hold an identifier are read again (to name file and tag). Every
    other file (NIfTI, manifest, CSV, JSON) is scanned here.
    """
    identifiers = Identifiers()
    kept: set[bytes] = set()
    for file in files:
        identifiers.add(path_identifiers(file.rel))
    for result in results:
        identifiers.add(result.identifiers)
        kept |= result.kept_text
    labels = {result.label for result in results if result.row is not None}
    if book.by_key is not None:
        labels |= set(book.by_key.values())
    final = identifiers.finalize(kept, labels)
    matcher = Matcher(final)
    findings: set[Finding] = set()
    checked: set[str] = set()
    for result in results:
        dicom = [rel for rel in result.outputs if rel.endswith(".dcm")]
        checked.update(dicom)
        findings |= {Finding(rel, where, kind) for rel, where, kind in result.structure}
        for rel in dicom:
            findings |= set(name_findings(rel, matcher))
        if dicom and matcher.may_match(result.tokens):
            for rel in dicom:
                findings |= set(scan_output_file(out / rel, rel, matcher, None))
    report = audit(
        out,
        identifiers=final,
        options=config.deid,
        source_count=len({file.source for file in files}),
        check_dicom_structure=False,
        exclude=checked,
        workers=workers,
    )
    report.files += len(checked)
    report.findings = sorted(set(report.findings) | findings, key=lambda item: (item.path, item.where, item.kind))
    return report


def _track(tracker: Tracker, summary: IngestSummary, out: Path, config: IngestConfig) -> None:
    tracker.log_metrics(summary.metrics())
    tracker.set_tags(
        {
            "ingest.profile": f"PS3.15 E.1-1 {TABLE_EDITION} basic",
            "ingest.options": ",".join(summary.options) or "none",
            "ingest.table_source": TABLE_PACKAGE,
        }
    )
    record = out / INGEST_RECORD
    if record.is_file():
        tracker.log_artifact(record, artifact_path="ingest")
    if (out / "manifest.csv").is_file():
        tracker.log_dataset(read_dataset(out), context="output", name=out.name)
