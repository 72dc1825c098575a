"""Configuration of the export stage (``export:`` in the YAML config).

``docs/export.md`` explains every key; ``data_cards/README.md`` explains the data card's fields.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from pipeline.core.section import Section

__all__ = ["CardConfig", "ExportConfig", "ANNOTATION_CREATORS"]

# Hugging Face dataset-card vocabulary for `annotations_creators`.
ANNOTATION_CREATORS: tuple[str, ...] = (
    "expert-generated",
    "found",
    "crowdsourced",
    "machine-generated",
    "no-annotation",
    "other",
)
# PS3.5 §9.1: components are digits without leading zeros (a lone 0 is allowed), joined by dots.
_UID_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# generate_uid's prefix limit (54) minus the dot, leaving room for a 10-digit suffix at least.
_UID_ROOT_MAX = 53


class CardConfig(Section):
    """Facts about the dataset that only its owner knows; the data card prints them."""

    pretty_name: str | None = Field(
        None, description="Title of the data card; default: 'medsynth augmented <modality> dataset (<labels>)'."
    )
    license: str = Field(
        "other",
        description="License identifier for the card's front matter (e.g. cc-by-nc-4.0); 'other' until the "
        "data owner decides. The real images stay under their source's data-use agreement.",
    )
    source_datasets: list[str] = Field(
        default_factory=list,
        description="Names of the real source collections (never paths). Empty: the card says 'original'.",
    )
    real_annotations: Literal[
        "expert-generated", "found", "crowdsourced", "machine-generated", "no-annotation", "other"
    ] = Field("found", description="How the real images' labels were made (Hugging Face annotations_creators).")
    contact: str | None = Field(None, description="Who maintains the dataset (a team or role, not a patient).")
    template: Path | None = Field(
        None,
        description="Jinja2 template rendered instead of the packaged data_card.md.j2 (start from "
        "`medsynth card-template > my_card.md.j2`; data_cards/README.md lists the fields).",
    )

    @field_validator("template")
    @classmethod
    def _template_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"file {value} not found; write one with `medsynth card-template > {value}` and edit it")
        return value


class ExportConfig(Section):
    """How the augmented dataset is assembled, marked and documented."""

    dicom: bool = Field(False, description="Also write every exported synthetic image as a DICOM series under dicom/.")
    uid_root: str = Field(
        "2.25",
        description="UID root of the synthetic DICOM UIDs. 2.25: UUID-derived UIDs (no registration needed); "
        "or your organisation's registered root.",
    )
    allow_failed_gates: bool = Field(
        False,
        description="Export even when the report's privacy gate failed or did not run; the data card then "
        "says so in its first lines. Same as --allow-failed-gates.",
    )
    accept_inconclusive: bool = Field(
        False,
        description="Export even when the report's privacy gate is inconclusive (too few held-out subjects to "
        "certify privacy; never a pass); the data card then says so in its first lines. Same as "
        "--accept-inconclusive. A failed or not-run gate still needs allow_failed_gates.",
    )
    min_distance: float | None = Field(
        None,
        ge=0.0,
        description="Also exclude synthetic images whose distance to the nearest training image (the report's "
        "feature space) is below this value; null: exclude exactly the images the report flagged.",
    )
    real_grid: Literal["model", "native"] = Field(
        "model",
        description="Grid of the real images. model: the model's preprocessing puts them on the synthetic images' "
        "grid (needs --model; without it export refuses real images on another grid). native: copied unchanged "
        "on their own grid, knowingly beside synthetic images on the model grid.",
    )
    card: CardConfig = Field(default_factory=CardConfig)

    @field_validator("uid_root")
    @classmethod
    def _uid_root_is_valid(cls, value: str) -> str:
        value = value.strip().rstrip(".")
        if not _UID_ROOT.match(value):
            raise ValueError("must be dotted digits without leading zeros, e.g. 2.25 or 1.2.826.0.1.3680043.10.999")
        if len(value) > _UID_ROOT_MAX:
            raise ValueError(f"must be at most {_UID_ROOT_MAX} characters so the UIDs stay within 64")
        return value
