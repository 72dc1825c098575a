"""Reading the evaluate stage's ``report.json`` for export: gates, flagged samples, figures.

The file is parsed and checked by :func:`pipeline.contracts.report.read_report` (the report
contract); export works on the checked document as written. ``privacy.flagged`` lists the synthetic
images closer to a training image than the held-out baseline allows, each as
``{sample_id, distance, nearest_train_sample_id, threshold}``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.contracts.report import GateName, GateStatus, read_report, report_path

__all__ = [
    "GATES",
    "Flagged",
    "load_report",
    "report_path",
    "gate_status",
    "flagged_samples",
    "base_sample_id",
    "figure_rows",
    "reason_for",
]

# The gates in card order, from the contract's one list.
GATES: tuple[GateName, ...] = tuple(GateName)


@dataclass(frozen=True)
class Flagged:
    """One synthetic image the report flagged as memorized."""

    sample_id: str
    distance: float | None
    threshold: float | None
    nearest_train_sample_id: str


def load_report(report: str | os.PathLike[str]) -> dict[str, Any]:
    """``report.json`` checked against the report contract, as the plain document it holds.

    Raises:
        InputError: see :func:`pipeline.contracts.report.read_report`.
    """
    return read_report(report).as_dict()


def gate_status(report: Mapping[str, Any], gate: GateName) -> GateStatus:
    """``pass``, ``fail``, ``inconclusive`` or ``not_run`` for one gate."""
    return report["gates"][gate.value]


def base_sample_id(sample_id: str) -> str:
    """The manifest sample id behind a per-slice id (``<sample_id>#z<k>`` -> ``<sample_id>``)."""
    head, sep, tail = sample_id.rpartition("#z")
    return head if sep and tail.isdigit() else sample_id


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def flagged_samples(report: Mapping[str, Any]) -> list[Flagged]:
    """The flagged synthetic images, one per synthetic sample (its closest slice when several were flagged)."""
    by_sample: dict[str, Flagged] = {}
    for entry in report["privacy"].get("flagged", []):
        sample_id = base_sample_id(str(entry["sample_id"]))
        item = Flagged(
            sample_id=sample_id,
            distance=_number(entry.get("distance")),
            threshold=_number(entry.get("threshold")),
            nearest_train_sample_id=str(entry.get("nearest_train_sample_id") or ""),
        )
        previous = by_sample.get(sample_id)
        if previous is None or (item.distance is not None and (previous.distance is None or item.distance < previous.distance)):
            by_sample[sample_id] = item
    return [by_sample[key] for key in sorted(by_sample)]


def reason_for(section: Mapping[str, Any], key: str) -> str:
    """The reason given beside a null figure (``<key>_reason``, ``reasons.<key>``, ``notes.<key>``)."""
    for candidate in (section.get(f"{key}_reason"), _get(section.get("reasons"), key), _get(section.get("notes"), key),
                      _get(section.get("reason"), key) if isinstance(section.get("reason"), dict) else None):
        if candidate:
            return str(candidate)
    if isinstance(section.get("reason"), str) and section.get("reason"):
        return str(section["reason"])
    return "no reason given in the report"


def _get(mapping: Any, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, dict) else None


_SKIP_KEYS = {"flagged", "gate", "reasons", "notes", "reason", "feature_space", "per_class", "thresholds"}


def figure_rows(section: Mapping[str, Any], keys: list[str] | None = None, prefix: str = "") -> list[dict[str, Any]]:
    """Rows ``{name, value, reason}`` for a report section.

    With ``keys``: exactly those keys, in order (a missing key is a null with its reason).
    Without: every scalar in the section, nested objects flattened with dotted names, skipping
    bookkeeping keys (flagged lists, gates, reasons, feature-space descriptions, per-class tables)
    and ``*_reason`` entries.
    """
    rows: list[dict[str, Any]] = []
    if keys is not None:
        for key in keys:
            value = section.get(key)
            rows.append(_row(prefix + key, value, section, key))
        return rows
    for key, value in section.items():
        if key in _SKIP_KEYS or key.endswith("_reason"):
            continue
        if isinstance(value, dict):
            rows.extend(figure_rows(value, None, prefix=f"{prefix}{key}."))
        elif isinstance(value, list):
            continue
        else:
            rows.append(_row(prefix + key, value, section, key))
    return rows


def _row(name: str, value: Any, section: Mapping[str, Any], key: str) -> dict[str, Any]:
    if isinstance(value, (bool, str, int)):
        return {"name": name, "value": value, "reason": ""}
    number = _number(value)
    return {"name": name, "value": number, "reason": "" if number is not None else reason_for(section, key)}
