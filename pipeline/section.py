"""Base class for configuration sections: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Section"]


class Section(BaseModel):
    """A config section. Subclass it in ``pipeline/<stage>/config.py``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
