"""Configuration of the ingest stage (``ingest:`` in the YAML config)."""

from __future__ import annotations

from pydantic import Field, model_validator

from pipeline.section import Section

__all__ = ["SplitConfig", "IngestConfig"]


class SplitConfig(Section):
    """Fractions of subjects per split (stratified by label), and the split's seed."""

    train: float = Field(0.6, ge=0.0, le=1.0)
    val: float = Field(0.2, ge=0.0, le=1.0)
    test: float = Field(0.2, ge=0.0, le=1.0)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1 (got {total:g})")
        return self


class IngestConfig(Section):
    """How sources are read, anonymized and split."""

    workers: int | None = Field(None, ge=1, description="Process-pool size; default: all cores.")
    split: SplitConfig = Field(default_factory=SplitConfig)
