"""The export's privacy decisions: refuse on a failed gate, and which synthetic images to leave out.

The report's privacy gate decides whether the export runs at all (:func:`refusal` builds the
message). Its ``privacy.flagged`` list decides which synthetic images are left out; when the
export must hold images to a distance threshold the report did not apply to them (``export.min_distance``,
or images the report did not audit), :func:`measured_distances` measures every image's distance
to its nearest training image exactly as the evaluate stage does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.contracts.dataset import Dataset
from pipeline.core.errors import CheckFailed, InputError
from pipeline.export.report import Flagged, base_sample_id, flagged_samples
from pipeline.export.config import ExportConfig

__all__ = [
    "privacy_findings",
    "refusal",
    "excluded_synthetic",
    "report_distances",
    "measured_distances",
    "privacy_filter",
]


def privacy_findings(report: Mapping[str, Any]) -> tuple[list[str], list[str]]:
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


def refusal(report: Mapping[str, Any], path: Path, status: str) -> CheckFailed:
    failed, reasons = privacy_findings(report)
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


def excluded_synthetic(
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


def report_distances(report: Mapping[str, Any], where: Path | str = "report.json") -> dict[str, tuple[float, str]] | None:
    """Per-sample nearest-training distances recorded in the report (``privacy.per_sample``), if any.

    Raises:
        InputError: a recorded distance is not a number.
    """
    entries = report["privacy"].get("per_sample")
    if not isinstance(entries, list) or not entries:
        return None
    distances: dict[str, tuple[float, str]] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("distance") is None:
            continue
        sample_id = base_sample_id(str(entry.get("sample_id", "")))
        try:
            distance = float(entry["distance"])
            if math.isnan(distance):  # NaN compares False with every threshold: the image would pass unchecked
                raise ValueError("NaN")
        except (TypeError, ValueError):
            raise InputError(
                f"{where}: key 'privacy.per_sample[{index}].distance' is not a number. Fix: re-run `medsynth evaluate`."
            ) from None
        if sample_id not in distances or distance < distances[sample_id][0]:
            distances[sample_id] = (distance, str(entry.get("nearest_train_sample_id") or ""))
    return distances


def measured_distances(
    real: Dataset, synthetic: Dataset, model_dir: Path | None, report: Mapping[str, Any], where: Path
) -> dict[str, tuple[float, str]]:
    """Nearest-training-image distance of every synthetic image, measured as the report measures it.

    Uses the evaluate stage's own image loading and distance (RMS difference of preprocessed images
    in pixel space, the report's ``privacy.memorization_space``), so the numbers compare with the
    report's memorization threshold.
    """
    from pipeline.core.seeds import stream_seed
    from pipeline.imaging.images import load_image_sets
    from pipeline.imaging.neighbours import as_vectors, closest_records

    space = report["privacy"].get("memorization_space", "pixel")
    if space != "pixel":
        raise InputError(
            f"{where}: 'privacy.memorization_space' is {space!r}; export can re-measure distances only in the pixel "
            "space. Fix: remove export.min_distance, or re-run `medsynth evaluate` with this version."
        )
    # The evaluate stage's "subsample" seed stream (pipeline.evaluate.seeds.purpose_seed), so the
    # default preprocessing samples the same voxels for its intensity mapping as the report did.
    seed = stream_seed(int((report.get("config") or {}).get("seed", 0)), "subsample", 0)
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


def privacy_filter(
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
        return flagged, excluded_synthetic(synthetic, flagged, None, [], where), "report flags"
    distances = report_distances(report, where)
    how = "report flags + per-sample distances recorded in the report"
    if distances is None:
        distances = measured_distances(real, synthetic, model_dir, report, where)
        how = "report flags + nearest-training distances measured by export (the report's pixel space)"
    return flagged, excluded_synthetic(synthetic, flagged, distances, limits, where), how
