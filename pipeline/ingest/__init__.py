"""Ingest: read DICOM/NIfTI, anonymize (PS3.15 Table E.1-1), quarantine, split, audit for leaks.

Library API (the CLI and ``medsynth run`` call these):

* :func:`run` - sources → real dataset (``pipeline.ingest.stage``);
* :func:`audit` - search a folder for source identifiers and check its structure
  (``pipeline.ingest.audit``).
"""

from __future__ import annotations

from pipeline.ingest.audit import AuditReport, Finding, audit
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.stage import IngestSummary, default_private, run

__all__ = ["run", "audit", "IngestSummary", "AuditReport", "Finding", "IngestConfig", "default_private"]
