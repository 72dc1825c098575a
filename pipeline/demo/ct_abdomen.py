"""The CT abdomen family (the default demo): CT-like abdominal slabs in HU.

:data:`FAMILY` draws CT-like abdominal phantoms; :func:`pipeline.demo.common.write_cohort`
writes them as DICOM series (one file per slice; subject 1 in implicit VR and without file
extensions) and NIfTI volumes (every fifth subject), a ``labels.csv`` and a few files that ingest
must quarantine. Every subject carries fake PHI in the places real scans carry it
(:data:`pipeline.demo.common.PHI_PLACES`).

Two classes: ``normal`` and ``lesion`` (a hypodense liver lesion, elongated along the body axis
so it shows on every axial slice of the slab).

Geometry as in :mod:`pipeline.demo.common`: ``[x, y, z]`` arrays, axial slices from inferior to
superior.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset as DicomDataset
from pydicom.uid import CTImageStorage
from scipy.ndimage import gaussian_filter

from pipeline.demo.common import (
    Family,
    Scan,
    SeriesTemplate,
    Subject,
    _ellipse,
    axial_series,
    axial_slice,
    centred_axes,
    check_label,
    image_dataset,
    phantom_affine,
    pixel_module,
)

__all__ = ["LABELS", "SHAPE", "SPACING", "PROCEDURE", "FAMILY", "phantom_volume", "phantom_affine"]

LABELS: tuple[str, ...] = ("normal", "lesion")
SHAPE: tuple[int, int, int] = (128, 128, 16)
SPACING: tuple[float, float, float] = (2.5, 2.5, 4.0)
PROCEDURE = ("CT", "ABDOMEN", "Abdomen")
_SERIES = SeriesTemplate(
    sop_class=CTImageStorage,
    procedure=PROCEDURE,
    model="Phantom CT 1",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    number=2,
    description="Abdomen portal venous",
)


def phantom_volume(
    rng: np.random.Generator,
    label: str,
    shape: tuple[int, int, int] = SHAPE,
    spacing: tuple[float, float, float] = SPACING,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One CT-like abdominal slab in HU, indexed ``[x, y, z]``.

    Body outline with subcutaneous fat and a muscle wall, liver, spleen, two kidneys, a vertebra
    with cortical rim, the aorta, bowel gas, smooth tissue texture and scanner noise. Sizes and
    positions vary between subjects. ``lesion`` adds a hypodense liver lesion (14-20 mm radius,
    70-100 HU below liver) that spans the whole slab along z.

    Args:
        rng: the subject's random generator.
        label: ``normal`` or ``lesion``.
        shape: voxels along x, y, z.
        spacing: voxel size in mm along x, y, z.

    Returns:
        ``(hu, spacing)`` with ``hu`` int16 in [-1024, 3071].
    """
    check_label(label, LABELS)
    nx, ny, nz = shape
    # mm coordinates, origin at the slab centre; x towards patient left, y towards posterior.
    xs, ys, zs = centred_axes(shape, spacing)
    xx, yy = np.meshgrid(xs, ys, indexing="ij")

    body_ax, body_ay = rng.uniform(125, 150), rng.uniform(92, 112)
    fat = rng.uniform(8, 18)
    liver = dict(cx=-rng.uniform(45, 65), cy=-rng.uniform(5, 25), ax=rng.uniform(48, 62), ay=rng.uniform(40, 55),
                 angle=rng.uniform(-0.4, 0.1), hu=rng.uniform(55, 70))
    spleen = dict(cx=rng.uniform(60, 80), cy=rng.uniform(25, 45), ax=rng.uniform(18, 26), ay=rng.uniform(28, 36),
                  angle=rng.uniform(-0.6, -0.2), hu=rng.uniform(45, 55))
    kidney_y = rng.uniform(35, 50)
    kidney_hu = rng.uniform(28, 40)
    spine = dict(cx=rng.uniform(-4, 4), cy=rng.uniform(55, 65), r=rng.uniform(15, 19))
    aorta_r, aorta_hu = rng.uniform(9, 12), rng.uniform(150, 220)
    gas = [(rng.uniform(-20, 50), rng.uniform(-50, 10), rng.uniform(5, 12)) for _ in range(rng.integers(2, 6))]
    lesion = None
    if label == "lesion":
        lesion = dict(
            cx=liver["cx"] + rng.uniform(-0.35, 0.35) * liver["ax"],
            cy=liver["cy"] + rng.uniform(-0.3, 0.3) * liver["ay"],
            r=rng.uniform(14, 20),
            rz=rng.uniform(70, 110),  # longer than the slab: visible on every slice
            hu_drop=rng.uniform(70, 100),
        )

    volume = np.full((nx, ny, nz), -1000.0, dtype=np.float32)
    for k, z in enumerate(zs):
        taper = 1.0 - 0.04 * (z / zs.max()) ** 2 if nz > 1 else 1.0  # organs change size along z
        slice_hu = np.full((nx, ny), -1000.0, dtype=np.float32)
        outer = _ellipse(xx, yy, 0, 0, body_ax, body_ay)
        inner = _ellipse(xx, yy, 0, 0, body_ax - fat, body_ay - fat)
        cavity = _ellipse(xx, yy, 0, 5, body_ax - fat - 10, body_ay - fat - 10)
        slice_hu[outer] = -100.0  # subcutaneous fat
        slice_hu[inner] = 45.0  # muscle wall
        slice_hu[cavity] = -85.0  # intra-abdominal fat
        slice_hu[_ellipse(xx, yy, liver["cx"], liver["cy"], liver["ax"] * taper, liver["ay"] * taper, liver["angle"])] = liver["hu"]
        slice_hu[_ellipse(xx, yy, spleen["cx"], spleen["cy"], spleen["ax"] * taper, spleen["ay"], spleen["angle"])] = spleen["hu"]
        for side in (-1, 1):
            slice_hu[_ellipse(xx, yy, side * 42, kidney_y, 16 * taper, 24 * taper, side * 0.5)] = kidney_hu
        bone = _ellipse(xx, yy, spine["cx"], spine["cy"], spine["r"], spine["r"] * 0.9)
        marrow = _ellipse(xx, yy, spine["cx"], spine["cy"], spine["r"] - 3, spine["r"] * 0.9 - 3)
        slice_hu[bone] = 750.0
        slice_hu[marrow] = 250.0
        slice_hu[_ellipse(xx, yy, spine["cx"] + 12, spine["cy"] - spine["r"] - aorta_r - 3, aorta_r, aorta_r)] = aorta_hu
        for gx, gy, gr in gas:
            slice_hu[_ellipse(xx, yy, gx, gy + 0.1 * z, gr, gr * 0.8) & cavity] = -950.0
        if lesion is not None and abs(z) < lesion["rz"]:
            radius = lesion["r"] * np.sqrt(1.0 - (z / lesion["rz"]) ** 2)
            spot = _ellipse(xx, yy, lesion["cx"], lesion["cy"], radius, radius * 0.9)
            slice_hu[spot] = liver["hu"] - lesion["hu_drop"]
        volume[:, :, k] = slice_hu

    body = volume > -900
    texture = gaussian_filter(rng.standard_normal(volume.shape).astype(np.float32), sigma=(2.0, 2.0, 1.0))
    volume += body * (texture * 25.0)  # parenchymal texture (smoothed noise ~8 HU)
    volume = gaussian_filter(volume, sigma=(0.7, 0.7, 0.0))  # partial-volume edges
    volume += rng.normal(0.0, 12.0, volume.shape).astype(np.float32)  # quantum noise
    hu = np.clip(np.rint(volume), -1024, 3071).astype(np.int16)
    return hu, spacing


def _ct_slice(
    hu_slice: np.ndarray,
    k: int,
    z: float,
    subject: Subject,
    spacing: tuple[float, float, float],
    burned_in: bool,
) -> DicomDataset:
    """Slice ``k`` of the subject's CT series: HU stored as 12-bit unsigned values with a -1024 rescale."""
    ds = image_dataset(_SERIES, subject, ("slice", k))
    axial_slice(ds, subject, k, z, hu_slice.shape, spacing, position="FFS")
    ds.KVP = 120
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    stored = np.clip(hu_slice.T.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)  # rows x columns
    pixel_module(ds, stored, bits_stored=12, burned_in=burned_in, who=subject.who, k=k, bright=4000)
    return ds


def _scan(rng: np.random.Generator, label: str, subject: Subject) -> Scan:
    """Draw the subject's slab and its table position; one DICOM file per slice."""
    hu, spacing = phantom_volume(rng, label)
    z0 = float(rng.uniform(-400.0, -300.0))
    # One subject in implicit VR is enough for ingest to meet both encodings in every cohort.
    return axial_series(hu, spacing, z0, subject, PROCEDURE[0], _ct_slice, implicit=subject.index == 1)


FAMILY = Family(name="ct-abdomen", labels=LABELS, stream=0, procedure=PROCEDURE, extra="scout", scan=_scan)
