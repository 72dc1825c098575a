"""The report contract: ``REPORT_DIR/report.json``, written by evaluate and read by export, run and the CLI.

``report.json`` holds four metric sections (``fidelity``, ``diversity``, ``privacy``, ``utility``),
the ``gates`` decided from them, and the provenance of the evaluation (``feature_spaces``, ``inputs``,
``preprocessing``, ``mlflow``, ``config``). Every figure is a number or null with ``<key>_reason``
beside it. :class:`GateName` is the one list of gates; :func:`read_report` is the one place that
parses the file (its errors name the file, the key and the fix); :func:`headline_figures` is the one
definition of the figures a run is summarised by. docs/contracts.md describes every key.

The models declare the keys other stages read and keep every other key as written: the sections
carry many nested figures (per class, per attack, per feature space) that only report.html and the
data card show. :meth:`Report.as_dict` gives the document back with its keys in the order they were
written and without defaults the document did not hold, so evaluate writes what it built, and a
reader sees what the file says.
"""

from __future__ import annotations

import json
import math
import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from pipeline.core.errors import InputError

__all__ = [
    "REPORT_JSON",
    "REPORT_HTML",
    "SCHEMA",
    "FORMAT_VERSION",
    "GateName",
    "GateStatus",
    "GATE_STATUSES",
    "Verdict",
    "Check",
    "Gates",
    "Figures",
    "Fidelity",
    "Diversity",
    "FlaggedEntry",
    "Privacy",
    "UtilityArm",
    "Utility",
    "DatasetInputs",
    "Inputs",
    "MlflowLinks",
    "Report",
    "report_path",
    "read_report",
    "headline_figures",
]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
FORMAT_VERSION = 1
_FAMILY = "medsynth.evaluate"
SCHEMA = f"{_FAMILY}/{FORMAT_VERSION}"


class GateName(StrEnum):
    """The four gates, in the order reports, cards and summaries list them."""

    FIDELITY = "fidelity"
    DIVERSITY = "diversity"
    PRIVACY = "privacy"
    UTILITY = "utility"


# A gate or a check: ``pass`` only when everything it needs ran and passed; ``fail`` on evidence;
# ``inconclusive`` when it ran but could not tell (too few subjects, or a mandatory check missing);
# ``not_run`` when nothing could be measured. Reports written before ``inconclusive`` existed hold
# the other three and read unchanged.
GateStatus = Literal["pass", "fail", "inconclusive", "not_run"]
GATE_STATUSES: tuple[str, ...] = get_args(GateStatus)
Verdict = GateStatus


class _Written(BaseModel):
    """A model that writes back exactly the keys it was given, in the order given.

    Keys the document did not hold are not written back (a declared default is for readers only),
    so ``Model.model_validate(d).as_dict() == d`` for any block that validates.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    _keys: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        block = handler(data)
        if isinstance(data, dict):
            block._keys = tuple(str(key) for key in data)
        return block

    @model_serializer(mode="wrap")
    def _in_written_order(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        return {key: dumped[key] for key in self._keys if key in dumped}

    def as_dict(self) -> dict[str, Any]:
        """The block as plain JSON-ready data, keys in written order (numpy scalars left as they are)."""
        return self.model_dump(by_alias=True)


class Figures(_Written):
    """A block of report.json: declared keys typed, every other key kept, in the order written."""

    def reason(self, key: str) -> str | None:
        """The ``<key>_reason`` written beside a null figure, if any."""
        value = (self.model_extra or {}).get(f"{key}_reason")
        return str(value) if value else None


class Check(_Written):
    """One comparison of a measured value with its threshold, and its verdict.

    ``passed`` is True only for ``pass`` and False only for ``fail`` (None otherwise), so readers that
    only ask "did it fail" keep working. A check read from a report written before ``verdict``
    existed gets its verdict from ``passed`` (None: ``not_run``) and is written back as it was read.
    ``finding`` says what the measurement shows, in the direction it was found; ``power`` what the
    check could have detected at this sample size (privacy checks).
    """

    name: str
    value: float | None
    comparison: Literal[">=", "<="]
    threshold: float | None
    passed: bool | None = None
    meaning: str
    reason: str | None = None
    verdict: Verdict | None = None
    finding: str | None = None
    power: str | None = None

    @model_validator(mode="after")
    def _verdict_and_passed_agree(self) -> Check:
        if self.verdict is None:
            self.__dict__["verdict"] = "pass" if self.passed is True else "fail" if self.passed is False else "not_run"
        elif self.passed is None and self.verdict in ("pass", "fail"):
            self.__dict__["passed"] = self.verdict == "pass"
        return self


class Gates(Figures):
    """``gates``: one status per gate, the thresholds used and every check behind each status."""

    fidelity: GateStatus
    diversity: GateStatus
    privacy: GateStatus
    utility: GateStatus
    thresholds: dict[str, Any] = Field(default_factory=dict)
    checks: dict[str, list[Check]] = Field(default_factory=dict)

    def status(self, gate: GateName) -> GateStatus:
        """The status of one gate."""
        return getattr(self, gate.value)

    def statuses(self) -> dict[str, GateStatus]:
        """Gate name -> status, every gate in :class:`GateName` order."""
        return {gate.value: self.status(gate) for gate in GateName}


class Reference(Figures):
    """``fidelity.reference``: the held-out real images measured as the synthetic ones are."""

    fid: float | None = None
    kid: float | None = None


class Ratios(Figures):
    """``fidelity.ratios``: synthetic figure / real-vs-real reference figure, the gates' input."""

    precision: float | None = None
    density: float | None = None
    recall: float | None = None
    coverage: float | None = None


class Fidelity(Figures):
    """``fidelity``: FID, KID and the k-NN manifold figures of synthetic vs real training images."""

    feature_space: str | None = None
    fid: float | None = None
    kid: float | None = None
    precision: float | None = None
    recall: float | None = None
    density: float | None = None
    coverage: float | None = None
    reference: Reference = Field(default_factory=Reference)
    ratios: Ratios = Field(default_factory=Ratios)


class Diversity(Figures):
    """``diversity``: MS-SSIM of same-class synthetic pairs against real pairs from different subjects."""

    ms_ssim: float | None = None
    ms_ssim_real: float | None = None
    ms_ssim_excess: float | None = None


class FlaggedEntry(Figures):
    """One entry of ``privacy.flagged``: a synthetic image closer to a training image than the baseline allows."""

    sample_id: str
    distance: float | None = None
    nearest_train_sample_id: str | None = None
    threshold: float | None = None


class Privacy(Figures):
    """``privacy``: memorization, distances to the closest record, membership inference, the DP record."""

    gate: GateStatus | None = None
    memorization_space: str = "pixel"
    memorization_rate: float | None = None
    memorization_threshold: float | None = None
    dcr_synthetic_to_train: float | None = None
    dcr_holdout_to_train: float | None = None
    mia_auc: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    n_synthetic: int | None = None
    flagged: list[FlaggedEntry] = Field(default_factory=list)
    per_sample: list[dict[str, Any]] | None = None


class UtilityArm(Figures):
    """``utility.real_only`` / ``utility.real_plus_synthetic``: one classifier arm on the real test split."""

    balanced_accuracy: float | None = None


class Utility(Figures):
    """``utility``: synthetic label accuracy and the real-only vs real+synthetic comparison."""

    synthetic_label_accuracy: float | None = None
    augmentation_gain: float | None = None
    augmentation_gain_ci_low: float | None = None
    augmentation_gain_ci_high: float | None = None
    augmentation_verdict: str | None = None
    real_only: UtilityArm = Field(default_factory=UtilityArm)
    real_plus_synthetic: UtilityArm = Field(default_factory=UtilityArm)


class DatasetInputs(Figures):
    """``inputs.real`` / ``inputs.synthetic``: the dataset evaluated, by digest and image count."""

    name: str | None = None
    digest: str | None = None
    images: int | None = None


class Inputs(Figures):
    """``inputs``: what was evaluated."""

    real: DatasetInputs | None = None
    synthetic: DatasetInputs | None = None


class MlflowLinks(Figures):
    """``mlflow``: the evaluate run and the run that trained the model."""

    run_id: str | None = None
    experiment_id: str | None = None
    model_run_id: str | None = None


class Report(Figures):
    """``report.json``: the sections, the gates and the provenance of one evaluation."""

    schema_id: str | None = Field(None, alias="schema")
    created_utc: str | None = None
    fidelity: Fidelity
    diversity: Diversity
    privacy: Privacy
    utility: Utility
    gates: Gates
    feature_spaces: dict[str, str] | None = None
    inputs: Inputs | None = None
    preprocessing: dict[str, Any] | None = None
    mlflow: MlflowLinks | None = None
    config: dict[str, Any] | None = None

    def section(self, gate: GateName) -> Figures:
        """The metric section a gate is decided from."""
        return getattr(self, gate.value)


_SECTIONS: tuple[str, ...] = (*(gate.value for gate in GateName), "gates")


def report_path(report: str | os.PathLike[str]) -> Path:
    """``REPORT_DIR/report.json`` (a path to the JSON file itself is accepted too)."""
    report = Path(report)
    return report if report.suffix == ".json" else report / REPORT_JSON


def read_report(report: str | os.PathLike[str]) -> Report:
    """Parse and check ``report.json`` (its folder, or the file itself).

    Raises:
        InputError: the file is missing, not JSON, of another format or version, or a section, gate,
            flagged entry or typed key is malformed (the message names the file and the key).
    """
    path = report_path(report)
    if not path.is_file():
        raise InputError(
            f"{path}: report not found. "
            f"Fix: run `medsynth evaluate --real ... --synthetic ... --out {path.parent}` first."
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({type(exc).__name__}). Fix: re-run `medsynth evaluate`.") from exc
    if not isinstance(payload, dict):
        raise InputError(f"{path}: the top level must be an object with keys {', '.join(_SECTIONS)}.")
    _check_schema(payload, path)
    _check_document(payload, path)
    try:
        return Report.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise InputError(f"{path}: key '{key}': {first['msg']}. Fix: re-run `medsynth evaluate`.") from None


def _check_schema(payload: dict[str, Any], path: Path) -> None:
    """Refuse a file of another tool or another report version (a file without ``schema`` is read as is)."""
    schema = payload.get("schema")
    if schema is None:
        return
    family, _, version = str(schema).partition("/")
    if family != _FAMILY or not version.isdigit():
        raise InputError(
            f"{path}: key 'schema' is {schema!r}, not a medsynth evaluation report ({SCHEMA}). "
            "Fix: pass the folder written by `medsynth evaluate`."
        )
    if int(version) != FORMAT_VERSION:
        raise InputError(
            f"{path}: key 'schema' is {schema!r}; this medsynth reads {SCHEMA}. "
            "Fix: re-run `medsynth evaluate` with this version (or use the medsynth version that wrote it)."
        )


def _check_document(payload: dict[str, Any], path: Path) -> None:
    """The checks whose messages readers rely on: sections, gate values, the privacy gate, flagged ids."""
    for section in _SECTIONS:
        if not isinstance(payload.get(section), dict):
            raise InputError(
                f"{path}: key '{section}' is missing or not an object. Fix: re-run `medsynth evaluate` "
                "(this report was not written by it, or by an older version)."
            )
    gates = payload["gates"]
    for gate in GateName:
        value = gates.get(gate.value)
        if value not in GATE_STATUSES:
            raise InputError(
                f"{path}: key 'gates.{gate.value}' is {value!r}, not one of {', '.join(GATE_STATUSES)}. "
                "Fix: re-run `medsynth evaluate`."
            )
    privacy_gate = payload["privacy"].get("gate", gates["privacy"])
    if privacy_gate != gates["privacy"]:
        raise InputError(
            f"{path}: 'privacy.gate' ({privacy_gate!r}) disagrees with 'gates.privacy' ({gates['privacy']!r}). "
            "Fix: re-run `medsynth evaluate`; do not edit the report by hand."
        )
    flagged = payload["privacy"].get("flagged", [])
    if not isinstance(flagged, list):
        raise InputError(f"{path}: key 'privacy.flagged' must be a list of objects with a 'sample_id'.")
    for index, entry in enumerate(flagged):
        if not isinstance(entry, dict) or not str(entry.get("sample_id", "")).strip():
            raise InputError(
                f"{path}: key 'privacy.flagged[{index}]' has no 'sample_id'. Fix: re-run `medsynth evaluate`."
            )


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, (bool, str)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def headline_figures(report: Report) -> dict[str, float | None]:
    """The figures a run is summarised by, flat and named as MLflow metrics (``metrics.mia_auc < 0.6``).

    Each gate adds ``gate_<name>_pass``: 1.0 pass, 0.0 fail or inconclusive (never a pass), None not
    run. None means not measured; a tracker leaves such a metric out.
    """
    fidelity, diversity, privacy, utility = report.fidelity, report.diversity, report.privacy, report.utility
    figures: dict[str, Any] = {
        "fid": fidelity.fid,
        "kid": fidelity.kid,
        "precision": fidelity.precision,
        "recall": fidelity.recall,
        "density": fidelity.density,
        "coverage": fidelity.coverage,
        "precision_ratio": fidelity.ratios.precision,
        "density_ratio": fidelity.ratios.density,
        "recall_ratio": fidelity.ratios.recall,
        "coverage_ratio": fidelity.ratios.coverage,
        "reference_fid": fidelity.reference.fid,
        "reference_kid": fidelity.reference.kid,
        "ms_ssim": diversity.ms_ssim,
        "ms_ssim_real": diversity.ms_ssim_real,
        "memorization_rate": privacy.memorization_rate,
        "memorization_null_rate": (privacy.model_extra or {}).get("memorization_null_rate"),
        "memorization_excess": (privacy.model_extra or {}).get("memorization_excess"),
        "dcr_synthetic_to_train": privacy.dcr_synthetic_to_train,
        "dcr_holdout_to_train": privacy.dcr_holdout_to_train,
        "mia_auc": privacy.mia_auc,
        "mia_tpr_at_1pct_fpr": (privacy.model_extra or {}).get("mia_tpr_at_1pct_fpr"),
        "mia_tpr_at_10pct_fpr": (privacy.model_extra or {}).get("mia_tpr_at_10pct_fpr"),
        "epsilon": privacy.epsilon,
        "delta": privacy.delta,
        "synthetic_label_accuracy": utility.synthetic_label_accuracy,
        "augmentation_gain": utility.augmentation_gain,
        "real_only_balanced_accuracy": utility.real_only.balanced_accuracy,
        "real_plus_synthetic_balanced_accuracy": utility.real_plus_synthetic.balanced_accuracy,
    }
    for gate in GateName:
        status = report.gates.status(gate)
        figures[f"gate_{gate.value}_pass"] = None if status == "not_run" else float(status == "pass")
    return {key: _finite(value) for key, value in figures.items()}
