"""Facts the data card reports about the inputs: ingest provenance, the model, tool versions, git.

Everything here is read from files the earlier stages wrote (manifests, ``quarantine.csv``,
``audit.jsonl``, the ingest summary, ``model.json`` through its contract) or from the environment;
nothing is typed in. Only counts, reasons and settings are kept: never a source path or a header value.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.contracts.dataset import Dataset
from pipeline.contracts.model import CHECKPOINT, ModelMeta, read_model_meta
from pipeline.planning.record import plan_record

__all__ = [
    "TOOLS",
    "INGEST_SUMMARY_NAMES",
    "ACTION_NAMES",
    "tool_versions",
    "git_commit",
    "ingest_facts",
    "ModelFacts",
    "model_facts",
]

TOOLS: tuple[str, ...] = ("medsynth", "torch", "monai", "pydicom", "nibabel", "mlflow", "numpy")
# Names the ingest stage may give its run summary, most specific first.
INGEST_SUMMARY_NAMES: tuple[str, ...] = ("ingest.json", "ingest_summary.json", "summary.json")
_QUARANTINE = "quarantine.csv"
_AUDIT = "audit.jsonl"


def tool_versions() -> dict[str, str]:
    """Installed versions of medsynth and the libraries that shape its outputs (plus Python)."""
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(start: str | os.PathLike[str] | None = None) -> str:
    """The commit of the medsynth checkout this code runs from.

    Returns ``unknown (not a git checkout)`` for an installed package (even when it sits inside
    some other repository), and appends ``(with uncommitted changes)`` when tracked files differ.
    """
    package_root = Path(start) if start is not None else Path(__file__).resolve().parents[2]
    unknown = "unknown (not a git checkout)"

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(package_root), *args], capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != package_root.resolve():
        return unknown
    commit = git("rev-parse", "HEAD")
    if not commit:
        return unknown
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit} (with uncommitted changes)" if dirty else commit


def _counts(series: pd.Series) -> dict[str, int]:
    values = series.astype(str).str.strip()
    values = values[values != ""]
    return {str(key): int(count) for key, count in sorted(Counter(values).items())}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


# PS3.15 Table E.1-1 action codes as the ingest audit log records them.
ACTION_NAMES: dict[str, str] = {
    "X": "X: removed",
    "Z": "Z: emptied (zero length)",
    "D": "D: replaced by a dummy value",
    "U": "U: UID replaced (keyed mapping)",
    "K": "K: kept",
    "C": "C: cleaned (dates shifted / descriptors cleaned)",
}


def ingest_facts(real: Dataset) -> dict[str, Any]:
    """What ingest did to produce ``real``: counts, quarantine reasons, audit actions, its record.

    Reads ``ingest.json`` (the ingest record: profile, options, counts) when the dataset holds
    one, and derives the rest from the manifest, ``quarantine.csv`` (columns ``ref, reason, ...``)
    and ``audit.jsonl`` (one record per series with the rules applied and their counts).
    """
    manifest = real.manifest
    facts: dict[str, Any] = {
        "images": len(manifest),
        "subjects": int(manifest["subject_id"].nunique()),
        "labels": _counts(manifest["label"]),
        "splits": _counts(manifest["split"]),
        "subjects_per_split": {
            split: int(count) for split, count in manifest.groupby("split")["subject_id"].nunique().sort_index().items()
        },
        "source_formats": _counts(manifest["source_format"]) if "source_format" in manifest else {},
        "modalities": _counts(manifest["modality"]) if "modality" in manifest else {},
        "quarantine_file": (real.root / _QUARANTINE).is_file(),
        "quarantined": 0,
        "quarantine_reasons": {},
        "audit_file": (real.root / _AUDIT).is_file(),
        "audit_records": 0,
        "audit_status": {},
        "audit_actions": {},
        "summary": None,
        "summary_file": None,
    }
    if facts["quarantine_file"]:
        try:
            table = pd.read_csv(real.root / _QUARANTINE, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            table = pd.DataFrame()
        facts["quarantined"] = len(table)
        if "reason" in table.columns:
            facts["quarantine_reasons"] = dict(sorted(_counts(table["reason"]).items(), key=lambda item: (-item[1], item[0])))
    if facts["audit_file"]:
        facts.update(_audit_counts(real.root / _AUDIT))
    for name in INGEST_SUMMARY_NAMES:
        summary = _read_json(real.root / name)
        if summary is not None:
            facts["summary"] = summary
            facts["summary_file"] = name
            break
    return facts


def _audit_counts(path: Path) -> dict[str, Any]:
    """Series records by status, and de-identification actions summed over every rule applied."""
    statuses: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    records = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            records += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if record.get("status"):
                statuses[str(record["status"])] += 1
            rules = record.get("rules")
            if isinstance(rules, list):
                for rule in rules:
                    if isinstance(rule, dict) and rule.get("action"):
                        actions[_action_name(str(rule["action"]))] += _int(rule.get("count", 1))
            elif record.get("action"):
                actions[_action_name(str(record["action"]))] += 1
    return {
        "audit_records": records,
        "audit_status": dict(sorted(statuses.items())),
        "audit_actions": dict(sorted(actions.items())),
    }


def _action_name(code: str) -> str:
    base, _, detail = code.partition(":")
    name = ACTION_NAMES.get(base, base)
    return f"{name} ({detail})" if detail else name


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1


@dataclass(frozen=True)
class ModelFacts:
    """What the export and the data card know about the generator's MODEL_DIR.

    Attributes:
        meta: its ``model.json``.
        checkpoint_sha256: SHA-256 of its ``checkpoint.pt`` (None when the folder holds none).
        config_hash: digest of the resolved ``model:`` section the weights were trained with.
    """

    meta: ModelMeta
    checkpoint_sha256: str | None
    config_hash: str
    plan: dict[str, Any] | None = None


def model_facts(model_dir: str | os.PathLike[str] | None) -> ModelFacts | None:
    """``MODEL_DIR/model.json`` with the checkpoint digest and the config hash (None without a model).

    Raises:
        InputError: the folder has no readable, valid ``model.json``.
    """
    if model_dir is None:
        return None
    from pipeline.core.files import sha256_file
    from pipeline.core.section import config_digest

    meta = read_model_meta(model_dir)
    checkpoint = Path(model_dir) / CHECKPOINT
    return ModelFacts(
        meta=meta,
        checkpoint_sha256=sha256_file(checkpoint) if checkpoint.is_file() else None,
        config_hash=config_digest(meta.config),
        plan=plan_record(model_dir),
    )
