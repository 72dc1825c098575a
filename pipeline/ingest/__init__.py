"""The ingest stage: read DICOM/NIfTI, anonymize (PS3.15 Table E.1-1), quarantine, split, audit for leaks.

Modules:
    config      ``IngestConfig`` (the ``ingest:`` section) and its parts.
    discover    walk the sources, classify each file, group DICOM files into series, assign labels.
    dicomio     fast DICOM paths for the common case, each with a pydicom fallback.
    profile     the Table E.1-1 profile and its options, resolved for one run.
    deid        apply the profile to a pydicom dataset, recursing into every sequence.
    keys        the pseudonymization key and everything derived from it with a keyed HMAC.
    volume      a DICOM series as one volume in modality units with a NIfTI (RAS) affine.
    task        the per-series work a pool worker runs.
    pool        a process pool that reports each result as it comes and survives a dead worker.
    split       train/val/test by subject, stratified by label.
    labels      label folders that look like patients; the rows of a labels template.
    audit       :func:`audit`: search a folder for source identifiers and check its structure.
    stage       :func:`run`: sources -> anonymized real dataset, quarantine, audit log.

The public names below load on first use (PEP 562): ``pipeline.config`` imports
``pipeline.ingest.config``, which runs this file, and must not pull in pydicom or pandas.
"""

from __future__ import annotations

from pipeline.core.lazy import lazy_exports

__all__ = [
    "run",
    "audit",
    "write_labels_template",
    "IngestSummary",
    "LabelsTemplate",
    "AuditReport",
    "Finding",
    "IngestConfig",
    "default_private",
]

# Public name -> the module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "run": "pipeline.ingest.stage",
    "IngestSummary": "pipeline.ingest.stage",
    "write_labels_template": "pipeline.ingest.stage",
    "LabelsTemplate": "pipeline.ingest.stage",
    "default_private": "pipeline.ingest.stage",
    "audit": "pipeline.ingest.audit",
    "AuditReport": "pipeline.ingest.audit",
    "Finding": "pipeline.ingest.audit",
    "IngestConfig": "pipeline.ingest.config",
}

lazy_exports(__name__, _LAZY)
