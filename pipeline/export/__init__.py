"""The export stage: augmented dataset, per-sample privacy filter, synthetic marking, data card.

``run`` is the stage (see :mod:`pipeline.export.stage`); :mod:`pipeline.export.dicom` writes the
synthetic DICOM series and :mod:`pipeline.export.card` the data card. ``docs/export.md``
describes the outputs.
"""

from __future__ import annotations

from pipeline.export.stage import (
    CARD_NAME,
    EXCLUDED_COLUMNS,
    EXCLUDED_NAME,
    FACTS_NAME,
    PREPROCESSING_NAME,
    ExportSummary,
    run,
)
from pipeline.export.config import CardConfig, ExportConfig

__all__ = [
    "run",
    "ExportSummary",
    "ExportConfig",
    "CardConfig",
    "CARD_NAME",
    "EXCLUDED_NAME",
    "EXCLUDED_COLUMNS",
    "FACTS_NAME",
    "PREPROCESSING_NAME",
]
