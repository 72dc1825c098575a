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

import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.dataset import REQUIRED_COLUMNS, SPLITS, Dataset, read_dataset, write_manifest
from pipeline.errors import CheckFailed, InputError
from pipeline.export import card as card_module
from pipeline.export.dicom import SyntheticImageInfo, synthetic_uid, write_synthetic_series
from pipeline.export.facts import git_commit, ingest_facts, model_facts, tool_versions
from pipeline.export.report import Flagged, base_sample_id, flagged_samples, gate_status, load_report, report_path
from pipeline.export_config import ExportConfig
from pipeline.files import atomic_path, atomic_write_json, atomic_write_text, read_nifti, sha256_file, write_nifti
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
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_MARKER = "synthetic"


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
        if self.gates_overridden:
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
        lines.append("  gates: " + ", ".join(f"{name} {status}" for name, status in self.gates.items()))
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


def _inside(path: Path, other: Path) -> bool:
    try:
        path.resolve().relative_to(other.resolve())
    except ValueError:
        return False
    return True


def _check_out(out: Path, inputs: Mapping[str, Path]) -> None:
    for flag, folder in inputs.items():
        if _inside(out, folder) or _inside(folder, out):
            raise InputError(
                f"{out}: the output folder overlaps {flag} {folder}. Fix: pass --out a separate folder, e.g. runs/<name>/export."
            )
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder. Fix: pass --out a new or empty folder.")
    if out.is_dir() and any(out.iterdir()) and not (out / FACTS_NAME).is_file():
        raise InputError(
            f"{out}: the folder is not empty and holds no earlier export ({FACTS_NAME}); refusing to replace it. "
            "Fix: pass --out a new or empty folder."
        )


def _privacy_findings(report: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(failed checks as 'name value (max t)', reasons checks could not run) of the privacy gate."""
    checks = (report["gates"].get("checks") or {}).get("privacy")
    failed: list[str] = []
    reasons: list[str] = []
    if isinstance(checks, list) and checks:
        for check in checks:
            if not isinstance(check, dict):
                continue
            name = str(check.get("name", "")).replace("_", " ")
            value, threshold = check.get("value"), check.get("threshold")
            if check.get("passed") is False and isinstance(value, (int, float)):
                bound = "max" if check.get("comparison") == "<=" else "min"
                limit = f" ({bound} {threshold:.4g})" if isinstance(threshold, (int, float)) else ""
                failed.append(f"{name} {value:.4g}{limit}")
            elif check.get("passed") is None and check.get("reason"):
                reasons.append(str(check["reason"]))
        return failed, sorted(set(reasons))
    privacy = report["privacy"]
    thresholds = report["gates"].get("thresholds", {}) or {}
    for key, limit_key in (("memorization_rate", "max_memorization_rate"), ("mia_auc", "max_mia_auc"), ("epsilon", "max_epsilon")):
        value, limit = privacy.get(key), thresholds.get(limit_key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            bound = f" (max {limit:.4g})" if isinstance(limit, (int, float)) and not isinstance(limit, bool) else ""
            failed.append(f"{key.replace('_', ' ')} {value:.4g}{bound}")
        elif privacy.get(f"{key}_reason"):
            reasons.append(str(privacy[f"{key}_reason"]))
    return failed, sorted(set(reasons))


def _refusal(report: Mapping[str, Any], path: Path, status: str) -> CheckFailed:
    failed, reasons = _privacy_findings(report)
    if status == "fail":
        measured = f": {', '.join(failed)}" if failed else ""
        what = f"the privacy gate of {path} failed{measured}. The synthetic images may reproduce training patients."
        fix = "retrain (more data, fewer steps, differential privacy) and re-run evaluate"
    else:
        why = "; ".join(reasons) or "see the report"
        what = f"the privacy gate of {path} did not run ({why}), so nothing shows the synthetic images are safe to share."
        fix = "give evaluate enough held-out real images (val + test) and re-run it"
    return CheckFailed(
        f"export refused: {what} Fix: {fix}; or, to export anyway (e.g. for internal inspection), pass "
        "--allow-failed-gates (config: export.allow_failed_gates: true): the data card then says so in its first lines."
    )


# --------------------------------------------------------------------------------------------
# Writing images
# --------------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    """A file-name-safe form of a sample id or label (ids and labels are never PHI)."""
    return _SAFE_NAME.sub("_", name).strip("._") or "x"


def _spacing_text(affine: np.ndarray) -> str:
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return "x".join(f"{value:g}" for value in np.round(zooms, 4))


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(value)) for value in shape)


def _copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def _nifti_suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def _export_real(real: Dataset, stage_dir: Path, preprocessor: Any | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write the real images; return (manifest rows, excluded rows)."""
    rows: list[dict[str, Any]] = []
    excluded: list[dict[str, Any]] = []
    extras = [column for column in real.manifest.columns if column not in REQUIRED_COLUMNS]
    for _, source in real.manifest.sort_values("sample_id", kind="stable").iterrows():
        base = {column: str(source[column]) for column in extras}
        base.update(
            subject_id=str(source["subject_id"]), label=str(source["label"]), split=str(source["split"]), origin="real",
            source_sample_id=str(source["sample_id"]), generator_run_id="", seed="", model_digest="", dicom_path="",
        )
        folder = Path(str(source["split"])) / _safe(str(source["label"]))
        if preprocessor is None:
            path = real.image_path(source)
            rel = folder / f"{_safe(str(source['sample_id']))}{_nifti_suffix(path)}"
            _copy(path, stage_dir / rel)
            rows.append({**base, "sample_id": str(source["sample_id"]), "path": rel.as_posix(), "sha256": str(source["sha256"]),
                         "slice_index": "", "preprocessing": "none"})
            continue
        data, affine = read_nifti(real.image_path(source))
        images = preprocessor.to_intensity(preprocessor.volume_to_images(data, affine, origin="real"))
        grid = preprocessor.grid_affine()
        if len(images) == 0:
            excluded.append({"sample_id": str(source["sample_id"]), "origin": "real", "label": str(source["label"]),
                             "split": str(source["split"]),
                             "reason": "real volume without a non-empty axial slice on the model grid (model preprocessing)"})
            continue
        two_d = preprocessor.spatial_dims == 2
        for index, image in enumerate(images):
            volume = np.asarray(image, dtype=np.float32)
            volume = volume[:, :, None] if two_d else volume
            sample_id = f"{source['sample_id']}#z{index}" if two_d else str(source["sample_id"])
            name = f"{_safe(str(source['sample_id']))}_z{index:03d}" if two_d else _safe(str(source["sample_id"]))
            rel = folder / f"{name}.nii.gz"
            write_nifti(stage_dir / rel, volume, grid, descrip="real (medsynth export, model grid)")
            rows.append({**base, "sample_id": sample_id, "path": rel.as_posix(), "sha256": sha256_file(stage_dir / rel),
                         "slice_index": str(index) if two_d else "", "preprocessing": "model-grid",
                         "spacing": _spacing_text(grid), "shape": _shape_text(volume.shape), "dtype": "float32"})
    return rows, excluded


def _descrip(path: Path) -> str:
    try:
        raw = nib.load(path).header["descrip"]
    except Exception:  # nibabel raises several unrelated types for corrupt files; read_nifti reports them
        return ""
    value = raw.item() if hasattr(raw, "item") else raw
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _export_synthetic(
    synthetic: Dataset,
    kept: pd.DataFrame,
    stage_dir: Path,
    config: ExportConfig,
    modality: str,
    window: tuple[float, float] | None,
) -> tuple[list[dict[str, Any]], int, int]:
    """Write the kept synthetic images (and their DICOM series); return (rows, re-marked files, moved to train)."""
    rows: list[dict[str, Any]] = []
    remarked = 0
    moved = int((kept["split"] != "train").sum())
    extras = [column for column in synthetic.manifest.columns if column not in REQUIRED_COLUMNS]
    study_uid = synthetic_uid(
        config.uid_root, "study", synthetic.digest, *sorted(set(synthetic.manifest["generator_run_id"]))
    )
    for series_number, (_, source) in enumerate(kept.sort_values("sample_id", kind="stable").iterrows(), start=1):
        path = synthetic.image_path(source)
        sample_id = str(source["sample_id"])
        run_id = str(source["generator_run_id"])
        rel = Path("train") / _safe(str(source["label"])) / f"{_safe(sample_id)}{_nifti_suffix(path)}"
        target = stage_dir / rel
        # Every synthetic file must say so in its header; generate already writes the marker.
        if _MARKER in _descrip(path).lower():
            _copy(path, target)
        else:
            data, affine = read_nifti(path)
            rel = rel.with_name(f"{_safe(sample_id)}.nii.gz")
            target = stage_dir / rel
            write_nifti(target, data, affine, descrip=f"synthetic (medsynth {run_id})")
            remarked += 1
        row = {column: str(source[column]) for column in extras}
        row.update(
            sample_id=sample_id, subject_id=str(source["subject_id"]), label=str(source["label"]), split="train",
            path=rel.as_posix(), origin="synthetic", sha256=sha256_file(target), source_sample_id="", slice_index="",
            preprocessing="generated", dicom_path="",
        )
        header = nib.load(target)
        row["spacing"] = row.get("spacing") or _spacing_text(header.affine)
        row["shape"] = row.get("shape") or _shape_text(header.shape)
        if config.dicom:
            data, affine = read_nifti(target)
            series = Path("dicom") / _safe(sample_id)
            info = SyntheticImageInfo(
                sample_id=sample_id, label=str(source["label"]), generator_run_id=run_id,
                seed=str(source.get("seed", "")), model_digest=str(source.get("model_digest", "")), sha256=row["sha256"],
                modality=modality, series_number=series_number, study_uid=study_uid, window=window,
            )
            write_synthetic_series(data, affine, stage_dir / series, info, config.uid_root)
            row["dicom_path"] = series.as_posix()
        rows.append(row)
    return rows, remarked, moved


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


def _modality(model: Mapping[str, Any] | None, real: Dataset, synthetic: Dataset) -> str:
    if model is not None:
        return "CT" if model["preprocess"].get("intensity") == "ct" else "MR"
    for dataset in (synthetic, real):
        if "modality" in dataset.manifest.columns:
            values = [value for value in dataset.manifest["modality"].str.upper() if value]
            if values:
                return max(set(values), key=values.count)
    return "OT"


def _excluded_synthetic(
    synthetic: Dataset,
    flagged: list[Flagged],
    distances: Mapping[str, tuple[float, str]] | None,
    limits: list[tuple[float, str]],
    where: Path,
) -> list[dict[str, Any]]:
    """Rows of excluded.csv for the synthetic images the privacy filter removes.

    Args:
        synthetic: the synthetic dataset.
        flagged: the report's flagged images (always excluded).
        distances: nearest-training-image distance and id per synthetic sample (None: not computed).
        limits: ``(threshold, why)`` pairs: an image closer than a threshold is excluded too.
        where: the report file (for messages).
    """
    manifest = synthetic.manifest.set_index("sample_id", drop=False)
    known = set(manifest.index)
    rows: dict[str, dict[str, Any]] = {}
    for item in flagged:
        if item.sample_id not in known:
            raise InputError(
                f"{where}: key 'privacy.flagged' names sample {item.sample_id!r}, which is not in "
                f"{synthetic.root / 'manifest.csv'}: the report was computed on another synthetic dataset. "
                "Fix: re-run `medsynth evaluate` on these datasets."
            )
        distance = "" if item.distance is None else f"{item.distance:.6g}"
        threshold = "" if item.threshold is None else f"{item.threshold:.6g}"
        detail = (
            f"distance {distance} to the nearest training image is below the report's memorization threshold {threshold}"
            if distance and threshold
            else "flagged by the report"
        )
        rows[item.sample_id] = {
            "sample_id": item.sample_id, "reason": f"memorized: {detail} (privacy.flagged)",
            "distance": distance, "threshold": threshold, "nearest_train_sample_id": item.nearest_train_sample_id,
        }
    for sample_id, (distance, nearest) in sorted((distances or {}).items()):
        if sample_id not in known or sample_id in rows:
            continue
        for threshold, why in limits:
            if distance < threshold:
                rows[sample_id] = {
                    "sample_id": sample_id,
                    "reason": f"too close: distance {distance:.6g} to the nearest training image is below {why} {threshold:.6g}",
                    "distance": f"{distance:.6g}", "threshold": f"{threshold:.6g}", "nearest_train_sample_id": nearest,
                }
                break
    out = []
    for sample_id in sorted(rows):
        source = manifest.loc[sample_id]
        out.append({**rows[sample_id], "origin": "synthetic", "label": str(source["label"]), "split": str(source["split"]),
                    "generator_run_id": str(source["generator_run_id"])})
    return out


def _report_distances(report: Mapping[str, Any]) -> dict[str, tuple[float, str]] | None:
    """Per-sample nearest-training distances recorded in the report (``privacy.per_sample``), if any."""
    entries = report["privacy"].get("per_sample")
    if not isinstance(entries, list) or not entries:
        return None
    distances: dict[str, tuple[float, str]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("distance") is None:
            continue
        sample_id = base_sample_id(str(entry.get("sample_id", "")))
        distance = float(entry["distance"])
        if sample_id not in distances or distance < distances[sample_id][0]:
            distances[sample_id] = (distance, str(entry.get("nearest_train_sample_id") or ""))
    return distances


def _measured_distances(
    real: Dataset, synthetic: Dataset, model_dir: Path | None, report: Mapping[str, Any], where: Path
) -> dict[str, tuple[float, str]]:
    """Nearest-training-image distance of every synthetic image, measured as the report measures it.

    Uses the evaluate stage's own image loading and distance (RMS difference of preprocessed images
    in pixel space, the report's ``privacy.memorization_space``), so the numbers compare with the
    report's memorization threshold.
    """
    from pipeline.evaluate.images import load_image_sets
    from pipeline.evaluate.neighbours import as_vectors
    from pipeline.evaluate.privacy import closest_records

    space = report["privacy"].get("memorization_space", "pixel")
    if space != "pixel":
        raise InputError(
            f"{where}: 'privacy.memorization_space' is {space!r}; export can re-measure distances only in the pixel "
            "space. Fix: remove export.min_distance, or re-run `medsynth evaluate` with this version."
        )
    seed = int((report.get("config") or {}).get("seed", 0))
    real_set, synthetic_set, _ = load_image_sets(real, synthetic, model_dir=model_dir, seed=seed, max_images=None)
    train = real_set.split("train")
    train_vectors = as_vectors(train.images)
    close = closest_records(as_vectors(synthetic_set.images), train_vectors, math.sqrt(train_vectors.shape[1]))
    distances: dict[str, tuple[float, str]] = {}
    for index, sample_id in enumerate(synthetic_set.sample_ids):
        key = base_sample_id(str(sample_id))
        distance = float(close.distance[index])
        if key not in distances or distance < distances[key][0]:
            distances[key] = (distance, str(train.sample_ids[close.index[index]]))
    return distances


def _privacy_filter(
    real: Dataset,
    synthetic: Dataset,
    model_dir: Path | None,
    report: Mapping[str, Any],
    config: ExportConfig,
    where: Path,
) -> tuple[list[Flagged], list[dict[str, Any]], str]:
    """The report's flags plus, where needed, distances measured here; returns (flagged, excluded rows, how).

    Distances are measured when ``export.min_distance`` is set (and the report records no
    per-sample distances), and when the report audited fewer synthetic images than the dataset
    holds (evaluate caps large sets): then every image is held to the report's memorization threshold.
    """
    flagged = flagged_samples(report)
    privacy = report["privacy"]
    audited = privacy.get("n_synthetic")
    unaudited = isinstance(audited, int) and not isinstance(audited, bool) and audited < len(synthetic.manifest)
    limits: list[tuple[float, str]] = []
    threshold = privacy.get("memorization_threshold")
    if unaudited and isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        limits.append((float(threshold), "the report's memorization threshold"))
    if config.min_distance is not None:
        limits.append((float(config.min_distance), "export.min_distance"))
    if not limits:
        return flagged, _excluded_synthetic(synthetic, flagged, None, [], where), "report flags"
    distances = _report_distances(report)
    how = "report flags + per-sample distances recorded in the report"
    if distances is None:
        distances = _measured_distances(real, synthetic, model_dir, report, where)
        how = "report flags + nearest-training distances measured by export (the report's pixel space)"
    return flagged, _excluded_synthetic(synthetic, flagged, distances, limits, where), how


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.staging-"
    for stale in out.parent.glob(f"{prefix}*"):  # left behind by an interrupted export
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))


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
    for index, row in dataset.manifest.iterrows():
        if sha256_file(dataset.image_path(row)) != row["sha256"]:
            raise InputError(
                f"{dataset.root / 'manifest.csv'} row {int(index) + 2}, column 'sha256': file {row['path']} of {flag} "
                "no longer matches its checksum. Fix: restore the file, or re-run the stage that wrote the dataset."
            )


@dataclass(frozen=True)
class _Inputs:
    """The checked inputs of one export."""

    real: Dataset
    synthetic: Dataset
    report: dict[str, Any]
    report_file: Path
    model_dir: Path | None
    model: dict[str, Any] | None
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
    return _Inputs(real_ds, synthetic_ds, report_doc, where, model_dir, model_facts(model_dir), untracked)


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
        allow_failed_gates: export even if the privacy gate failed or did not run (also
            ``config.allow_failed_gates``); the card then says so at the top.
        links: MLflow run ids of the other stages, keyed ``ingest``, ``train``, ``generate``,
            ``evaluate`` (the orchestrator passes them; missing ones are read from the inputs).

    Returns:
        The summary of what was written.

    Raises:
        InputError: unreadable or inconsistent inputs, or an unsafe output folder.
        CheckFailed: the privacy gate failed (or did not run) and failed gates were not allowed.
    """
    out = Path(out)
    inputs = _load_inputs(Path(real), Path(synthetic), report, out, Path(model_dir) if model_dir is not None else None)
    gates = {name: gate_status(inputs.report, name) for name in ("fidelity", "diversity", "privacy", "utility")}
    privacy_gate = gates["privacy"]
    allowed = allow_failed_gates or config.allow_failed_gates
    overridden = privacy_gate != "pass"
    tracker.set_tags({"medsynth.privacy_gate": privacy_gate, "medsynth.allow_failed_gates": str(allowed).lower()})
    if overridden and not allowed:
        tracker.set_tags({"medsynth.refused": "privacy gate " + privacy_gate})
        raise _refusal(inputs.report, inputs.report_file, privacy_gate)

    flagged, excluded_synthetic, filter_how = _privacy_filter(
        inputs.real, inputs.synthetic, inputs.model_dir, inputs.report, config, inputs.report_file
    )
    excluded_ids = {row["sample_id"] for row in excluded_synthetic}
    kept = inputs.synthetic.manifest[~inputs.synthetic.manifest["sample_id"].isin(excluded_ids)]
    _verify(inputs.real, "--real")
    _verify(inputs.synthetic, "--synthetic")
    preprocessor = None
    if inputs.model is not None:
        from pipeline.models.preprocess import Preprocessor

        preprocessor = Preprocessor(inputs.model["preprocess"])
    modality = _modality(inputs.model, inputs.real, inputs.synthetic)
    window = None
    if inputs.model is not None and modality == "CT":
        low, high = inputs.model["preprocess"]["window"]
        window = (float(low), float(high))

    stage_dir = _staging_dir(out)
    try:
        real_rows, excluded_real = _export_real(inputs.real, stage_dir, preprocessor)
        synthetic_rows, remarked, moved = _export_synthetic(inputs.synthetic, kept, stage_dir, config, modality, window)
        manifest = _manifest(real_rows + synthetic_rows)
        write_manifest(stage_dir, manifest)
        excluded = pd.DataFrame(excluded_synthetic + excluded_real, columns=list(EXCLUDED_COLUMNS)).fillna("")
        with atomic_path(stage_dir / EXCLUDED_NAME) as tmp:
            excluded.to_csv(tmp, index=False, lineterminator="\n")
        preprocessing = _preprocessing_record(preprocessor, inputs.model)
        atomic_write_json(stage_dir / PREPROCESSING_NAME, preprocessing)
        notes = _notes(inputs, remarked, moved, preprocessor is not None)
        facts = card_module.build_facts(
            real=inputs.real, synthetic=inputs.synthetic, augmented=read_dataset(stage_dir), report=inputs.report,
            model=inputs.model, config=config, excluded=excluded, preprocessing=preprocessing,
            composition=_composition(manifest), gates=gates, privacy_gate=privacy_gate, gates_overridden=overridden,
            links=_links(links or {}, inputs.model, inputs.synthetic, inputs.report), export_run_id=tracker.run_id,
            modality=modality, ingest=ingest_facts(inputs.real), versions=tool_versions(), commit=git_commit(),
            warnings=notes, flagged=len(flagged), out_name=out.name, filter_how=filter_how,
        )
        atomic_write_json(stage_dir / FACTS_NAME, facts)
        atomic_write_text(stage_dir / CARD_NAME, card_module.render_card(facts, config.card.template))
        _swap_into_place(stage_dir, out)
    except BaseException:
        shutil.rmtree(stage_dir, ignore_errors=True)
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
    links: Mapping[str, str], model: Mapping[str, Any] | None, synthetic: Dataset, report: Mapping[str, Any]
) -> dict[str, str]:
    """MLflow run ids of the stages behind the inputs: the orchestrator's, else what the inputs record."""
    found: dict[str, str] = {}
    if model is not None and model.get("mlflow_run_id"):
        found["train"] = str(model["mlflow_run_id"])
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


def _preprocessing_record(preprocessor: Any | None, model: Mapping[str, Any] | None) -> dict[str, Any]:
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
        "model_checkpoint_sha256": model.get("checkpoint_sha256") if model else None,
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
