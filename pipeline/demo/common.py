"""What every phantom family shares: fake identities, the PHI-carrying DICOM modules, writers.

Every subject of every family carries fake PHI in the places real scans carry it (see
:data:`PHI_PLACES`), all drawn from a seeded generator, so the anonymization and the leak audit
have real work to do. The families (``ct_abdomen``, ``mr_brain``, ``xray_chest``) draw anatomy
and encode pixels; this module draws who the subject is, writes it where headers and files hold
it, and runs the cohort loop every family shares (:func:`write_cohort` with a family's :class:`Family`).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline.core.errors import InputError
from pipeline.core.files import atomic_path, atomic_write_text
from pipeline.demo.text import burn_in_identity

__all__ = [
    "PHI_PLACES",
    "PRIVATE_CREATOR",
    "phantom_affine",
    "check_label",
    "centred_axes",
    "SubjectPHI",
    "CohortSummary",
    "CohortPlan",
    "plan_cohort",
    "write_labels",
    "write_truncated",
    "Subject",
    "SeriesTemplate",
    "image_dataset",
    "axial_slice",
    "pixel_module",
    "Scan",
    "SliceWriter",
    "axial_series",
    "Family",
    "write_cohort",
]

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
    family: str = "ct-abdomen"

    def lines(self) -> list[str]:
        label_text = ", ".join(f"{count} {label}" for label, count in sorted(self.labels.items()))
        named = "" if self.family == "ct-abdomen" else f" ({self.family})"
        runs = "demo" if self.family == "ct-abdomen" else self.family
        return [
            f"Phantom cohort{named} written to {self.out}",
            f"  {self.subjects} subjects ({label_text}): {self.dicom_subjects} as DICOM series "
            f"({self.dicom_files} files), {self.nifti_subjects} as NIfTI",
            f"  planted for ingest to handle: fake PHI in headers, sequences, private tags and file names; "
            f"{self.burned_in_subjects} subject with BurnedInAnnotation=YES; {self.broken_files} broken files",
            "  labels: labels.csv (key,label)",
            "Next step:",
            f"  medsynth ingest --source {self.out / 'dicom'} --source {self.out / 'nifti'} "
            f"--labels {self.out / 'labels.csv'} --out runs/{runs}/ingested",
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


def check_label(label: str, labels: tuple[str, ...]) -> None:
    """Refuse a class the family does not draw.

    Raises:
        InputError: ``label`` is not one of ``labels``.
    """
    if label not in labels:
        raise InputError(f"phantom label {label!r} is not one of {', '.join(labels)}.")


def centred_axes(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm along each axis, 0 at the centre of the field of view."""
    return [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]


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


def _uid(seed: int | str, *parts: object) -> str:
    """A deterministic 2.25 UID from the seed and a path of names: same seed, same bytes."""
    # pydicom's generate_uid(prefix=None) ignores its entropy and draws a random UUID, so the
    # 2.25 form (a 128-bit integer) is built here from a hash instead.
    text = "/".join(["medsynth-phantom", str(seed), *map(str, parts)])
    return f"2.25.{int(hashlib.sha256(text.encode()).hexdigest()[:32], 16)}"


def _patient_module(ds: DicomDataset, who: SubjectPHI, seed: int | str, subject: int) -> None:
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


def _study_module(ds: DicomDataset, who: SubjectPHI, seed: int | str, subject: int, procedure: tuple[str, str, str]) -> None:
    """General study and equipment attributes; ``procedure`` is (modality, body part, body part in prose)."""
    modality, part, prose = procedure
    ds.StudyInstanceUID = _uid(seed, subject, "study")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = who.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = f"{9 + subject % 8:02d}{subject % 60:02d}15"
    ds.AccessionNumber = who.accession
    ds.StudyID = who.accession[-6:]
    ds.StudyDescription = f"{modality} {part} for {who.given} {who.family}"
    ds.ReferringPhysicianName = who.referring
    ds.PerformingPhysicianName = who.performing
    ds.NameOfPhysiciansReadingStudy = who.referring
    ds.OperatorsName = who.operator
    ds.InstitutionName = who.institution
    ds.InstitutionAddress = f"1 Infirmary Lane, {who.address.split(', ')[-1]}"
    ds.StationName = f"{modality}-{who.family[:6].upper()}"
    request = DicomDataset()
    request.RequestedProcedureID = f"RP{who.accession}"
    request.ScheduledProcedureStepID = f"SPS{who.accession}"
    request.RequestedProcedureDescription = f"{prose} {modality}, requested for {who.family}"
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


def _burn_in_text(stored: np.ndarray, who: SubjectPHI, k: int, bright: int = 4000) -> np.ndarray:
    """Burn the patient's name, ID and dates into a slice, as scanners and workstations do.

    Font, size, grey level and corners change from slice to slice (pipeline/demo/text.py), so the
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
    burn_in_identity(stored, lines, k, background=0, bright=bright)
    return stored


def _write_dicom(ds: DicomDataset, target: Path) -> None:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _text_report(who: SubjectPHI, seed: int | str, subject: int, procedure: tuple[str, str, str]) -> DicomDataset:
    """A Basic Text SR (non-image DICOM) that names the patient in its content: ingest must quarantine it."""
    sop_instance = _uid(seed, subject, "report")
    ds = DicomDataset()
    ds.file_meta = _file_meta(BASIC_TEXT_SR, sop_instance, ExplicitVRLittleEndian)
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = sop_instance
    ds.Modality = "SR"
    _patient_module(ds, who, seed, subject)
    _study_module(ds, who, seed, subject, procedure)
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
# The image modules every family writes the same way
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """One subject as the DICOM writers see it: its place in the cohort, who it is, its UID seed."""

    index: int
    who: SubjectPHI
    uid_seed: int | str  # CohortPlan.uid_seed: distinct per family


@dataclass(frozen=True)
class SeriesTemplate:
    """What a family's scanner writes into every image of a series, whoever the subject is."""

    sop_class: str
    procedure: tuple[str, str, str]  # (modality, body part, body part in prose)
    model: str
    image_type: tuple[str, ...]
    number: int
    description: str  # the subject's family name follows it, as technologists type it


def image_dataset(series: SeriesTemplate, subject: Subject, instance: tuple[object, ...]) -> DicomDataset:
    """A new image with file meta, SOP, equipment, patient, study, private and series attributes.

    What is left to the family is the image's own part: instance, geometry and pixel modules.

    Args:
        series: the family's series attributes.
        subject: whose image it is.
        instance: the image's name inside the series (``("slice", k)``): it derives the SOP
            Instance UID, so the same name in the same cohort gives the same UID.

    Returns:
        The dataset, written in explicit VR little endian unless the caller changes it.
    """
    who, seed, index = subject.who, subject.uid_seed, subject.index
    sop_instance = _uid(seed, index, "series", *instance)
    ds = DicomDataset()
    ds.file_meta = _file_meta(series.sop_class, sop_instance, ExplicitVRLittleEndian)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(series.image_type)
    ds.SOPClassUID = series.sop_class
    ds.SOPInstanceUID = sop_instance
    ds.Modality = series.procedure[0]
    ds.Manufacturer = "Medsynth Phantom Works"
    ds.ManufacturerModelName = series.model
    ds.DeviceSerialNumber = f"SN{who.patient_id[-5:]}"
    ds.SoftwareVersions = "0.1"
    _patient_module(ds, who, seed, index)
    _study_module(ds, who, seed, index, series.procedure)
    _private_block(ds, who)
    ds.SeriesInstanceUID = _uid(seed, index, "series")
    ds.SeriesNumber = series.number
    ds.SeriesDescription = f"{series.description} {who.family}"
    ds.BodyPartExamined = series.procedure[1]
    return ds


def axial_slice(
    ds: DicomDataset,
    subject: Subject,
    k: int,
    z: float,
    matrix: tuple[int, int],
    spacing: tuple[float, float, float],
    position: str,
) -> None:
    """Instance and plane attributes of slice ``k`` of an axial series (geometry: module docstring).

    Args:
        ds: the slice's dataset (from :func:`image_dataset`).
        subject: whose slice it is.
        k: the slice's index from inferior to superior.
        z: the slice's position along the body axis in mm.
        matrix: the slice's size ``(x, y)`` = (columns, rows).
        spacing: voxel size in mm along x, y, z.
        position: PatientPosition (``HFS``, ``FFS``).
    """
    nx, ny = matrix
    sx, sy, sz = spacing
    who = subject.who
    ds.FrameOfReferenceUID = _uid(subject.uid_seed, subject.index, "frame")
    ds.InstanceNumber = k + 1
    ds.ImageComments = f"slice {k + 1} of {who.given} {who.family}"
    ds.PatientPosition = position
    # The slab is centred on the isocentre in x and y: the first voxel's centre lies half a field of view off.
    ds.ImagePositionPatient = [-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [sy, sx]  # row spacing (between rows), column spacing
    ds.SliceThickness = sz
    ds.SpacingBetweenSlices = sz
    ds.SliceLocation = z


def pixel_module(
    ds: DicomDataset,
    stored: np.ndarray,
    bits_stored: int,
    burned_in: bool,
    who: SubjectPHI,
    k: int,
    bright: int | None = None,
    photometric: str = "MONOCHROME2",
) -> None:
    """The image pixel module of an unsigned grey image, with the identity burned in if asked.

    Args:
        ds: the image's dataset.
        stored: the stored values as ``rows x columns`` uint16 (the family's encoding applied).
        bits_stored: how many of the 16 allocated bits hold the values.
        burned_in: whether the subject's identity is burned into the pixels (and the header says so).
        who: the subject, whose identity is burned in.
        k: the image's index: the burned-in layout changes with it.
        bright: grey level of the burned-in text; None: the image's brightest value, so the text
            stands out whatever the scale of the family's values.
        photometric: PhotometricInterpretation of ``stored``.
    """
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    if burned_in:
        stored = _burn_in_text(stored, who, k, bright=int(stored.max()) if bright is None else bright)
    ds.PixelData = stored.tobytes()


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
# The cohort scaffolding
# --------------------------------------------------------------------------------------------


@dataclass
class CohortPlan:
    """Who is in a cohort and with which label, drawn before any pixel (same seed, same plan)."""

    out: Path
    labels: list[str]
    identities: list[SubjectPHI]
    subject_seeds: np.ndarray
    uid_seed: int | str  # what the DICOM UIDs derive from: distinct per family, so two cohorts never share a UID

    def counts(self) -> dict[str, int]:
        """Subjects per label."""
        return dict(Counter(self.labels))

    def planted(self) -> list[str]:
        """Every planted PHI string of the cohort, sorted."""
        return sorted({marker for who in self.identities for marker in who.markers()})


def plan_cohort(out: str | Path, subjects: int, seed: int, labels: tuple[str, ...], stream: int = 0) -> CohortPlan:
    """Create ``out`` and draw balanced, shuffled labels, identities and per-subject seeds.

    Args:
        out: output folder (created).
        subjects: number of subjects (at least 4: two per class).
        seed: the cohort's seed.
        labels: the family's two class names.
        stream: the family's random stream: other families draw other people and other UIDs
            from the same seed (0, the CT family's, keeps the original cohort's bytes).

    Raises:
        InputError: too few subjects, or a folder that cannot be created.
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
    rng = np.random.default_rng(seed if stream == 0 else [seed, stream])
    drawn = [labels[i % len(labels)] for i in range(subjects)]
    rng.shuffle(drawn)
    used: set[str] = set()
    identities = [_identity(rng, used) for _ in range(subjects)]
    subject_seeds = rng.integers(0, 2**32, size=subjects)
    uid_seed = seed if stream == 0 else f"{seed}/{stream}"
    return CohortPlan(out=out, labels=drawn, identities=identities, subject_seeds=subject_seeds, uid_seed=uid_seed)


def write_labels(out: Path, rows: list[tuple[str, str]]) -> None:
    """``out/labels.csv`` with the columns ``key,label``."""
    lines = io.StringIO()
    writer = csv.writer(lines, lineterminator="\n")
    writer.writerow(["key", "label"])
    writer.writerows(rows)
    atomic_write_text(out / "labels.csv", lines.getvalue())


def write_truncated(ds: DicomDataset, target: Path) -> None:
    """Write ``ds`` cut inside its PixelData: a file ingest must quarantine as undecodable."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: len(data) - len(data) // 3])


# --------------------------------------------------------------------------------------------
# The cohort loop every family runs
# --------------------------------------------------------------------------------------------

_REPORT_SUBJECT = 0  # gets a Basic Text SR naming the patient
_TRUNCATED_SUBJECT = 2  # gets an extra image cut inside its pixels


@dataclass(frozen=True)
class Scan:
    """One subject's drawn phantom and how its family turns it into files."""

    volume: np.ndarray  # what the NIfTI file holds, indexed [x, y(, z)]
    affine: np.ndarray  # its RAS affine
    files: tuple[str, ...]  # the DICOM images' paths, relative to the subject's folder
    image: Callable[[int, bool], DicomDataset]  # image k, with the identity burned in or not


SliceWriter = Callable[[np.ndarray, int, float, Subject, tuple[float, float, float], bool], DicomDataset]
"""Writes one axial slice: ``(values[x, y], k, z, subject, spacing, burned_in) -> dataset``."""


def axial_series(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    z0: float,
    subject: Subject,
    modality: str,
    write_slice: SliceWriter,
    implicit: bool = False,
) -> Scan:
    """A slab written as one DICOM file per axial slice, slice ``k`` at ``z0 + k * dz``.

    Args:
        volume: the slab, indexed ``[x, y, z]``.
        spacing: voxel size in mm along x, y, z.
        z0: the first slice's position along the body axis in mm (the table position).
        subject: whose slab it is.
        modality: names the series folder, as PACS exports do.
        write_slice: the family's slice writer.
        implicit: write implicit VR little endian files without a file extension, as some PACS
            exports do, so that ingest must read both kinds.

    Returns:
        The subject's :class:`Scan`.
    """
    who = subject.who

    def image(k: int, burned_in: bool) -> DicomDataset:
        ds = write_slice(volume[:, :, k], k, z0 + k * spacing[2], subject, spacing, burned_in)
        if implicit:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        return ds

    suffix = "" if implicit else ".dcm"
    files = tuple(f"{modality}_{who.accession}/{who.patient_id}_{k:03d}{suffix}" for k in range(volume.shape[2]))
    return Scan(volume=volume, affine=phantom_affine(spacing, volume.shape, z0), files=files, image=image)


@dataclass(frozen=True)
class Family:
    """What makes a phantom family: its classes, random stream, procedure and phantom."""

    name: str  # as ``--family`` spells it
    labels: tuple[str, ...]  # (normal, finding): the burned-in subject is the first finding in DICOM
    stream: int  # see plan_cohort
    procedure: tuple[str, str, str]  # of the text report (see SeriesTemplate)
    extra: str  # what the truncated extra image is (scout, localizer, ...): its file name and UIDs
    scan: Callable[[np.random.Generator, str, Subject], Scan]  # draws one subject from its own generator


def _as_nifti(index: int) -> bool:
    """Every fifth subject is written as NIfTI, so ingest meets both formats in one cohort."""
    return index % 5 == 4


def _write_broken(family: Family, scan: Scan, subject: Subject, folder: Path) -> int:
    """Write the subject's files that ingest must quarantine (if it is one that gets any); return how many."""
    who, seed, index = subject.who, subject.uid_seed, subject.index
    if index == _REPORT_SUBJECT:
        _write_dicom(_text_report(who, seed, index, family.procedure), folder / f"report_{who.family}.dcm")
        return 1
    if index == _TRUNCATED_SUBJECT:
        extra = scan.image(0, False)
        # Its own series and instance, so that it is a separate (broken) image, not a duplicate of image 0.
        extra.SeriesInstanceUID = _uid(seed, index, family.extra)
        extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = _uid(seed, index, family.extra, 0)
        write_truncated(extra, folder / f"{family.extra}_{who.patient_id}.dcm")
        return 1
    return 0


def write_cohort(out: str | Path, subjects: int, seed: int, family: Family) -> CohortSummary:
    """Write ``family``'s cohort to ``out``: ``dicom/``, ``nifti/``, ``labels.csv``.

    Every fifth subject is written as NIfTI, the rest as DICOM. The first subject with the finding
    written as DICOM carries ``BurnedInAnnotation=YES`` with glyphs in its pixels; subject 0 gets
    a Basic Text SR and subject 2 a truncated extra image.

    Args:
        out: output folder (created; existing phantom files are overwritten).
        subjects: number of subjects (at least 4).
        seed: seed of every random choice: same seed, same bytes.
        family: the family's phantom and attributes.

    Returns:
        A :class:`CohortSummary`; its ``planted_phi`` lists every planted PHI string.

    Raises:
        InputError: too few subjects, or a folder that cannot be created.
    """
    plan = plan_cohort(out, subjects, seed, family.labels, family.stream)
    finding = family.labels[1]
    burned_subject = next(i for i, label in enumerate(plan.labels) if label == finding and not _as_nifti(i))
    label_rows: list[tuple[str, str]] = []
    dicom_files = broken = burned = n_nifti = 0
    for index, (who, label) in enumerate(zip(plan.identities, plan.labels)):
        subject = Subject(index=index, who=who, uid_seed=plan.uid_seed)
        scan = family.scan(np.random.default_rng(plan.subject_seeds[index]), label, subject)
        folder_name = f"{who.family}_{who.given}_{who.patient_id}"
        if _as_nifti(index):
            n_nifti += 1
            relative = f"{folder_name}.nii.gz"
            _write_phi_nifti(scan.volume, scan.affine, who, plan.out / "nifti" / relative)
            label_rows.append((relative, label))
            continue
        label_rows.append((who.patient_id, label))
        folder = plan.out / "dicom" / folder_name
        is_burned = index == burned_subject
        burned += is_burned
        for k, relative in enumerate(scan.files):
            _write_dicom(scan.image(k, is_burned), folder / relative)
        written_broken = _write_broken(family, scan, subject, folder)
        dicom_files += len(scan.files) + written_broken
        broken += written_broken
    write_labels(plan.out, label_rows)
    return CohortSummary(
        out=plan.out,
        subjects=subjects,
        dicom_subjects=subjects - n_nifti,
        nifti_subjects=n_nifti,
        dicom_files=dicom_files,
        labels=plan.counts(),
        burned_in_subjects=burned,
        broken_files=broken,
        planted_phi=plan.planted(),
        family=family.name,
    )
