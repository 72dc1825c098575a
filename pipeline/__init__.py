"""medsynth: anonymize, synthesize, audit and export medical imaging datasets.

Stages are modules with a plain ``run(...)`` function each (``pipeline.ingest.run``,
``pipeline.models.train.run`` ...); the ``medsynth`` CLI wraps them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
