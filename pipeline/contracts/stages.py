"""The run contract: a run root's layout, ``stages.json``, and what every stage returns.

``medsynth run`` writes everything below one run root (docs/contracts.md, "Run layout"):

```
<root>/raw/        the phantom cohort (demo only; identifiable by design)
<root>/private/    key, source map, quarantine originals (never shared, never logged)
<root>/ingested/   real dataset          <root>/model/      generator + checkpoints
<root>/synthetic/  synthetic dataset     <root>/report/     report.json + report.html
<root>/export/     augmented dataset + data_card.md
<root>/stages.json what each stage last finished with (input digest, MLflow run id)
```

:class:`StageResult` is the one type every stage returns to the workflow and the CLI.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.errors import CheckFailed, InputError
from pipeline.core.files import atomic_write_json

__all__ = [
    "STAGES_JSON",
    "FORMAT_VERSION",
    "ROLES",
    "RunPaths",
    "StageResult",
    "StageRecord",
    "StagesRecord",
    "read_stages",
    "write_stages",
]

STAGES_JSON = "stages.json"
FORMAT_VERSION = 1

# The folders of a run root, by the role a stage reads or writes them in.
ROLES: tuple[str, ...] = ("raw", "private", "ingested", "model", "synthetic", "report", "export")


@dataclass(frozen=True)
class RunPaths:
    """Where each stage of one run root reads and writes."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def private(self) -> Path:
        return self.root / "private"

    @property
    def ingested(self) -> Path:
        return self.root / "ingested"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def roles(self) -> dict[str, Path]:
        """Role -> folder, for a :class:`pipeline.registry.StageContext`."""
        return {role: getattr(self, role) for role in ROLES}

    @property
    def record(self) -> Path:
        """``stages.json``."""
        return self.root / STAGES_JSON


@dataclass(frozen=True)
class StageResult:
    """What one stage did: the lines the CLI prints, its headline metrics, its verdicts and its outputs.

    No PHI: lines name output folders and counts, never a source path or a header value.

    Attributes:
        stage: the stage's registry name.
        lines: the summary the CLI prints.
        metrics: headline figures (also logged to the stage's MLflow run by the stage itself).
        gates: gate name -> ``pass`` | ``fail`` | ``inconclusive`` | ``not_run``, for stages that judge.
        outputs: what it wrote, by kind (``dataset``, ``model``, ``report``, ``card``).
        incomplete: why the outputs fall short of what was planned and were not accepted as they are
            (a model stopped before its step budget): the stage is not finished, the command exits 1.
    """

    stage: str
    lines: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    gates: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    incomplete: str | None = None

    def raise_if_incomplete(self) -> None:
        """Stop the command with exit 1 when the outputs fall short of the plan (after they were written)."""
        if self.incomplete is not None:
            raise CheckFailed(f"{self.stage}: {self.incomplete}")


class StageRecord(BaseModel):
    """One stage's entry in ``stages.json``."""

    model_config = ConfigDict(extra="forbid")

    digest: str = Field(..., description="SHA-256 of the stage's inputs and config section when it started.")
    finished: bool = Field(False, description="Whether it finished; an unfinished train resumes.")
    run_id: str | None = Field(None, description="MLflow run that produced the outputs.")
    seconds: float | None = Field(None, description="Wall-clock time of the stage.")


class StagesRecord(BaseModel):
    """``stages.json``: per stage, the digest it last started with and whether it finished."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    stages: dict[str, StageRecord] = Field(default_factory=dict)


def read_stages(path: str | os.PathLike[str]) -> StagesRecord:
    """Read ``stages.json``; a missing or damaged record reads as empty (it only costs a re-run).

    The first layout (stage name -> entry at the top level, no ``format_version``) is read as well.

    Raises:
        InputError: the record was written by a newer medsynth (its layout is unknown here).
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return StagesRecord()
    if not isinstance(payload, dict):
        return StagesRecord()
    version = payload.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise InputError(
            f"{path}: format_version {version} is newer than this medsynth reads ({FORMAT_VERSION}). "
            "Fix: upgrade medsynth, or use --force to re-run every stage."
        )
    if version is None:
        payload = {"format_version": FORMAT_VERSION, "stages": payload}
    try:
        return StagesRecord.model_validate(payload)
    except ValidationError:
        return StagesRecord()


def write_stages(path: str | os.PathLike[str], record: StagesRecord) -> Path:
    """Write ``stages.json`` atomically."""
    return atomic_write_json(Path(path), record.model_dump(mode="json"))
