"""The export stage: real + kept synthetic images as one dataset, marked, filtered and documented.

``run`` reads the real dataset (ingest), the synthetic dataset (generate) and the report
(evaluate), then writes the augmented dataset:

```
OUT/manifest.csv          one row per image: origin, split, label, checksums, provenance columns
OUT/<split>/<label>/...   NIfTI images (real: on the model grid when a model is given; synthetic: as generated)
OUT/dicom/<sample>/       synthetic images as DICOM series (export.dicom: true)
OUT/excluded.csv          what was left out and why (memorized synthetic images, empty real volumes)
OUT/preprocessing.json    the transform applied to the real images
OUT/export.json           the export's facts (counts, gates, links, versions) for machines
OUT/data_card.md          the data card (data_cards/README.md explains every field)
```

The folder is built beside ``OUT`` and renamed into place at the end, so a reader never sees a
half-written export and an interrupted export leaves ``OUT`` as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.contracts.dataset import REQUIRED_COLUMNS, SPLITS, Dataset, read_dataset, verify_files, write_manifest
from pipeline.core.errors import CheckFailed, InputError
from pipeline.core.faults import environment_failure
from pipeline.export import card as card_module
from pipeline.contracts.model import CHECKPOINT, MODEL_JSON
from pipeline.export.facts import ModelFacts, git_commit, ingest_facts, model_facts, tool_versions
from pipeline.export.images import export_real, export_synthetic
from pipeline.export.privacy import privacy_filter, refusal
from pipeline.contracts.report import GateName
from pipeline.export.report import gate_status, load_report, report_path
from pipeline.export.config import ExportConfig
from pipeline.core.paths import is_inside
from pipeline.core.files import atomic_path, atomic_write_json, atomic_write_text
from pipeline.tracking import NullTracker, Tracker

__all__ = [
    "ExportSummary",
    "run",
    "EXCLUDED_NAME",
    "CARD_NAME",
    "PREPROCESSING_NAME",
    "FACTS_NAME",
    "EXCLUDED_COLUMNS",
    "LINK_STAGES",
]

EXCLUDED_NAME = "excluded.csv"
CARD_NAME = "data_card.md"
PREPROCESSING_NAME = "preprocessing.json"
FACTS_NAME = "export.json"
EXCLUDED_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "origin",
    "label",
    "split",
    "reason",
    "distance",
    "threshold",
    "nearest_train_sample_id",
    "generator_run_id",
)
# The stages whose MLflow run ids the orchestrator passes in ``links``.
LINK_STAGES: tuple[str, ...] = ("ingest", "train", "generate", "evaluate")
# Provenance columns every exported row carries (empty where they do not apply).
_PROVENANCE_COLUMNS: tuple[str, ...] = (
    "source_sample_id",
    "slice_index",
    "preprocessing",
    "spacing",
    "shape",
    "generator_run_id",
    "seed",
    "model_digest",
    "dicom_path",
)


@dataclass
class ExportSummary:
    """What :func:`run` wrote (counts and paths; no image content)."""

    out: Path
    real_images: int
    real_sources: int
    synthetic_images: int
    excluded_synthetic: int
    excluded_real: int
    counts: dict[str, dict[str, int]]
    privacy_gate: str
    gates: dict[str, str]
    gates_overridden: bool
    preprocessing: str
    dicom_series: int
    card: Path
    manifest: Path
    excluded: Path
    digest: str
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """A short human summary (the CLI echoes it)."""
        lines = [f"Augmented dataset written to {self.out}"]
        if self.gates_overridden and self.privacy_gate == "inconclusive":
            lines.append(
                "  WARNING: the privacy gate is INCONCLUSIVE (not a pass); exported only because that was accepted "
                "(--accept-inconclusive or --allow-failed-gates). The data card says so at the top."
            )
        elif self.gates_overridden:
            lines.append(
                f"  WARNING: the privacy gate is '{self.privacy_gate}'; exported only because failed gates were "
                "allowed (--allow-failed-gates). The data card says so at the top."
            )
        lines.append(
            f"  {self.real_images + self.synthetic_images} images: {self.real_images} real (from {self.real_sources} "
            f"volumes; {self.preprocessing}) + {self.synthetic_images} synthetic (train split only)"
        )
        per_split = []
        for split in SPLITS:
            origins = self.counts.get(split, {})
            if origins:
                per_split.append(f"{split} {origins.get('real', 0)} real + {origins.get('synthetic', 0)} synthetic")
        lines.append("  " + "; ".join(per_split))
        lines.append(
            f"  excluded: {self.excluded_synthetic} synthetic (privacy: too close to a training image), "
            f"{self.excluded_real} real (no image on the model grid) -> {self.excluded.name}"
        )
        if self.dicom_series:
            lines.append(f"  DICOM: {self.dicom_series} synthetic series under {self.out / 'dicom'}")
        words = {"fail": "FAIL", "inconclusive": "INCONCLUSIVE", "not_run": "not run"}
        lines.append("  gates: " + ", ".join(f"{name} {words.get(status, status)}" for name, status in self.gates.items()))
        lines.extend(f"  note: {warning}" for warning in self.warnings)
        lines.append(f"  data card: {self.card}")
        return lines


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_origin(dataset: Dataset, origin: str, flag: str) -> None:
    wrong = dataset.manifest.index[dataset.manifest["origin"] != origin]
    if len(wrong):
        line = int(wrong[0]) + 2
        raise InputError(
            f"{dataset.root / 'manifest.csv'} row {line}, column 'origin': expected '{origin}' in the dataset passed "
            f"as {flag}. Fix: pass the {origin} dataset there (written by `medsynth "
            f"{'ingest' if origin == 'real' else 'generate'}`)."
        )


def _check_synthetic_provenance(dataset: Dataset) -> int:
    """Require the provenance columns; return how many images lack a generator run id.

    ``generate`` leaves ``generator_run_id`` empty when it ran without MLflow (a library call):
    those images stay traceable by ``model_digest`` and ``seed``, and the card says so.
    """
    manifest_path = dataset.root / "manifest.csv"
    for column in ("generator_run_id", "model_digest", "seed"):
        if column not in dataset.manifest.columns:
            raise InputError(
                f"{manifest_path}: no '{column}' column, so its images cannot be traced to their generator. "
                "Fix: pass a synthetic dataset written by `medsynth generate`."
            )
    return int((dataset.manifest["generator_run_id"].str.strip() == "").sum())


def _check_report_inputs(report: Mapping[str, Any], where: Path, real: Dataset, synthetic: Dataset) -> None:
    """Refuse a report computed on other datasets than the ones given (when it records their digests)."""
    recorded = report.get("inputs") if isinstance(report.get("inputs"), dict) else {}
    for name, dataset, flag in (("real", real, "--real"), ("synthetic", synthetic, "--synthetic")):
        entry = recorded.get(name) if isinstance(recorded.get(name), dict) else {}
        digest = entry.get("digest")
        if digest and digest != dataset.digest:
            raise InputError(
                f"{where}: key 'inputs.{name}.digest' does not match the {name} dataset passed as {flag} "
                f"({dataset.root}): the report was computed on other data. Fix: re-run `medsynth evaluate` on "
                "these datasets, or pass the datasets it evaluated."
            )


def _check_labels(real: Dataset, synthetic: Dataset) -> None:
    unknown = sorted(set(synthetic.manifest["label"]) - set(real.manifest["label"]))
    if unknown:
        row = int(synthetic.manifest.index[synthetic.manifest["label"] == unknown[0]][0]) + 2
        raise InputError(
            f"{synthetic.root / 'manifest.csv'} row {row}, column 'label': class {unknown[0]!r} is not in the real "
            f"dataset ({', '.join(sorted(set(real.manifest['label'])))}). Fix: pass the real dataset the generator "
            "was trained on."
        )


def _check_out(out: Path, inputs: Mapping[str, Path]) -> None:
    for flag, folder in inputs.items():
        if is_inside(out, folder) or is_inside(folder, out):
            raise InputError(
                f"{out}: the output folder overlaps {flag} {folder}. Fix: pass --out a separate folder, e.g. runs/<name>/export."
            )
    existing = next(path for path in (out, *out.parents) if path.exists() or path == Path(path.anchor))
    if existing.exists() and not existing.is_dir():
        what = "exists and is not a folder" if existing == out else f"cannot be created: {existing} is a file"
        raise InputError(f"{out}: {what}. Fix: pass --out a new or empty folder.")
    if out.is_dir() and any(out.iterdir()) and not (out / FACTS_NAME).is_file():
        raise InputError(
            f"{out}: the folder is not empty and holds no earlier export ({FACTS_NAME}); refusing to replace it. "
            "Fix: pass --out a new or empty folder."
        )


def _manifest(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows).fillna("")
    ordered = list(REQUIRED_COLUMNS) + [column for column in _PROVENANCE_COLUMNS if column in frame.columns]
    ordered += sorted(column for column in frame.columns if column not in ordered)
    return frame[ordered].astype(str)


def _counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for (split, origin), count in manifest.groupby(["split", "origin"]).size().items():
        counts.setdefault(str(split), {})[str(origin)] = int(count)
    return {split: counts[split] for split in SPLITS if split in counts}


def _composition(manifest: pd.DataFrame) -> list[dict[str, Any]]:
    """Counts per split x label x origin, in split order."""
    table = manifest.groupby(["split", "label", "origin"]).size()
    rows = []
    for split in SPLITS:
        for label in sorted(set(manifest.loc[manifest["split"] == split, "label"])):
            real = int(table.get((split, label, "real"), 0))
            synthetic = int(table.get((split, label, "synthetic"), 0))
            rows.append({"split": split, "label": label, "real": real, "synthetic": synthetic, "total": real + synthetic})
    return rows


def _modality(model: ModelFacts | None, real: Dataset, synthetic: Dataset) -> str:
    if model is not None:
        return "CT" if model.meta.preprocess.get("intensity") == "ct" else "MR"
    for dataset in (synthetic, real):
        if "modality" in dataset.manifest.columns:
            values = [value for value in dataset.manifest["modality"].str.upper() if value]
            if values:
                return max(set(values), key=values.count)
    return "OT"


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.staging-"
    for stale in out.parent.glob(f"{prefix}*"):  # left behind by an interrupted export
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    # mkdtemp makes it owner-only (0700); the export is a shareable dataset like the others (0777 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def _swap_into_place(stage_dir: Path, out: Path) -> None:
    """Replace ``out`` by ``stage_dir`` with two renames (an earlier export is removed after)."""
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(out, previous)
    os.replace(stage_dir, out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _verify(dataset: Dataset, flag: str) -> None:
    """Refuse a dataset whose files changed since their manifest was written."""
    verify_files(dataset, flag=flag)


def _check_model_digest(model: ModelFacts, model_dir: Path, synthetic: Dataset) -> None:
    """Require the checkpoint to be the one model.json describes and the one the synthetic images came from."""
    checkpoint = model_dir / CHECKPOINT
    if model.checkpoint_sha256 is None:
        raise InputError(f"{checkpoint}: not found. Fix: pass a MODEL_DIR written by `medsynth train`.")
    recorded = model.meta.checkpoint_sha256
    if recorded is not None and recorded != model.checkpoint_sha256:
        raise InputError(
            f"{checkpoint}: does not match the checksum recorded in {MODEL_JSON} (key 'checkpoint_sha256'): the "
            "weights changed since train wrote them. Fix: restore the checkpoint, or re-run `medsynth train`."
        )
    digests = synthetic.manifest["model_digest"].astype(str)
    other = digests.index[digests != model.checkpoint_sha256]
    if len(other):
        line = int(other[0]) + 2
        raise InputError(
            f"{synthetic.root / 'manifest.csv'} row {line}, column 'model_digest': the image was generated by another "
            f"checkpoint than {checkpoint} (passed as --model). Fix: pass the MODEL_DIR that generated the synthetic "
            "dataset, or re-run `medsynth generate` with this model."
        )


@dataclass(frozen=True)
class _Inputs:
    """The checked inputs of one export."""

    real: Dataset
    synthetic: Dataset
    report: dict[str, Any]
    report_file: Path
    model_dir: Path | None
    model: ModelFacts | None
    untracked: int  # synthetic images without a generator run id


def _load_inputs(
    real: Path, synthetic: Path, report: str | os.PathLike[str], out: Path, model_dir: Path | None
) -> _Inputs:
    """Read and cross-check the datasets, the report and the model; refuse an unsafe output folder."""
    where = report_path(report)
    real_ds, synthetic_ds = read_dataset(real), read_dataset(synthetic)
    _check_origin(real_ds, "real", "--real")
    _check_origin(synthetic_ds, "synthetic", "--synthetic")
    untracked = _check_synthetic_provenance(synthetic_ds)
    _check_labels(real_ds, synthetic_ds)
    clash = sorted(set(real_ds.manifest["sample_id"]) & set(synthetic_ds.manifest["sample_id"]))
    if clash:
        raise InputError(
            f"{synthetic / 'manifest.csv'}: sample id {clash[0]!r} is also a real sample id in {real / 'manifest.csv'}. "
            "Fix: sample ids must be unique across the real and synthetic datasets; re-run `medsynth generate`."
        )
    report_doc = load_report(report)
    _check_report_inputs(report_doc, where, real_ds, synthetic_ds)
    folders = {"--real": real, "--synthetic": synthetic, "--report": where.parent}
    if model_dir is not None:
        folders["--model"] = model_dir
    _check_out(out, folders)
    model = model_facts(model_dir)
    if model_dir is not None and model is not None:
        _check_preprocess(model.meta.preprocess, model_dir / MODEL_JSON)
        _check_model_digest(model, model_dir, synthetic_ds)
    _verify(real_ds, "--real")  # before anything reads the images (the privacy filter measures distances)
    _verify(synthetic_ds, "--synthetic")
    return _Inputs(real_ds, synthetic_ds, report_doc, where, model_dir, model, untracked)


def _check_preprocess(spec: Mapping[str, Any], where: Path) -> None:
    """Refuse a model whose preprocessing spec cannot be applied (before anything is written)."""
    from pipeline.imaging.preprocess import Preprocessor

    try:
        Preprocessor(spec)
        low, high = spec["window"]
        float(low), float(high)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        detail = f"missing key '{exc.args[0]}'" if isinstance(exc, KeyError) and exc.args else type(exc).__name__
        raise InputError(
            f"{where}: key 'preprocess' is incomplete or malformed ({detail}). "
            "Fix: pass a MODEL_DIR written by `medsynth train` (re-run train if the file was edited)."
        ) from None


def _refuse_mixed_grids(real: Dataset, synthetic: Dataset) -> None:
    """Refuse (exit 2, before anything is written) to copy real images that are not on the synthetic images' grid."""
    import nibabel as nib
    import numpy as np

    def grids(dataset: Dataset) -> dict[str, int]:
        found: dict[str, int] = {}
        for _, row in dataset.manifest.iterrows():
            try:
                header = nib.load(dataset.image_path(row)).header
            except Exception:  # a damaged file is reported by the checksum check that follows
                continue
            shape = "x".join(str(int(size)) for size in header.get_data_shape())
            spacing = "x".join(f"{float(zoom):g}" for zoom in np.round(header.get_zooms(), 3))
            grid = f"{shape} voxels of {spacing} mm"
            found[grid] = found.get(grid, 0) + 1
        return found

    real_grids, synthetic_grids = grids(real), grids(synthetic)
    foreign = {grid: count for grid, count in real_grids.items() if grid not in synthetic_grids}
    if foreign:
        example = max(foreign, key=lambda grid: foreign[grid])
        raise InputError(
            f"--real {real.root}: {sum(foreign.values())} real image(s) are not on the synthetic images' grid "
            f"(e.g. {example}; synthetic: {', '.join(sorted(synthetic_grids))}), and without --model export would copy "
            "them unchanged, mixing grids in one dataset. Fix: pass --model MODEL_DIR so the real images get the "
            "model's preprocessing (the synthetic images' grid), or set `export.real_grid: native` to keep them on "
            "their native grid knowingly."
        )


def _notes(inputs: _Inputs, remarked: int, moved: int, preprocessed: bool) -> list[str]:
    """What a reader of the summary and the card should know about how the export went."""
    notes = []
    if inputs.untracked:
        notes.append(
            f"{inputs.untracked} synthetic image(s) have no generator run id (generated without MLflow tracking); "
            "they are traced by the model digest and seed columns"
        )
    if remarked:
        notes.append(f"{remarked} synthetic NIfTI file(s) lacked the synthetic marker in 'descrip' and were re-marked")
    if moved:
        notes.append(f"{moved} synthetic image(s) listed outside 'train' were moved to the train split")
    if not preprocessed:
        notes.append(
            "no model folder was given, so the real images were copied unchanged: they keep their native grid and "
            "intensity scale, unlike the synthetic images (pass --model to put both on the model grid)"
        )
    return notes


def _inconclusive_refusal(report: Mapping[str, Any], path: Path) -> CheckFailed:
    """Why an inconclusive privacy gate stops the export, with what the report says would decide it."""
    checks = (report["gates"].get("checks") or {}).get("privacy") or []
    open_checks = [
        f"{check.get('name')}: {check.get('power') or check.get('reason') or 'not measured'}"
        for check in checks
        if isinstance(check, dict) and check.get("verdict") in ("inconclusive", "not_run")
    ]
    detail = "; ".join(open_checks) or "see the report"
    return CheckFailed(
        f"export refused: the privacy gate of {path} is inconclusive, which is not a pass: the evaluation could not "
        f"show that the synthetic images do not reproduce training patients ({detail}). Fix: evaluate with more "
        "held-out real subjects (val + test), as the report states; or, to export anyway, pass --accept-inconclusive "
        "(config: export.accept_inconclusive: true): the data card then says so in its first lines."
    )


def run(
    real: str | os.PathLike[str],
    synthetic: str | os.PathLike[str],
    report: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: ExportConfig,
    model_dir: str | os.PathLike[str] | None = None,
    tracker: Tracker = NullTracker(),
    allow_failed_gates: bool = False,
    links: Mapping[str, str] | None = None,
    accept_inconclusive: bool = False,
) -> ExportSummary:
    """Export the augmented dataset (real + kept synthetic images) with its data card.

    Args:
        real: the real dataset (``medsynth ingest``).
        synthetic: the synthetic dataset (``medsynth generate``).
        report: the report folder (``medsynth evaluate``) or its ``report.json``.
        out: the augmented dataset folder (created or replaced; an unrelated non-empty folder is refused).
        config: the ``export:`` section.
        model_dir: the generator's folder: real images get its preprocessing (same grid and intensity
            scale as the synthetic ones). None: real images are copied unchanged.
        tracker: where to record lineage (datasets in/out, card and manifest, links).
        allow_failed_gates: export even if the privacy gate failed, did not run or is inconclusive
            (also ``config.allow_failed_gates``); the card then says so at the top.
        links: MLflow run ids of the other stages, keyed ``ingest``, ``train``, ``generate``,
            ``evaluate`` (the orchestrator passes them; missing ones are read from the inputs).

    Returns:
        The summary of what was written.

    Raises:
        InputError: unreadable or inconsistent inputs, or an unsafe output folder.
        CheckFailed: the privacy gate failed (or did not run) and failed gates were not allowed, or it is
            inconclusive and that was not accepted.
    """
    out = Path(out)
    inputs = _load_inputs(Path(real), Path(synthetic), report, out, Path(model_dir) if model_dir is not None else None)
    gates = {gate.value: gate_status(inputs.report, gate) for gate in GateName}
    privacy_gate = gates["privacy"]
    allowed = allow_failed_gates or config.allow_failed_gates
    accepted = accept_inconclusive or config.accept_inconclusive
    overridden = privacy_gate != "pass"
    tracker.set_tags(
        {
            "medsynth.privacy_gate": privacy_gate,
            "medsynth.allow_failed_gates": str(allowed).lower(),
            "medsynth.accept_inconclusive": str(accepted).lower(),
        }
    )
    # Inconclusive is never a pass: it is refused like a failure unless accepted explicitly (or unless
    # failed gates are allowed, which covers it too); the card then says which.
    if privacy_gate == "inconclusive" and not (accepted or allowed):
        tracker.set_tags({"medsynth.refused": "privacy gate inconclusive"})
        raise _inconclusive_refusal(inputs.report, inputs.report_file)
    if overridden and privacy_gate != "inconclusive" and not allowed:
        tracker.set_tags({"medsynth.refused": "privacy gate " + privacy_gate})
        raise refusal(inputs.report, inputs.report_file, privacy_gate)
    accepted_by = (
        "--accept-inconclusive / export.accept_inconclusive"
        if accepted
        else "--allow-failed-gates / export.allow_failed_gates"
    )

    flagged, excluded_synthetic, filter_how = privacy_filter(
        inputs.real, inputs.synthetic, inputs.model_dir, inputs.report, config, inputs.report_file
    )
    excluded_ids = {row["sample_id"] for row in excluded_synthetic}
    kept = inputs.synthetic.manifest[~inputs.synthetic.manifest["sample_id"].isin(excluded_ids)]
    if inputs.model is None and config.real_grid == "model":
        _refuse_mixed_grids(inputs.real, inputs.synthetic)
    preprocessor = None
    if inputs.model is not None:
        from pipeline.imaging.preprocess import Preprocessor

        preprocessor = Preprocessor(inputs.model.meta.preprocess)
    modality = _modality(inputs.model, inputs.real, inputs.synthetic)
    window = None
    if inputs.model is not None and modality == "CT":
        low, high = inputs.model.meta.preprocess["window"]
        window = (float(low), float(high))

    stage_dir = _staging_dir(out)
    try:
        used: set[str] = set()
        real_rows, excluded_real = export_real(inputs.real, stage_dir, preprocessor, used)
        synthetic_rows, remarked, moved = export_synthetic(
            inputs.synthetic, kept, stage_dir, config, modality, window, used
        )
        manifest = _manifest(real_rows + synthetic_rows)
        write_manifest(stage_dir, manifest)
        excluded = pd.DataFrame(excluded_synthetic + excluded_real, columns=list(EXCLUDED_COLUMNS)).fillna("")
        with atomic_path(stage_dir / EXCLUDED_NAME) as tmp:
            excluded.to_csv(tmp, index=False, lineterminator="\n")
        preprocessing = _preprocessing_record(preprocessor, inputs.model)
        atomic_write_json(stage_dir / PREPROCESSING_NAME, preprocessing)
        notes = _notes(inputs, remarked, moved, preprocessor is not None)
        facts = card_module.build_facts(
            card_module.CardInputs(
                real=inputs.real,
                synthetic=inputs.synthetic,
                report=inputs.report,
                model=inputs.model,
                ingest=ingest_facts(inputs.real),
            ),
            card_module.CardGates(
                gates=gates, privacy_gate=privacy_gate, overridden=overridden, accepted_by=accepted_by
            ),
            card_module.CardExport(
                augmented=read_dataset(stage_dir),
                excluded=excluded,
                preprocessing=preprocessing,
                composition=_composition(manifest),
                modality=modality,
                flagged=len(flagged),
                filter_how=filter_how,
                warnings=notes,
                out_name=out.name,
            ),
            card_module.CardProvenance(
                links=_links(links or {}, inputs.model, inputs.synthetic, inputs.report),
                export_run_id=tracker.run_id,
                versions=tool_versions(),
                commit=git_commit(),
            ),
            config,
        )
        atomic_write_json(stage_dir / FACTS_NAME, facts)
        atomic_write_text(stage_dir / CARD_NAME, card_module.render_card(facts, config.card.template))
        _swap_into_place(stage_dir, out)
    except BaseException as exc:
        shutil.rmtree(stage_dir, ignore_errors=True)
        failure = isinstance(exc, OSError) and environment_failure(
            exc, f"writing the export {out}", "nothing was lost: an earlier export there is unchanged"
        )
        if failure:
            raise failure from exc
        raise

    augmented = read_dataset(out)
    summary = ExportSummary(
        out=out,
        real_images=len(real_rows),
        real_sources=len(inputs.real.manifest) - len(excluded_real),
        synthetic_images=len(synthetic_rows),
        excluded_synthetic=len(excluded_synthetic),
        excluded_real=len(excluded_real),
        counts=_counts(augmented.manifest),
        privacy_gate=privacy_gate,
        gates=gates,
        gates_overridden=overridden,
        preprocessing="model grid" if preprocessor is not None else "copied unchanged",
        dicom_series=sum(1 for row in synthetic_rows if row["dicom_path"]),
        card=out / CARD_NAME,
        manifest=out / "manifest.csv",
        excluded=out / EXCLUDED_NAME,
        digest=augmented.digest,
        warnings=notes,
    )
    _track(tracker, inputs.real, inputs.synthetic, augmented, summary, facts["links"])
    return summary


def _links(
    links: Mapping[str, str], model: ModelFacts | None, synthetic: Dataset, report: Mapping[str, Any]
) -> dict[str, str]:
    """MLflow run ids of the stages behind the inputs: the orchestrator's, else what the inputs record."""
    found: dict[str, str] = {}
    if model is not None and model.meta.mlflow_run_id:
        found["train"] = str(model.meta.mlflow_run_id)
    generator_runs = sorted(set(synthetic.manifest["generator_run_id"]) - {""})
    if len(generator_runs) == 1:
        found["generate"] = generator_runs[0]
    recorded = report.get("mlflow") if isinstance(report.get("mlflow"), dict) else {}
    if recorded.get("model_run_id") and "train" not in found:
        found["train"] = str(recorded["model_run_id"])
    if recorded.get("run_id"):
        found["evaluate"] = str(recorded["run_id"])
    found.update({key: str(value) for key, value in links.items() if value})
    return {stage: found[stage] for stage in (*LINK_STAGES, *sorted(set(found) - set(LINK_STAGES))) if stage in found}


def _preprocessing_record(preprocessor: Any | None, model: ModelFacts | None) -> dict[str, Any]:
    if preprocessor is None:
        return {
            "real": "none: real images copied unchanged (native grid, modality units); no --model was given",
            "synthetic": "generated on the model grid (as written by medsynth generate)",
            "spec": None,
            "steps": [],
        }
    spec = dict(preprocessor.spec)
    two_d = preprocessor.spatial_dims == 2
    return {
        "real": (
            "model preprocessing (the transform the generator was trained with), stored in modality units on the model "
            + ("grid: one (H, W, 1) NIfTI per non-empty axial slice, sample id <real sample_id>#z<k>" if two_d
               else "grid: one volume per real image")
        ),
        "synthetic": "generated on the model grid (as written by medsynth generate); copied unchanged",
        "spec": spec,
        "steps": list(preprocessor.describe()),
        "model_checkpoint_sha256": model.checkpoint_sha256 if model else None,
    }


def _track(
    tracker: Tracker,
    real: Dataset,
    synthetic: Dataset,
    augmented: Dataset,
    summary: ExportSummary,
    links: Mapping[str, str],
) -> None:
    tracker.log_dataset(real, context="real", name="real")
    tracker.log_dataset(synthetic, context="synthetic", name="synthetic")
    tracker.log_dataset(augmented, context="output", name="augmented")
    tags = {f"medsynth.{stage}_run_id": run_id for stage, run_id in links.items()}
    if "evaluate" in links:
        tags["medsynth.report_run_id"] = links["evaluate"]
    tags.update({
        "medsynth.real_sha256": real.digest,
        "medsynth.synthetic_sha256": synthetic.digest,
        "medsynth.augmented_sha256": augmented.digest,
        "medsynth.gates_overridden": str(summary.gates_overridden).lower(),
    })
    tracker.set_tags(tags)
    tracker.log_metrics({
        "images": summary.real_images + summary.synthetic_images,
        "real_images": summary.real_images,
        "synthetic_images": summary.synthetic_images,
        "excluded_synthetic": summary.excluded_synthetic,
        "excluded_real": summary.excluded_real,
        "dicom_series": summary.dicom_series,
    })
    for name in (CARD_NAME, "manifest.csv", EXCLUDED_NAME, PREPROCESSING_NAME, FACTS_NAME):
        tracker.log_artifact(summary.out / name, "export")
