"""Test inputs for ingest: real DICOM files from pydicom.data with planted marker PHI, and NIfTI."""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

# Every value below is a marker: it must appear nowhere in the output, MLflow or the console.
NAME_FAMILY = "Zorblattix"
NAME_GIVEN = "Quenivere"
PATIENT_ID = "MKPID83920"
OTHER_ID = "MKOTHER5521"
ACCESSION = "MKACC44190"
BIRTH_DATE = "19431107"
STUDY_DATE = "20190312"
STREET = "Marrowquist"
INSTITUTION = "Brandelwick"
REFERRER = "Vantollerby"
REQUEST_TEXT = "MKREQDESC"
SPS_ID = "MKSPS7781"
COMMENT = "MKCOMMENT"
PRIVATE_ID = "MKPRIVID901"
PRIVATE_TEXT = "MKPRIVTEXT"
NESTED_PRIVATE = "MKNESTEDPRIV"
PRIVATE_CREATOR = "MKCREATOR"
FILE_MARK = "MKFILE"
NIFTI_NAME = "MKNIFTI77"
NIFTI_DESCRIP = "MKDESCRIP"
NIFTI_AUX = "MKAUX"
NIFTI_DB = "MKDBNAME"
NIFTI_INTENT = "MKINTENT"
NIFTI_EXTENSION = "MKEXTENSION"
BAD_DATE = "MKBADDATE"  # an invalid DA value: readers warn about it, quoting it

MARKERS = [
    NAME_FAMILY, NAME_GIVEN, PATIENT_ID, OTHER_ID, ACCESSION, BIRTH_DATE, STUDY_DATE, STREET, INSTITUTION,
    REFERRER, REQUEST_TEXT, SPS_ID, COMMENT, PRIVATE_ID, PRIVATE_TEXT, NESTED_PRIVATE, PRIVATE_CREATOR,
    FILE_MARK, NIFTI_NAME, NIFTI_DESCRIP, NIFTI_AUX, NIFTI_DB, NIFTI_INTENT, NIFTI_EXTENSION, BAD_DATE,
]


def uid(*parts: object) -> str:
    return "2.25." + str(int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:30], 16))


def plant_phi(ds: Dataset, who: str = "") -> None:
    """Put marker PHI everywhere real scans carry it (top level, nested, private, free text)."""
    ds.PatientName = f"{NAME_FAMILY}{who}^{NAME_GIVEN}"
    ds.PatientID = PATIENT_ID + who
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientAddress = f"17 {STREET} Lane, Northby"
    ds.InstitutionName = f"Hospital {INSTITUTION}"
    ds.ReferringPhysicianName = f"{REFERRER}^Dr"
    ds.AccessionNumber = ACCESSION
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.add_new(0x00080022, "DA", BAD_DATE)  # AcquisitionDate
    ds.StudyDescription = f"scan of {NAME_FAMILY} {NAME_GIVEN}"
    ds.ImageComments = f"{COMMENT} for {NAME_GIVEN}"
    ds.PatientComments = f"lives at {STREET}"
    other = Dataset()
    other.PatientID = OTHER_ID
    other.IssuerOfPatientID = INSTITUTION
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.RequestedProcedureDescription = f"{REQUEST_TEXT} {NAME_FAMILY}"
    request.ScheduledProcedureStepID = SPS_ID
    request.AccessionNumber = ACCESSION
    nested = request.private_block(0x0013, PRIVATE_CREATOR, create=True)
    nested.add_new(0x01, "LO", NESTED_PRIVATE)
    ds.RequestAttributesSequence = Sequence([request])
    block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "PN", f"{NAME_FAMILY}^{NAME_GIVEN}")
    block.add_new(0x02, "LO", PRIVATE_ID)
    block.add_new(0x03, "LT", f"{PRIVATE_TEXT} referred by {REFERRER}")


def write_series(
    folder: Path,
    base: str,
    slices: int,
    *,
    series: str,
    who: str = "",
    spacing: float | None = None,
    shuffle: bool = True,
    plant: bool = True,
) -> list[Path]:
    """Write ``slices`` copies of a pydicom test file as one series along its slice normal."""
    folder.mkdir(parents=True, exist_ok=True)
    source = pydicom.dcmread(get_testdata_file(base))
    orientation = np.asarray([float(v) for v in source.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.asarray([float(v) for v in source.ImagePositionPatient])
    step = spacing or float(source.get("SliceThickness", 1.0) or 1.0)
    rng = np.random.default_rng(len(series))
    order = rng.permutation(slices) if shuffle else np.arange(slices)
    written = []
    for count, k in enumerate(order):
        ds = pydicom.dcmread(get_testdata_file(base))
        if plant:
            plant_phi(ds, who)
        ds.SeriesInstanceUID = uid(series)
        ds.StudyInstanceUID = uid(series, "study")
        ds.FrameOfReferenceUID = uid(series, "frame")
        ds.SOPInstanceUID = uid(series, int(k))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = int(count) + 1  # deliberately not the spatial order
        ds.ImagePositionPatient = [float(v) for v in origin + normal * step * int(k)]
        if int(k) > 0:
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = uid(series, int(k) - 1)
            ds.ReferencedImageSequence = Sequence([ref])
        # also change the pixels per slice so ordering errors show
        pixels = ds.pixel_array.copy()
        pixels[0, 0] = int(k)
        ds.PixelData = pixels.tobytes()
        target = folder / f"{FILE_MARK}_{who}{int(k):03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def write_phi_nifti(target: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file with marker PHI in descrip, aux_file, db_name, intent_name and a comment extension."""
    rng = np.random.default_rng(seed)
    data = rng.integers(-1000, 1000, size=(12, 10, 6)).astype(np.int16)
    affine = np.diag([-1.5, -1.5, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    image = nib.Nifti1Image(data, affine)
    header = image.header
    header["descrip"] = f"{NIFTI_DESCRIP} {NAME_FAMILY} {BIRTH_DATE}".encode()
    header["aux_file"] = NIFTI_AUX.encode()
    header["db_name"] = NIFTI_DB.encode()
    header["intent_name"] = NIFTI_INTENT.encode()
    header.extensions.append(nib.nifti1.Nifti1Extension(6, f"{NIFTI_EXTENSION} {STREET} {PATIENT_ID}".encode()))
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, target)
    return data, affine


def copy_all_testdata(target: Path) -> int:
    """Copy every file pydicom ships for its tests (folder structure kept); returns the count."""
    base = Path(get_testdata_file("CT_small.dcm")).parent
    count = 0
    for name in pydicom.data.get_testdata_files():
        path = Path(name)
        if not path.is_file():
            continue
        try:
            rel = path.relative_to(base)
        except ValueError:
            rel = Path(path.name)
        destination = target / "pydicom" / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        count += 1
    return count


def all_markers() -> list[str]:
    """Markers plus their DICOM-style upper-case forms."""
    return sorted({marker for item in MARKERS for marker in (item, item.upper())})


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {
        os.path.relpath(path, root): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
