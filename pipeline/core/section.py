"""Configuration sections: the base class (unknown keys are errors), their digest and flat form."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["Section", "flatten", "config_digest"]


class Section(BaseModel):
    """A config section. Subclass it in ``pipeline/<stage>/config.py``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys (lists become JSON strings): MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted))
        elif isinstance(value, (list, tuple)):
            flat[dotted] = json.dumps(value, default=str)
        else:
            flat[dotted] = value
    return flat


def config_digest(section: BaseModel | Mapping[str, Any]) -> str:
    """Stable SHA-256 of a config (section): decides whether a stage must re-run."""
    payload = section.model_dump(mode="json") if isinstance(section, BaseModel) else dict(section)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()
