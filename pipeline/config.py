"""Typed configuration: one YAML file, validated at load, merged with explicit CLI flags.

Each stage owns its section model (``pipeline/<stage>/config.py``); this module composes them
into :class:`MedsynthConfig` and turns validation problems into one message that names the key
path and the allowed values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.core.errors import InputError
from pipeline.evaluate.config import EvaluateConfig
from pipeline.export.config import ExportConfig
from pipeline.ingest.config import IngestConfig
from pipeline.models.config import GenerateConfig, ModelConfig
from pipeline.core.section import Section, config_digest, flatten

__all__ = [
    "check_start_model",
    "Section",
    "MedsynthConfig",
    "load_config",
    "default_config",
    "apply_overrides",
    "flatten",
    "config_digest",
    "check_input_paths",
    "describe_validation_error",
]


class MedsynthConfig(BaseModel):
    """The whole pipeline's configuration (``configs/*.yaml``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field("medsynth", description="Project name: run root `runs/<name>` and MLflow experiment.")
    run_root: Path | None = Field(None, description="Where `medsynth run` writes; default runs/<name>.")
    experiment: str | None = Field(None, description="MLflow experiment name; default: the name.")
    seed: int = Field(0, ge=0, description="Global seed; stages derive theirs from it unless set.")
    sources: list[Path] = Field(default_factory=list, description="Source folders for `medsynth run`.")
    labels: Path | None = Field(None, description="labels CSV (key,label) for ingest.")
    demo_subjects: int = Field(
        80, ge=4, le=10_000, description="`medsynth demo`: phantom subjects it writes into <run root>/raw (--subjects overrides)."
    )
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        if not value or any(char in value for char in '/\\:*?"<>|') or value.startswith("."):
            raise ValueError("must be a plain folder name (letters, digits, '-', '_')")
        return value

    @property
    def resolved_run_root(self) -> Path:
        """The run root: ``run_root`` or ``runs/<name>``."""
        return self.run_root if self.run_root is not None else Path("runs") / self.name

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment: ``experiment``, else the run's name (the demo's runs are under ``demo``)."""
        return self.experiment or self.name


def default_config() -> MedsynthConfig:
    """The configuration used when no ``-c FILE`` is given."""
    return MedsynthConfig()


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> MedsynthConfig:
    """Load a YAML config, apply dotted-key ``overrides`` (explicit CLI flags), and validate.

    Args:
        path: YAML file, or None for the defaults.
        overrides: ``{"generate.per_class": 10, ...}``; None values are ignored (flag not given).

    Raises:
        InputError: missing/unreadable file, YAML syntax error, unknown key, wrong type or value.
    """
    where = str(path) if path is not None else "config"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    raw = apply_overrides(raw, overrides or {})
    try:
        config = MedsynthConfig.model_validate(raw)
    except ValidationError as exc:
        raise InputError(f"{where}: {describe_validation_error(exc, MedsynthConfig)}") from None
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path}: config file not found. Fix: pass an existing YAML file with -c (see configs/).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded). Fix: save the config as UTF-8."
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__}). Fix: check the file.") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        tag = _unsupported_tag(str(exc.problem or ""))
        raise InputError(
            f"{path}{line}: unsupported YAML tag {tag} (tags that build Python objects are never loaded). "
            "Fix: remove the tag and write the plain value."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{line}: not valid YAML. Fix: correct the syntax there.") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: the top level must be a mapping of keys (name:, model:, ...).")
    return loaded


def _unsupported_tag(problem: str) -> str:
    """The tag PyYAML's safe loader refused (``!!python/object:os.system``), from its problem text."""
    start = problem.find("'")
    tag = problem[start + 1 : problem.rfind("'")] if start >= 0 and problem.rfind("'") > start else ""
    tag = tag.replace("tag:yaml.org,2002:", "!!")
    return f"'{tag}'" if tag else "(unknown)"


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted-key overrides set (None values skipped)."""
    merged = json.loads(json.dumps(raw, default=str))
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = merged
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[leaf] = str(value) if isinstance(value, Path) else value
    return merged


def describe_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """One readable message for a pydantic error: key path, problem, allowed keys or values."""
    errors = exc.errors()
    first = errors[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        message = f"unknown key '{key}'. Allowed keys here: {', '.join(allowed)}."
    elif first["type"] == "missing":
        message = f"missing required key '{key}'."
    else:
        message = f"key '{key}': {first['msg']} (got {first.get('input')!r})."
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more problem(s) after this one.)"
    return message + " Fix: edit the key, or see configs/demo.yaml for every key with its default."


def _allowed_keys(model: type[BaseModel], parents: list[str]) -> list[str]:
    current: Any = model
    for part in parents:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def check_input_paths(config: MedsynthConfig, where: str = "config") -> None:
    """Require the config's input files and folders to exist (called by `medsynth run` before any stage).

    Not part of :func:`load_config`: ``medsynth demo`` loads its config before it writes the cohort.
    """
    for index, source in enumerate(config.sources):
        if not Path(source).is_dir():
            # The key names the entry; the path itself is not echoed (source paths can name patients).
            raise InputError(
                f"{where}: key 'sources[{index}]': folder not found or not a folder. "
                "Fix: correct the path or remove the entry."
            )
    if config.labels is not None and not Path(config.labels).is_file():
        raise InputError(f"{where}: key 'labels': file {config.labels} not found. Fix: correct the path or remove the key.")
    check_start_model(config, where)


def check_start_model(config: MedsynthConfig, where: str = "config") -> None:
    """Require ``model.init_from``, when set, to name a trained model (its model.json), before anything runs."""
    source = config.model.init_from
    # "model.json" spelled here: pipeline.contracts.model would load pydicom and nibabel into every config load.
    if source is not None and not (Path(source) / "model.json").is_file():
        raise InputError(
            f"{where}: key 'model.init_from': {Path(source) / 'model.json'} not found. Fix: train that model first "
            "(for configs/dp.yaml: `medsynth demo -c configs/dp_public.yaml`), or set model.init_from: null."
        )
