"""The export stage: augmented dataset, per-sample privacy filter, synthetic marking, data card.

Modules:
    config      ``ExportConfig`` (the ``export:`` section) and ``CardConfig`` (``export.card:``).
    report      reading the evaluate stage's ``report.json``: gates, flagged samples, figures.
    privacy     refuse on a failed gate; which synthetic images to leave out.
    images      the augmented dataset's images: real ones on the model grid, synthetic ones marked.
    dicom       synthetic images as DICOM series, marked SYNTHETIC.
    facts       what the data card reports about the inputs: provenance, model, tool versions.
    card        the data card, rendered from the packaged template (``templates/data_card.md.j2``).
    stage       :func:`run`: real + kept synthetic images as one documented dataset.

``docs/export.md`` describes the outputs and ``data_cards/README.md`` the data card's fields.
The public names below load on first use (PEP 562): ``pipeline.config`` imports
``pipeline.export.config``, which runs this file, and must not pull in pandas, nibabel or torch.
"""

from __future__ import annotations

from pipeline.core.lazy import lazy_exports

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

# Public name -> the module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "run": "pipeline.export.stage",
    "ExportSummary": "pipeline.export.stage",
    "CARD_NAME": "pipeline.export.stage",
    "EXCLUDED_NAME": "pipeline.export.stage",
    "EXCLUDED_COLUMNS": "pipeline.export.stage",
    "FACTS_NAME": "pipeline.export.stage",
    "PREPROCESSING_NAME": "pipeline.export.stage",
    "ExportConfig": "pipeline.export.config",
    "CardConfig": "pipeline.export.config",
}

lazy_exports(__name__, _LAZY)
