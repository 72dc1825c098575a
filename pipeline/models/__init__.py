"""The train and generate stages: a conditional GAN on the model grid (``medsynth train`` / ``generate``).

Modules:
    config       ``ModelConfig`` (the ``model:`` section) and ``GenerateConfig`` (``generate:``).
    augment      differentiable augmentation for small data (DiffAugment).
    step         one training step, and the order in which it draws the training images.
    distributed  training under ``torchrun``: the process group and the per-step reduction.
    checkpoint   ``checkpoint.pt``: saving, checking that a resume continues the same run.
    grid         per-class sample grids (PNG).
    train        ``train.run``: the train stage.
    generate     ``generate.run``: the generate stage.

The networks and their loading from a MODEL_DIR live in :mod:`pipeline.imaging` (``gan``,
``model_dir``), because evaluate (white-box attack) and export use a trained model too.

The public names below load on first use (PEP 562): ``pipeline.config`` imports
``pipeline.models.config``, which runs this file, and must not pull in torch or MONAI.
"""

from __future__ import annotations

from pipeline.core.lazy import lazy_exports

__all__ = [
    "ModelConfig",
    "GenerateConfig",
    "load_generator",
    "load_discriminator",
    "sample",
    "Preprocessor",
]

# Public name -> the module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "ModelConfig": "pipeline.models.config",
    "GenerateConfig": "pipeline.models.config",
    "load_generator": "pipeline.imaging.model_dir",
    "load_discriminator": "pipeline.imaging.model_dir",
    "sample": "pipeline.imaging.model_dir",
    "Preprocessor": "pipeline.imaging.preprocess",
}

lazy_exports(__name__, _LAZY)
