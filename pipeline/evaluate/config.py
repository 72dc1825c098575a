"""Configuration of the evaluate stage (``evaluate:``): feature spaces, metrics, gate thresholds."""

from __future__ import annotations

from pydantic import Field

from pipeline.section import Section

__all__ = ["EvaluateConfig"]


class EvaluateConfig(Section):
    """Evaluation settings."""

    seed: int = Field(0, ge=0)
