"""Conditional GAN: preprocessing, networks, training and generation (``medsynth train`` / ``generate``).

The heavy modules (torch, MONAI) load on first use, so ``import pipeline.models.config`` stays fast:

- :func:`load_generator`, :func:`load_discriminator`, :func:`sample`: see ``model_dir``.
- :class:`Preprocessor`: see ``preprocess``.
- ``pipeline.models.train.run`` and ``pipeline.models.generate.run``: the stages.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_generator", "load_discriminator", "sample", "Preprocessor", "read_model_json"]

_LAZY = {
    "load_generator": "pipeline.models.model_dir",
    "load_discriminator": "pipeline.models.model_dir",
    "sample": "pipeline.models.model_dir",
    "read_model_json": "pipeline.models.model_dir",
    "Preprocessor": "pipeline.imaging.preprocess",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline.models' has no attribute {name!r}")
