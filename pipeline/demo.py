"""The phantom cohort: an embedded, identifiable-by-design demo dataset.

``make_cohort`` writes CT-like abdominal phantoms as DICOM series (most subjects) and NIfTI
volumes (some subjects), a ``labels.csv`` and a few files that ingest must quarantine. Every
subject carries fake PHI in the places real scans carry it (see :data:`PHI_PLACES`), all drawn
from a seeded generator, so the anonymization and the leak audit have real work to do.

Two classes: ``normal`` and ``lesion`` (a hypodense liver lesion, elongated along the body axis
so it shows on every axial slice of the slab).

Geometry: volumes are indexed ``[x, y, z]`` = (DICOM column, DICOM row, slice). Columns run
towards the patient's left and rows towards posterior (ImageOrientationPatient 1\\0\\0\\0\\1\\0),
slices from inferior to superior, so the NIfTI affine is ``diag(-dx, -dy, dz)`` in RAS.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from scipy.ndimage import gaussian_filter

from pipeline.core.errors import InputError
from pipeline.core.files import atomic_path, atomic_write_text
from pipeline.demo_text import burn_in_identity

__all__ = [
    "LABELS",
    "PHI_PLACES",
    "SubjectPHI",
    "CohortSummary",
    "phantom_volume",
    "phantom_affine",
    "make_cohort",
]

LABELS: tuple[str, ...] = ("normal", "lesion")
SHAPE: tuple[int, int, int] = (128, 128, 16)
SPACING: tuple[float, float, float] = (2.5, 2.5, 4.0)
PRIVATE_CREATOR = "MEDSYNTH PHANTOM PHI"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

PHI_PLACES: tuple[str, ...] = (
    "PatientName, PatientID, IssuerOfPatientID, PatientBirthDate, PatientAddress, PatientTelephoneNumbers",
    "InstitutionName/Address, Referring/Performing/Reading physicians, OperatorsName, StationName",
    "AccessionNumber, StudyID, StudyDate/SeriesDate/AcquisitionDate/ContentDate and times",
    "StudyDescription, SeriesDescription, PatientComments, ImageComments (free text naming the patient)",
    "OtherPatientIDsSequence, RequestAttributesSequence, ReferencedPatientSequence (nested)",
    f"private block '{PRIVATE_CREATOR}' in group 0x0011 (name, ID, free text)",
    "folder and file names (name and MRN), NIfTI descrip/aux_file/db_name/intent_name, NIfTI comment extension",
)

_SYLLABLES = (
    "bar", "ken", "dor", "vel", "mar", "tin", "sol", "rik", "lan", "gor", "pem", "zul", "hast", "wen",
    "trom", "bel", "quin", "dar", "fel", "mon", "sar", "vik", "lor", "nem", "pell", "ost", "rund", "kav",
)
_STREETS = ("Lindenhof", "Birchwater", "Quarrymoor", "Ashcombe", "Fernleigh", "Marrowdale", "Kestrelholm")
_CITIES = ("Northwold", "Easthaven", "Brackenridge", "Westmarch", "Coldspring")


@dataclass(frozen=True)
class SubjectPHI:
    """The fake identity of one phantom subject (all values from the seeded generator)."""

    family: str
    given: str
    patient_id: str
    other_id: str
    birth_date: str
    address: str
    phone: str
    accession: str
    study_date: str
    institution: str
    referring: str
    performing: str
    operator: str

    @property
    def dicom_name(self) -> str:
        return f"{self.family}^{self.given}"

    def markers(self) -> list[str]:
        """Distinctive strings a leak scan must never find outside raw/ and private/."""
        return [
            self.family, self.given, self.patient_id, self.other_id, self.birth_date, self.address,
            self.phone, self.accession, self.study_date, self.institution, self.referring, self.performing,
            self.operator,
        ]


@dataclass
class CohortSummary:
    """What :func:`make_cohort` wrote (counts only in :meth:`lines`; PHI only in ``planted_phi``)."""

    out: Path
    subjects: int
    dicom_subjects: int
    nifti_subjects: int
    dicom_files: int
    labels: dict[str, int]
    burned_in_subjects: int
    broken_files: int
    planted_phi: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        label_text = ", ".join(f"{count} {label}" for label, count in sorted(self.labels.items()))
        return [
            f"Phantom cohort written to {self.out}",
            f"  {self.subjects} subjects ({label_text}): {self.dicom_subjects} as DICOM series "
            f"({self.dicom_files} files), {self.nifti_subjects} as NIfTI",
            f"  planted for ingest to handle: fake PHI in headers, sequences, private tags and file names; "
            f"{self.burned_in_subjects} subject with BurnedInAnnotation=YES; {self.broken_files} broken files",
            "  labels: labels.csv (key,label)",
            "Next step:",
            f"  medsynth ingest --source {self.out / 'dicom'} --source {self.out / 'nifti'} "
            f"--labels {self.out / 'labels.csv'} --out runs/demo/ingested",
        ]


# --------------------------------------------------------------------------------------------
# Phantom anatomy
# --------------------------------------------------------------------------------------------


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    u = (dx * cos + dy * sin) / ax
    v = (-dx * sin + dy * cos) / ay
    return u * u + v * v <= 1.0


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


def phantom_affine(spacing: tuple[float, float, float], shape: tuple[int, int, int], z0: float) -> np.ndarray:
    """RAS affine of a phantom stored with DICOM's LPS pixel layout (see module docstring)."""
    sx, sy, sz = spacing
    nx, ny, _ = shape
    origin_lps = np.array([-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, z0])
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = origin_lps * np.array([-1.0, -1.0, 1.0])
    return affine


# --------------------------------------------------------------------------------------------
# Fake identities
# --------------------------------------------------------------------------------------------


def _pseudo_name(rng: np.random.Generator, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _date(rng: np.random.Generator, first_year: int, last_year: int) -> str:
    return f"{rng.integers(first_year, last_year + 1)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"


def _identity(rng: np.random.Generator, used: set[str]) -> SubjectPHI:
    def unique(make):
        while True:
            value = make()
            if value not in used:
                used.add(value)
                return value

    return SubjectPHI(
        family=unique(lambda: _pseudo_name(rng, 4)),
        given=unique(lambda: _pseudo_name(rng, 3)),
        patient_id=unique(lambda: f"MRN{rng.integers(10**7, 10**8)}"),
        other_id=unique(lambda: f"OID{rng.integers(10**7, 10**8)}"),
        birth_date=_date(rng, 1935, 1999),
        address=unique(lambda: f"{rng.integers(10, 999)} {rng.choice(_STREETS)} Road, {rng.choice(_CITIES)}"),
        phone=unique(lambda: f"+44 {rng.integers(1000, 9999)} {rng.integers(100000, 999999)}"),
        accession=unique(lambda: f"ACC{rng.integers(10**8, 10**9)}"),
        study_date=_date(rng, 2019, 2024),
        institution=f"St {_pseudo_name(rng, 3)} Infirmary",
        referring=f"{_pseudo_name(rng, 4)}^Doctor",
        performing=f"{_pseudo_name(rng, 4)}^Tech",
        operator=f"{_pseudo_name(rng, 4)}^Oper",
    )


# --------------------------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------------------------


def _uid(seed: int, *parts: object) -> str:
    """A deterministic 2.25 UID from the seed and a path of names: same seed, same bytes."""
    # pydicom's generate_uid(prefix=None) ignores its entropy and draws a random UUID, so the
    # 2.25 form (a 128-bit integer) is built here from a hash instead.
    text = "/".join(["medsynth-phantom", str(seed), *map(str, parts)])
    return f"2.25.{int(hashlib.sha256(text.encode()).hexdigest()[:32], 16)}"


def _patient_module(ds: DicomDataset, who: SubjectPHI, seed: int, subject: int) -> None:
    ds.PatientName = who.dicom_name
    ds.PatientID = who.patient_id
    ds.IssuerOfPatientID = f"{who.institution} MRN"
    ds.PatientBirthDate = who.birth_date
    ds.PatientSex = "F" if subject % 2 else "M"
    ds.PatientAge = f"{int(who.study_date[:4]) - int(who.birth_date[:4]):03d}Y"
    ds.PatientWeight = str(50 + subject % 40)
    ds.PatientSize = "1.7"
    ds.PatientAddress = who.address
    ds.PatientTelephoneNumbers = who.phone
    ds.PatientComments = f"{who.given} {who.family} (born {who.birth_date}) lives at {who.address}"
    other = DicomDataset()
    other.PatientID = who.other_id
    other.IssuerOfPatientID = f"{who.institution} legacy"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    referenced = DicomDataset()
    referenced.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.1.1"
    referenced.ReferencedSOPInstanceUID = _uid(seed, subject, "patient-record")
    ds.ReferencedPatientSequence = Sequence([referenced])


def _study_module(ds: DicomDataset, who: SubjectPHI, seed: int, subject: int) -> None:
    ds.StudyInstanceUID = _uid(seed, subject, "study")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = who.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = f"{9 + subject % 8:02d}{subject % 60:02d}15"
    ds.AccessionNumber = who.accession
    ds.StudyID = who.accession[-6:]
    ds.StudyDescription = f"CT ABDOMEN for {who.given} {who.family}"
    ds.ReferringPhysicianName = who.referring
    ds.PerformingPhysicianName = who.performing
    ds.NameOfPhysiciansReadingStudy = who.referring
    ds.OperatorsName = who.operator
    ds.InstitutionName = who.institution
    ds.InstitutionAddress = f"1 Infirmary Lane, {who.address.split(', ')[-1]}"
    ds.StationName = f"CT-{who.family[:6].upper()}"
    request = DicomDataset()
    request.RequestedProcedureID = f"RP{who.accession}"
    request.ScheduledProcedureStepID = f"SPS{who.accession}"
    request.RequestedProcedureDescription = f"Abdomen CT, requested for {who.family}"
    request.AccessionNumber = who.accession
    ds.RequestAttributesSequence = Sequence([request])


def _private_block(ds: DicomDataset, who: SubjectPHI) -> None:
    block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "PN", who.dicom_name)
    block.add_new(0x02, "LO", who.patient_id)
    block.add_new(0x03, "LT", f"Referred by {who.referring} for {who.given} {who.family}, {who.address}")


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1475.1"  # medsynth phantom writer
    meta.ImplementationVersionName = "MEDSYNTH_0_1"
    return meta


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


def _burn_in_text(stored: np.ndarray, who: SubjectPHI, k: int) -> np.ndarray:
    """Burn the patient's name, ID and dates into a slice, as scanners and workstations do.

    Font, size, grey level and corners change from slice to slice (pipeline/demo_text.py), so the
    subject exercises what ingest's text detector must find; ingest must blank every line.
    """
    stored = stored.copy()
    study = who.study_date
    lines = [
        f"{who.family}^{who.given}",
        who.patient_id,
        f"DOB {who.birth_date[:4]}-{who.birth_date[4:6]}-{who.birth_date[6:]}",
        f"{study[6:]}/{study[4:6]}/{study[:4]}",
    ]
    burn_in_identity(stored, lines, k, background=0, bright=4000)
    return stored


def _write_dicom(ds: DicomDataset, target: Path) -> None:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _text_report(who: SubjectPHI, seed: int, subject: int) -> DicomDataset:
    """A Basic Text SR (non-image DICOM) that names the patient in its content: ingest must quarantine it."""
    sop_instance = _uid(seed, subject, "report")
    ds = DicomDataset()
    ds.file_meta = _file_meta(BASIC_TEXT_SR, sop_instance, ExplicitVRLittleEndian)
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = sop_instance
    ds.Modality = "SR"
    _patient_module(ds, who, seed, subject)
    _study_module(ds, who, seed, subject)
    ds.SeriesInstanceUID = _uid(seed, subject, "report-series")
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    item = DicomDataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = f"Findings for {who.given} {who.family} ({who.patient_id}): see images."
    ds.ContentSequence = Sequence([item])
    return ds


# --------------------------------------------------------------------------------------------
# NIfTI writing
# --------------------------------------------------------------------------------------------


def _write_phi_nifti(hu: np.ndarray, affine: np.ndarray, who: SubjectPHI, target: Path) -> None:
    """A NIfTI file with PHI where converters and people leave it: header text fields and an extension."""
    image = nib.Nifti1Image(hu, affine)
    header = image.header
    header["descrip"] = f"{who.family} {who.given} {who.birth_date}".encode()[:79]
    header["aux_file"] = who.patient_id.encode()[:23]
    header["db_name"] = who.accession.encode()[:17]
    header["intent_name"] = who.family.encode()[:15]
    comment = f"patient {who.given} {who.family}, {who.address}, MRN {who.patient_id}".encode()
    image.header.extensions.append(nib.nifti1.Nifti1Extension(6, comment))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    # gzip with mtime=0 so the same seed gives the same bytes.
    payload = gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
    with atomic_path(target) as tmp:
        tmp.write_bytes(payload)


# --------------------------------------------------------------------------------------------
# The cohort
# --------------------------------------------------------------------------------------------


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
    if subjects < 4:
        raise InputError(f"--subjects {subjects}: the cohort needs at least 4 subjects (2 per class). Fix: pass --subjects 4 or more.")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, read-only disk: bad input, not a crash
        raise InputError(
            f"{out}: cannot create the cohort folder ({type(exc).__name__}). Fix: pass a new folder in a writable place."
        ) from None
    rng = np.random.default_rng(seed)
    labels = [LABELS[i % len(LABELS)] for i in range(subjects)]
    rng.shuffle(labels)
    used: set[str] = set()
    identities = [_identity(rng, used) for _ in range(subjects)]
    subject_seeds = rng.integers(0, 2**32, size=subjects)

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
            buffer = io.BytesIO()
            scout.save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
            truncated = out / "dicom" / folder_name / f"scout_{who.patient_id}.dcm"
            truncated.parent.mkdir(parents=True, exist_ok=True)
            truncated.write_bytes(data[: len(data) - len(data) // 3])  # cut inside PixelData
            dicom_files += 1
            broken += 1

    lines = io.StringIO()
    writer = csv.writer(lines, lineterminator="\n")
    writer.writerow(["key", "label"])
    writer.writerows(label_rows)
    atomic_write_text(out / "labels.csv", lines.getvalue())

    planted = sorted({marker for who in identities for marker in who.markers()})
    return CohortSummary(
        out=out,
        subjects=subjects,
        dicom_subjects=n_dicom,
        nifti_subjects=n_nifti,
        dicom_files=dicom_files,
        labels=dict(Counter(labels)),
        burned_in_subjects=burned,
        broken_files=broken,
        planted_phi=planted,
    )
