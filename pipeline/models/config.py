"""Configuration of the train and generate stages (``model:`` and ``generate:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.section import Section

__all__ = ["ModelConfig", "GenerateConfig"]


class ModelConfig(Section):
    """Preprocessing, networks and training of the conditional GAN."""

    spatial_dims: Literal[2, 3] = Field(2, description="2: axial slices; 3: whole volumes.")


class GenerateConfig(Section):
    """How many synthetic images to draw and from which seed."""

    per_class: int = Field(100, ge=1, description="Synthetic images per class.")
    seed: int = Field(0, ge=0)
