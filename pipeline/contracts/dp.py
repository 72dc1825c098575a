"""The differential-privacy record: ``model.json``'s ``dp`` object, written by train and read by evaluate and export.

A model trained with ``model.dp`` carries one :class:`DPRecord` (``ModelMeta.dp`` holds it as a plain
object, null without DP). It says what was spent (``epsilon`` at ``delta`` after ``steps``), how it
was accounted (the accountant, the sampling rate, the noise, the history of every session), what
the unit of privacy is, and the assumptions under which the guarantee holds. docs/contracts.md and
docs/models.md ("Differential privacy") describe every key.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.errors import InputError

__all__ = ["DPRecord", "PRIVACY_UNIT", "read_dp_record"]

# Neighbouring datasets differ by one patient (all of their volumes and slices), not by one image.
PRIVACY_UNIT = "subject"


class DPRecord(BaseModel):
    """What the DP accountant says about a trained generator, and on which assumptions."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    epsilon: float = Field(..., ge=0.0, description="Epsilon spent after `steps` (the accountant's, at `delta`).")
    delta: float = Field(..., gt=0.0, lt=1.0, description="Delta of the guarantee.")
    target_epsilon: float = Field(..., gt=0.0, description="The budget (`model.dp.epsilon`).")
    steps: int = Field(..., ge=0, description="Private discriminator steps accounted (over resumes).")
    privacy_unit: str = Field(PRIVACY_UNIT, description="What one neighbouring dataset adds or removes.")
    n_subjects: int = Field(..., ge=1, description="Training subjects (treated as public, as the sampling rate needs).")
    accountant: str = Field(..., description="Opacus accountant: rdp or prv.")
    sample_rate: float = Field(..., gt=0.0, le=1.0, description="Poisson probability of drawing a subject per step.")
    noise_multiplier: float = Field(..., gt=0.0, description="Gaussian noise std / max_grad_norm.")
    max_grad_norm: float = Field(..., gt=0.0, description="Per-subject clipping bound.")
    slices_per_subject: int = Field(..., ge=1, description="Images drawn from each sampled subject (clipped as one).")
    mechanism: str = Field(..., description="What is private and what is post-processing, in one sentence.")
    assumptions: list[str] = Field(default_factory=list, description="Conditions of the guarantee, one sentence each.")
    history: list[list[float]] = Field(
        default_factory=list, description="The accountant's history: [noise_multiplier, sample_rate, steps] per phase."
    )
    budget_exhausted: bool = Field(False, description="True when training stopped because the next step would exceed it.")
    stop_reason: str | None = Field(None, description="The budget stop, in words (null when it did not stop training).")


def read_dp_record(dp: dict[str, Any] | None, where: str) -> DPRecord | None:
    """Parse ``model.json``'s ``dp`` object (None without DP).

    Args:
        dp: the ``dp`` value of a :class:`pipeline.contracts.model.ModelMeta`.
        where: the file, for the message.

    Raises:
        InputError: a key missing or of the wrong type (the message names it).
    """
    if not dp:
        return None
    try:
        return DPRecord.model_validate(dp)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise InputError(
            f"{where}: key 'dp.{key}' is not valid ({first['msg']}). Fix: re-run `medsynth train` with model.dp."
        ) from None
