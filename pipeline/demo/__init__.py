"""The phantom cohorts: embedded, identifiable-by-design demo datasets in three families.

``medsynth demo-data --family F`` writes one of :data:`FAMILIES`:

* ``ct-abdomen`` (default): CT-like abdominal slabs in HU, ``normal`` vs ``lesion``
  (:mod:`pipeline.demo.ct_abdomen`);
* ``mr-brain``: MR head volumes in arbitrary scanner units with a bias field, ``normal`` vs
  ``tumour`` (:mod:`pipeline.demo.mr_brain`);
* ``xray-chest``: single-frame 2D chest radiographs (DX and CR), ``normal`` vs ``nodule``
  (:mod:`pipeline.demo.xray_chest`).

Every family plants the same fake PHI (:mod:`pipeline.demo.common`) and writes ``dicom/``,
``nifti/`` and ``labels.csv``; the same family, size and seed give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.demo import ct_abdomen, mr_brain, xray_chest
from pipeline.demo.common import PHI_PLACES, CohortSummary, Family, SubjectPHI, write_cohort
from pipeline.demo.ct_abdomen import LABELS, phantom_affine, phantom_volume

__all__ = [
    "FAMILIES",
    "DEFAULT_FAMILY",
    "LABELS",
    "PHI_PLACES",
    "SubjectPHI",
    "CohortSummary",
    "phantom_volume",
    "phantom_affine",
    "make_cohort",
]

DEFAULT_FAMILY = "ct-abdomen"
FAMILIES: dict[str, Family] = {family.name: family for family in (ct_abdomen.FAMILY, mr_brain.FAMILY, xray_chest.FAMILY)}


def make_cohort(out: str | Path, subjects: int = 40, seed: int = 0, family: str = DEFAULT_FAMILY) -> CohortSummary:
    """Write the phantom cohort of ``family`` to ``out`` (``dicom/``, ``nifti/``, ``labels.csv``).

    Args:
        out: output folder (created; existing phantom files are overwritten).
        subjects: number of subjects (at least 4).
        seed: seed of every random choice: same seed, same bytes.
        family: one of :data:`FAMILIES`.

    Returns:
        A :class:`CohortSummary`; its ``planted_phi`` lists every planted PHI string.

    Raises:
        InputError: an unknown family, too few subjects, or an unwritable folder.
    """
    if family not in FAMILIES:
        raise InputError(f"--family {family!r} is not one of {', '.join(FAMILIES)}. Fix: pass one of them.")
    return write_cohort(out, subjects, seed, FAMILIES[family])
