"""The chest X-ray family: single-frame 2D radiographs (DX and CR), ``normal`` vs ``nodule``.

Each subject is one PA chest radiograph: a single-frame DICOM file without patient geometry
(DX "for presentation" in MONOCHROME2 for most subjects, CR in MONOCHROME1 for every third),
12 bits stored in 16, on a small matrix (:data:`MATRIX`) whose pixel spacing is the subject's
field of view over the matrix (about 1.4-1.7 mm; a detector's 0.14-0.2 mm pitch binned down so
the demo stays fast). Every fifth subject is a 2D NIfTI file ``(x, y)`` instead
(:func:`pipeline.demo.common.write_cohort` writes :data:`FAMILY`).

Pixels are built as an attenuation map (lungs low; mediastinum, heart, spine, ribs, clavicles
and the abdomen below the diaphragm high) turned into detector values with a per-subject
exposure, contrast and quantum noise. The ``nodule`` class adds one round soft-edged opacity
(:data:`NODULE_RADIUS_MM`, 22-30 mm radius) in a lung field: a local structure of about twice the
contrast of a rib crossing, not a change of the image's overall brightness.

Array layout: ``[x, y]`` = (DICOM column, DICOM row); columns run towards the patient's left and
rows towards the feet (PatientOrientation ``L\\F``).
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset as DicomDataset
from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation
from scipy.ndimage import distance_transform_edt, gaussian_filter

from pipeline.demo.common import (
    Family,
    Scan,
    SeriesTemplate,
    Subject,
    _ellipse,
    centred_axes,
    check_label,
    image_dataset,
    pixel_module,
)

__all__ = ["LABELS", "MATRIX", "PROCEDURE", "FAMILY", "radiograph", "radiograph_affine"]

LABELS: tuple[str, ...] = ("normal", "nodule")
MATRIX: tuple[int, int] = (256, 256)
PROCEDURE = ("DX", "CHEST", "Chest")
_MAX_STORED = 4095  # 12 bits stored
_DX = SeriesTemplate(
    sop_class=DigitalXRayImageStorageForPresentation,
    procedure=PROCEDURE,
    model="Phantom DR 3",
    image_type=("ORIGINAL", "PRIMARY"),
    number=1,
    description="Chest PA",
)
_CR = SeriesTemplate(
    sop_class=ComputedRadiographyImageStorage,
    procedure=("CR", *PROCEDURE[1:]),
    model="Phantom CR 2",
    image_type=_DX.image_type,
    number=_DX.number,
    description=_DX.description,
)
# The nodule: large and dense enough that the evaluate stage's small classifier, at the ~7 mm pixels a
# CPU plan gives a chest, reads it on held-out images from ~70 training images (balanced accuracy ~0.8;
# at 12-20 mm and +0.22-0.32 it read chance), yet not trivially (about twice a rib crossing's contrast).
NODULE_RADIUS_MM: tuple[float, float] = (22.0, 30.0)
NODULE_ATTENUATION: tuple[float, float] = (0.40, 0.50)  # added attenuation (lung 0.16, rib +0.13)


def radiograph(
    rng: np.random.Generator, label: str, matrix: tuple[int, int] = MATRIX
) -> tuple[np.ndarray, tuple[float, float]]:
    """One PA chest radiograph as displayed (bright = attenuating), indexed ``[x, y]``.

    Args:
        rng: the subject's random generator.
        label: ``normal`` or ``nodule``.
        matrix: pixels along x and y.

    Returns:
        ``(values, spacing)``: uint16 detector values in 0..4095 (MONOCHROME2 sense) and the
        pixel spacing (x, y) in mm.
    """
    check_label(label, LABELS)
    nx, ny = matrix
    # The finding draws from its own stream: the same seed gives the same patient with or without it.
    finding_rng = np.random.default_rng(rng.integers(2**32))
    field_of_view = rng.uniform(360.0, 430.0)
    spacing = (round(field_of_view / nx, 4), round(field_of_view / ny, 4))
    xs, ys = centred_axes(matrix, spacing)
    xx, yy = np.meshgrid(xs, ys, indexing="ij")  # x: patient left, y: towards the feet
    dx, dy = rng.uniform(-15, 15), rng.uniform(-15, 15)  # patient not centred on the detector
    xx, yy = xx - dx, yy - dy

    attenuation = np.zeros((nx, ny), dtype=np.float32)
    trunk = _ellipse(xx, yy, 0, 40, rng.uniform(150, 175), rng.uniform(230, 260))
    attenuation[trunk] = 0.55
    shoulders = _ellipse(xx, yy, 0, -150, rng.uniform(170, 195), 70)
    attenuation[shoulders] = 0.6
    lung_w, lung_h = rng.uniform(52, 64), rng.uniform(105, 125)
    lung_top = rng.uniform(-140, -120)
    diaphragm = lung_top + 2 * lung_h * rng.uniform(0.88, 0.96)
    lungs = np.zeros_like(trunk)
    for side in (-1, 1):
        cx = side * rng.uniform(72, 86)
        lung = _ellipse(xx, yy, cx, lung_top + lung_h, lung_w, lung_h, side * rng.uniform(0.02, 0.1))
        dome = yy > diaphragm - 28 * np.exp(-(((xx - cx) / (lung_w * 0.8)) ** 2))  # below the dome
        lungs |= lung & ~dome
    vessels = gaussian_filter(rng.standard_normal((nx, ny)).astype(np.float32), sigma=2.0)
    attenuation[lungs] = 0.16 + 0.05 * vessels[lungs] / (float(np.abs(vessels).max()) or 1.0)
    heart_w = rng.uniform(55, 75)
    heart = _ellipse(xx, yy, rng.uniform(15, 30), diaphragm - rng.uniform(45, 60), heart_w, rng.uniform(50, 62), -0.5)
    mediastinum = (np.abs(xx - 4) < rng.uniform(22, 30)) & (yy < diaphragm) & (yy > lung_top - 20)
    attenuation[heart | mediastinum] = 0.62
    spine = (np.abs(xx) < rng.uniform(14, 18)) & trunk
    attenuation[spine] += 0.12
    for rib in range(9):  # posterior ribs: arcs falling laterally, on both sides
        y0 = lung_top + 12 + rib * rng.uniform(21, 25)
        for side in (-1, 1):
            curve = y0 + 0.004 * (xx * side) ** 2 * (xx * side > 0)
            band = (np.abs(yy - curve) < rng.uniform(4, 6)) & (xx * side > 10) & (np.abs(xx) < 150) & trunk
            attenuation[band] += 0.13
    for side in (-1, 1):
        clavicle = (np.abs(yy - (lung_top + 5 - 0.25 * (np.abs(xx) - 20))) < 5) & (np.abs(xx) > 15) & (np.abs(xx) < 110)
        attenuation[clavicle & (xx * side > 0)] += 0.15
    if label == "nodule":
        radius = finding_rng.uniform(*NODULE_RADIUS_MM)
        depth_mm = distance_transform_edt(lungs & ~heart, sampling=spacing)  # inside the lung, not on its edge
        candidates = np.argwhere(depth_mm > 0.8 * radius)
        cx_i, cy_i = candidates[finding_rng.integers(len(candidates))]
        dist2 = (xx - xx[cx_i, cy_i]) ** 2 + (yy - yy[cx_i, cy_i]) ** 2
        attenuation += (finding_rng.uniform(*NODULE_ATTENUATION) * np.exp(-((dist2 / radius**2) ** 2))).astype(np.float32)

    attenuation = gaussian_filter(attenuation, sigma=1.0)  # scatter and focal-spot blur
    exposure = rng.uniform(0.8, 1.25)  # technique: overall darkness differs between subjects
    contrast = rng.uniform(0.85, 1.15)
    display = 300.0 + 3600.0 * (1.0 - np.exp(-2.2 * contrast * attenuation)) * exposure
    display += rng.normal(0.0, 25.0, display.shape) * np.sqrt(np.clip(display, 1.0, None) / 2000.0)
    return np.clip(np.rint(display), 0, _MAX_STORED).astype(np.uint16), spacing


def radiograph_affine(spacing: tuple[float, float]) -> np.ndarray:
    """RAS affine of a radiograph without patient geometry, the convention ingest assumes for one."""
    return np.diag([-spacing[0], -spacing[1], 1.0, 1.0])


def _xray_file(
    values: np.ndarray,
    subject: Subject,
    spacing: tuple[float, float],
    computed: bool,
    burned_in: bool,
) -> DicomDataset:
    """One single-frame radiograph: DX for presentation (MONOCHROME2) or CR (MONOCHROME1)."""
    ds = image_dataset(_CR if computed else _DX, subject, ("image", 0))
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.InstanceNumber = 1
    ds.ImageComments = f"chest of {subject.who.given} {subject.who.family}"
    ds.KVP = 120
    ds.ExposureTime = 10
    ds.ImagerPixelSpacing = [spacing[1], spacing[0]]  # between rows, between columns
    ds.PixelSpacing = [spacing[1], spacing[0]]
    if not computed:
        ds.PresentationLUTShape = "IDENTITY"
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    stored = np.ascontiguousarray(values.T)  # rows x columns
    if computed:
        stored = (_MAX_STORED - stored).astype(np.uint16)  # MONOCHROME1: attenuating = low values
    photometric = "MONOCHROME1" if computed else "MONOCHROME2"
    pixel_module(ds, stored, bits_stored=12, burned_in=burned_in, who=subject.who, k=0, photometric=photometric)
    return ds


def _scan(rng: np.random.Generator, label: str, subject: Subject) -> Scan:
    """Draw the subject's radiograph; one DICOM file, from a CR reader for every third subject."""
    values, spacing = radiograph(rng, label)
    # Both detector kinds in one cohort: ingest must bring MONOCHROME1 to the MONOCHROME2 sense.
    computed = subject.index % 3 == 1
    modality = _CR.procedure[0] if computed else _DX.procedure[0]

    def image(k: int, burned_in: bool) -> DicomDataset:
        return _xray_file(values, subject, spacing, computed, burned_in)

    files = (f"{modality}_{subject.who.accession}.dcm",)
    return Scan(volume=values, affine=radiograph_affine(spacing), files=files, image=image)


FAMILY = Family(name="xray-chest", labels=LABELS, stream=2, procedure=PROCEDURE, extra="lateral", scan=_scan)
