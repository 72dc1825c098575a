"""The CT abdomen family (the default demo): CT-like abdominal slabs in HU.

``make_cohort`` writes CT-like abdominal phantoms as DICOM series (most subjects) and NIfTI
volumes (some subjects), a ``labels.csv`` and a few files that ingest must quarantine. Every
subject carries fake PHI in the places real scans carry it (:data:`pipeline.demo.common.PHI_PLACES`).

Two classes: ``normal`` and ``lesion`` (a hypodense liver lesion, elongated along the body axis
so it shows on every axial slice of the slab).

Geometry: volumes are indexed ``[x, y, z]`` = (DICOM column, DICOM row, slice). Columns run
towards the patient's left and rows towards posterior (ImageOrientationPatient 1\\0\\0\\0\\1\\0),
slices from inferior to superior, so the NIfTI affine is ``diag(-dx, -dy, dz)`` in RAS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset as DicomDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from scipy.ndimage import gaussian_filter

from pipeline.core.errors import InputError
from pipeline.demo.common import (
    CohortSummary,
    SubjectPHI,
    _burn_in_text,
    _ellipse,
    _file_meta,
    _patient_module,
    _private_block,
    _study_module,
    _text_report,
    _uid,
    _write_dicom,
    _write_phi_nifti,
    phantom_affine,
    plan_cohort,
    write_labels,
    write_truncated,
)

__all__ = ["LABELS", "SHAPE", "SPACING", "phantom_volume", "phantom_affine", "make_cohort"]

LABELS: tuple[str, ...] = ("normal", "lesion")
SHAPE: tuple[int, int, int] = (128, 128, 16)
SPACING: tuple[float, float, float] = (2.5, 2.5, 4.0)


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
    if label not in LABELS:
        raise InputError(f"phantom label {label!r} is not one of {', '.join(LABELS)}.")
    nx, ny, nz = shape
    sx, sy, sz = spacing
    # mm coordinates, origin at the slab centre; x towards patient left, y towards posterior.
    xs = (np.arange(nx) - (nx - 1) / 2) * sx
    ys = (np.arange(ny) - (ny - 1) / 2) * sy
    zs = (np.arange(nz) - (nz - 1) / 2) * sz
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
    who: SubjectPHI,
    seed: int,
    subject: int,
    spacing: tuple[float, float, float],
    burned_in: bool,
) -> DicomDataset:
    nx, ny = hu_slice.shape
    sx, sy, sz = spacing
    sop_instance = _uid(seed, subject, "series", "slice", k)
    ds = DicomDataset()
    ds.file_meta = _file_meta(CTImageStorage, sop_instance, ExplicitVRLittleEndian)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance
    ds.Modality = "CT"
    ds.Manufacturer = "Medsynth Phantom Works"
    ds.ManufacturerModelName = "Phantom CT 1"
    ds.DeviceSerialNumber = f"SN{who.patient_id[-5:]}"
    ds.SoftwareVersions = "0.1"
    _patient_module(ds, who, seed, subject)
    _study_module(ds, who, seed, subject)
    _private_block(ds, who)
    ds.SeriesInstanceUID = _uid(seed, subject, "series")
    ds.FrameOfReferenceUID = _uid(seed, subject, "frame")
    ds.SeriesNumber = 2
    ds.SeriesDescription = f"Abdomen portal venous {who.family}"
    ds.BodyPartExamined = "ABDOMEN"
    ds.InstanceNumber = k + 1
    ds.ImageComments = f"slice {k + 1} of {who.given} {who.family}"
    ds.PatientPosition = "FFS"
    ds.ImagePositionPatient = [-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [sy, sx]  # row spacing (between rows), column spacing
    ds.SliceThickness = sz
    ds.SpacingBetweenSlices = sz
    ds.SliceLocation = z
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    stored = np.clip(hu_slice.T.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)  # rows x columns
    if burned_in:
        stored = _burn_in_text(stored, who, k)
    ds.PixelData = stored.tobytes()
    return ds


def make_cohort(out: str | Path, subjects: int = 40, seed: int = 0) -> CohortSummary:
    """Write the phantom cohort to ``out``: ``dicom/``, ``nifti/``, ``labels.csv``.

    Every fifth subject is written as NIfTI, the rest as DICOM series (one file per slice; one
    subject in implicit VR and without file extensions). The first lesion subject written as DICOM
    carries ``BurnedInAnnotation=YES`` with glyphs in its pixels; one subject gets a Basic Text SR,
    one a truncated scout slice. Labels are balanced and shuffled.

    Args:
        out: output folder (created; existing phantom files are overwritten).
        subjects: number of subjects (at least 4).
        seed: seed of every random choice: same seed, same bytes.

    Returns:
        A :class:`CohortSummary`; its ``planted_phi`` lists every planted PHI string.
    """
    plan = plan_cohort(out, subjects, seed, LABELS)
    out, labels, identities, subject_seeds = plan.out, plan.labels, plan.identities, plan.subject_seeds

    label_rows: list[tuple[str, str]] = []
    dicom_files = broken = burned = 0
    n_dicom = n_nifti = 0
    burned_subject = next(i for i, label in enumerate(labels) if label == "lesion" and i % 5 != 4)
    for index, (who, label) in enumerate(zip(identities, labels)):
        subject_rng = np.random.default_rng(subject_seeds[index])
        hu, spacing = phantom_volume(subject_rng, label)
        z0 = float(subject_rng.uniform(-400.0, -300.0))
        folder_name = f"{who.family}_{who.given}_{who.patient_id}"
        if index % 5 == 4:
            n_nifti += 1
            relative = f"{folder_name}.nii.gz"
            _write_phi_nifti(hu, phantom_affine(spacing, hu.shape, z0), who, out / "nifti" / relative)
            label_rows.append((relative, label))
            continue
        n_dicom += 1
        label_rows.append((who.patient_id, label))
        is_burned = index == burned_subject
        burned += is_burned
        implicit = index == 1
        series_dir = out / "dicom" / folder_name / f"CT_{who.accession}"
        for k in range(hu.shape[2]):
            ds = _ct_slice(hu[:, :, k], k, z0 + k * spacing[2], who, seed, index, spacing, is_burned)
            if implicit:
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            name = f"{who.patient_id}_{k:03d}" + ("" if implicit else ".dcm")
            _write_dicom(ds, series_dir / name)
            dicom_files += 1
        if index == 0:
            _write_dicom(_text_report(who, seed, index), out / "dicom" / folder_name / f"report_{who.family}.dcm")
            dicom_files += 1
            broken += 1
        if index == 2:
            scout = _ct_slice(hu[:, :, 0], 0, z0, who, seed, index, spacing, False)
            scout.SeriesInstanceUID = _uid(seed, index, "scout")
            scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = _uid(seed, index, "scout", 0)
            write_truncated(scout, out / "dicom" / folder_name / f"scout_{who.patient_id}.dcm")
            dicom_files += 1
            broken += 1

    write_labels(out, label_rows)
    return CohortSummary(
        out=out,
        subjects=subjects,
        dicom_subjects=n_dicom,
        nifti_subjects=n_nifti,
        dicom_files=dicom_files,
        labels=plan.counts(),
        burned_in_subjects=burned,
        broken_files=broken,
        planted_phi=plan.planted(),
    )
