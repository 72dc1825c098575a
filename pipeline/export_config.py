"""Configuration of the export stage (``export:``)."""

from __future__ import annotations

from pydantic import Field

from pipeline.section import Section

__all__ = ["ExportConfig"]


class ExportConfig(Section):
    """How the augmented dataset is assembled and marked."""

    dicom: bool = Field(False, description="Also write synthetic images as DICOM series.")
    uid_root: str = Field("2.25", description="UID root for synthetic DICOM UIDs (2.25 = UUID-derived).")
    allow_failed_gates: bool = Field(False, description="Export even when the report's privacy gate failed.")
