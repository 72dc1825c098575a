"""The MR brain family: T1-weighted post-contrast head slabs in arbitrary scanner units.

MR intensities have no absolute scale: each subject's volume is multiplied by its own receiver
gain (a factor of ten between subjects) and by a smooth multiplicative bias field (coil
sensitivity, up to about ±30 % across the head), and the noise is Rician (magnitude of complex
Gaussian noise), so the background is not zero. A model must normalise per volume, as real MR
pipelines do.

Two classes: ``normal`` and ``tumour`` (an enhancing mass in one hemisphere: necrotic core,
bright rim, surrounding oedema darker than white matter, and a mass effect on the ventricle;
elongated along z so it shows on most axial slices). The tumour changes a local structure, not
the volume's overall brightness, which the subject gain dominates anyway.

Geometry and files as in :mod:`pipeline.demo.ct_abdomen`: ``[x, y, z]`` arrays, DICOM series
(MR Image Storage, one file per slice) for most subjects and NIfTI for every fifth, written by
:func:`pipeline.demo.common.write_cohort` from :data:`FAMILY`.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset as DicomDataset
from pydicom.uid import MRImageStorage
from scipy.ndimage import gaussian_filter

from pipeline.demo.common import (
    Family,
    Scan,
    SeriesTemplate,
    Subject,
    axial_series,
    axial_slice,
    centred_axes,
    check_label,
    image_dataset,
    pixel_module,
)

__all__ = ["LABELS", "SHAPE", "SPACING", "PROCEDURE", "FAMILY", "brain_volume"]

LABELS: tuple[str, ...] = ("normal", "tumour")
SHAPE: tuple[int, int, int] = (112, 112, 12)
SPACING: tuple[float, float, float] = (1.8, 1.8, 5.0)
PROCEDURE = ("MR", "HEAD", "Head")
_SERIES = SeriesTemplate(
    sop_class=MRImageStorage,
    procedure=PROCEDURE,
    model="Phantom MR 1.5",
    image_type=("ORIGINAL", "PRIMARY", "M", "ND"),
    number=5,
    description="T1 axial post-contrast",
)
_T1 = {"scalp": 1.0, "skull": 0.08, "csf": 0.22, "grey": 0.52, "white": 0.74, "core": 0.3, "rim": 0.98, "oedema": 0.46}


def _bias_field(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, zz: np.ndarray) -> np.ndarray:
    """A smooth multiplicative field: exp of a random quadratic in normalised coordinates."""
    u, v, w = xx / 100.0, yy / 100.0, zz / 100.0
    terms = (u, v, w, u * u, v * v, u * v, u * w, v * w)
    log_field = sum(rng.uniform(-0.22, 0.22) * term for term in terms)
    return np.exp(log_field).astype(np.float32)


def brain_volume(
    rng: np.random.Generator,
    label: str,
    shape: tuple[int, int, int] = SHAPE,
    spacing: tuple[float, float, float] = SPACING,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One T1-like axial head slab in scanner units, indexed ``[x, y, z]``.

    Scalp, skull, CSF, folded cortex, white matter, lateral ventricles and the falx; sizes and
    positions vary between subjects. ``tumour`` adds an enhancing mass (10-16 mm radius) with
    oedema and a mass effect in one hemisphere.

    Args:
        rng: the subject's random generator.
        label: ``normal`` or ``tumour``.
        shape: voxels along x, y, z.
        spacing: voxel size in mm along x, y, z.

    Returns:
        ``(values, spacing)`` with ``values`` uint16 (gain, bias field and Rician noise applied).
    """
    check_label(label, LABELS)
    nx, ny, nz = shape
    xs, ys, zs = centred_axes(shape, spacing)
    xx, yy = np.meshgrid(xs, ys, indexing="ij")

    # The finding draws from its own stream: the same seed gives the same patient with or without it.
    finding_rng = np.random.default_rng(rng.integers(2**32))
    head_ax, head_ay = rng.uniform(66, 76), rng.uniform(82, 94)
    scalp, skull, csf = rng.uniform(4, 6), rng.uniform(5, 8), rng.uniform(2, 3.5)
    cortex = rng.uniform(3.5, 5.0)
    ventricle = dict(dx=rng.uniform(5, 8), cy=rng.uniform(-12, -4), ax=rng.uniform(4, 7), ay=rng.uniform(18, 26))
    folding = gaussian_filter(rng.standard_normal((nx, ny)).astype(np.float32), sigma=2.5)
    folding /= float(np.abs(folding).max()) or 1.0
    tumour = None
    if label == "tumour":
        side = finding_rng.choice([-1.0, 1.0])
        tumour = dict(
            cx=side * finding_rng.uniform(20, 38),
            cy=finding_rng.uniform(-35, 35),
            r=finding_rng.uniform(10, 16),
            rz=finding_rng.uniform(45, 70),  # longer than the slab: on most slices
            oedema=finding_rng.uniform(1.5, 2.0),
            side=side,
        )

    volume = np.zeros((nx, ny, nz), dtype=np.float32)
    for k, z in enumerate(zs):
        taper = np.sqrt(max(1.0 - (z / 110.0) ** 2, 0.2))  # the head narrows towards the vertex
        ax, ay = head_ax * taper, head_ay * taper
        radius = np.sqrt((xx / ax) ** 2 + (yy / ay) ** 2)  # 1 on the skin
        mean_axis = (ax + ay) / 2
        plane = np.zeros((nx, ny), dtype=np.float32)
        plane[radius <= 1.0] = _T1["scalp"]
        plane[radius <= 1.0 - scalp / mean_axis] = _T1["skull"]
        plane[radius <= 1.0 - (scalp + skull) / mean_axis] = _T1["csf"]
        brain = radius <= 1.0 - (scalp + skull + csf) / mean_axis
        plane[brain] = _T1["grey"]
        # The grey-white boundary follows the folding noise: gyri of different depth in every subject.
        depth = (scalp + skull + csf + cortex * (1.0 + 0.9 * folding)) / mean_axis
        plane[brain & (radius <= 1.0 - depth)] = _T1["white"]
        plane[brain & (np.abs(xx) < 1.2)] = _T1["csf"]  # falx / interhemispheric fissure
        shift = 0.0
        if tumour is not None and abs(z) < tumour["rz"]:
            shift = -tumour["side"] * 3.0  # the mass pushes the midline structures away
        if abs(z) < 25:
            size = np.sqrt(1.0 - (z / 25.0) ** 2)
            for side in (-1.0, 1.0):
                squeeze = 0.6 if tumour is not None and side == tumour["side"] else 1.0
                vx = side * ventricle["dx"] + shift
                inside = ((xx - vx) / (ventricle["ax"] * size * squeeze + 0.5)) ** 2 + (
                    (yy - ventricle["cy"]) / (ventricle["ay"] * size + 0.5)
                ) ** 2 <= 1.0
                plane[inside & brain] = _T1["csf"]
        if tumour is not None and abs(z) < tumour["rz"]:
            r = tumour["r"] * np.sqrt(1.0 - (z / tumour["rz"]) ** 2)
            dist = np.sqrt((xx - tumour["cx"]) ** 2 + (yy - tumour["cy"]) ** 2)
            ragged = dist * (1.0 + 0.25 * folding)  # oedema spreads along white matter, not as a disc
            plane[brain & (ragged <= r * tumour["oedema"]) & (plane > _T1["grey"] - 0.01)] = _T1["oedema"]
            plane[brain & (dist <= r)] = _T1["rim"]
            plane[brain & (dist <= r * 0.6)] = _T1["core"]
        volume[:, :, k] = plane

    tissue = volume > 0
    texture = gaussian_filter(rng.standard_normal(volume.shape).astype(np.float32), sigma=(1.5, 1.5, 0.5))
    volume += tissue * (texture * 0.06)
    volume = gaussian_filter(volume, sigma=(0.6, 0.6, 0.0))  # partial-volume edges
    zz = np.broadcast_to(zs, volume.shape)
    volume *= _bias_field(rng, xx[..., None], yy[..., None], zz)
    gain = rng.uniform(300.0, 3000.0)  # receiver gain: arbitrary units, different for each subject
    sigma = rng.uniform(0.015, 0.03)
    real = volume + rng.normal(0.0, sigma, volume.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, volume.shape).astype(np.float32)
    magnitude = np.sqrt(real * real + imaginary * imaginary) * gain
    return np.clip(np.rint(magnitude), 0, 65535).astype(np.uint16), spacing


def _mr_slice(
    values: np.ndarray,
    k: int,
    z: float,
    subject: Subject,
    spacing: tuple[float, float, float],
    burned_in: bool,
) -> DicomDataset:
    """Slice ``k`` of the subject's T1 series: scanner units stored as they are, in all 16 bits."""
    ds = image_dataset(_SERIES, subject, ("slice", k))
    axial_slice(ds, subject, k, z, values.shape, spacing, position="HFS")
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = "SP"
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 250
    ds.EchoTime = 2.5
    ds.FlipAngle = 70
    ds.MagneticFieldStrength = 1.5
    stored = np.ascontiguousarray(values.T)  # rows x columns
    pixel_module(ds, stored, bits_stored=16, burned_in=burned_in, who=subject.who, k=k)
    return ds


def _scan(rng: np.random.Generator, label: str, subject: Subject) -> Scan:
    """Draw the subject's head slab and its table position; one DICOM file per slice."""
    values, spacing = brain_volume(rng, label)
    z0 = float(rng.uniform(-20.0, 20.0))
    return axial_series(values, spacing, z0, subject, PROCEDURE[0], _mr_slice)


FAMILY = Family(name="mr-brain", labels=LABELS, stream=1, procedure=PROCEDURE, extra="localizer", scan=_scan)
