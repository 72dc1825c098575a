"""Synthetic images as DICOM: new UIDs, DERIVED\\SECONDARY, marked SYNTHETIC, no patient data.

One synthetic image becomes one DICOM series (one file per axial slice), so a viewer never stacks
two unrelated synthetic images into one volume. CT images use the CT Image Storage SOP class
(viewers then apply HU windows and geometry as for any CT); other modalities use Secondary
Capture with ConversionType ``SYN`` (PS3.3 C.8.6.1: "Synthetic Image").

Every file says it is synthetic four times over: ImageType ``DERIVED\\SECONDARY``, a
SeriesDescription starting with ``SYNTHETIC``, a DerivationDescription naming the generator run,
and the patient pseudonym ``SYNTHETIC`` (PatientName and PatientID, nothing else about a patient).
The texts come from :mod:`pipeline.contracts.synthetic`, which the leak audit reads too.

UIDs are derived from the configured root and the image's content (its checksum, sample id and
generator run), so re-exporting the same synthetic image gives the same UIDs and different images
never share one. Under the default root ``2.25`` they are name-based UUIDs (ISO/IEC 9834-8).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from pipeline.contracts.synthetic import (
    DEIDENTIFICATION_METHOD,
    IMAGE_COMMENTS,
    PATIENT_PSEUDONYM,
    STUDY_DESCRIPTION,
    derivation_description,
    series_description,
)
from pipeline.core.files import atomic_path

__all__ = ["SyntheticImageInfo", "synthetic_uid", "write_synthetic_series", "PATIENT_PSEUDONYM"]

# A fixed namespace for the name-based UUIDs under 2.25 (any constant works; this one is ours).
_UUID_NAMESPACE = uuid.UUID("6f0b7e3a-2c1d-5e4f-9a8b-7c6d5e4f3a2b")
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_INT16 = np.iinfo(np.int16)
_UINT16_MAX = float(np.iinfo(np.uint16).max)


@dataclass(frozen=True)
class SyntheticImageInfo:
    """What the DICOM files of one synthetic image say about it (no patient data: there is none).

    Attributes:
        sample_id: the synthetic sample id (from the synthetic manifest).
        label: the class the generator was conditioned on.
        generator_run_id: MLflow run id of the generate stage that drew it.
        seed: the generate seed.
        model_digest: digest of the generator checkpoint.
        sha256: checksum of the exported NIfTI file (UIDs derive from it).
        modality: DICOM Modality (``CT`` gives CT Image Storage; anything else Secondary Capture).
        series_number: SeriesNumber within the export's synthetic study.
        study_uid: StudyInstanceUID shared by all synthetic images of one export.
        window: CT window [low, high] in HU for the default display (None: none written).
    """

    sample_id: str
    label: str
    generator_run_id: str
    seed: str
    model_digest: str
    sha256: str
    modality: str
    series_number: int
    study_uid: str
    window: tuple[float, float] | None = None


def synthetic_uid(root: str, *parts: str) -> str:
    """A UID under ``root`` derived from ``parts`` (same parts, same UID).

    Under ``2.25`` the suffix is the integer form of a name-based (SHA-1, version 5) UUID, as
    ISO/IEC 9834-8 prescribes for that arc; under any other root, pydicom's SHA-512-derived suffix.
    """
    name = "|".join(parts)
    if root == "2.25":
        return f"2.25.{uuid.uuid5(_UUID_NAMESPACE, name).int}"
    return str(generate_uid(prefix=f"{root}.", entropy_srcs=[name]))


def _medsynth_version() -> str:
    try:
        return metadata.version("medsynth")
    except metadata.PackageNotFoundError:
        return "unknown"


def _geometry(affine: np.ndarray) -> tuple[list[float], list[float], np.ndarray, float]:
    """(ImageOrientationPatient, PixelSpacing, LPS affine, slice thickness) of a NIfTI affine.

    NIfTI voxel ``[i, j, k]`` becomes pixel (row ``j``, column ``i``) of slice ``k``: moving along a
    row increases ``i``, so the row direction cosine is the affine's first column.
    """
    lps = _LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    zooms = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    zooms = np.where(zooms > 0, zooms, 1.0)
    row_cosine = lps[:3, 0] / zooms[0]
    column_cosine = lps[:3, 1] / zooms[1]
    orientation = [float(round(value, 6)) + 0.0 for value in (*row_cosine, *column_cosine)]
    pixel_spacing = [float(zooms[1]), float(zooms[0])]  # (between rows, between columns)
    return orientation, pixel_spacing, lps, float(zooms[2])


def _pixels(volume: np.ndarray, modality: str) -> tuple[np.ndarray, float, float, int, str]:
    """Stored integers with (slope, intercept, pixel representation, rescale type).

    CT: signed 16-bit HU, slope 1. Other modalities have no absolute unit: the volume's range is
    mapped linearly onto unsigned 16 bits and the rescale recovers the stored values.
    """
    if modality == "CT":
        stored = np.clip(np.rint(volume), _INT16.min, _INT16.max).astype(np.int16)
        return stored, 1.0, 0.0, 1, "HU"
    low, high = float(np.min(volume)), float(np.max(volume))
    slope = float(format_number_as_ds((high - low) / _UINT16_MAX)) if high > low else 1.0
    intercept = float(format_number_as_ds(low))
    stored = np.clip(np.rint((volume - intercept) / slope), 0, _UINT16_MAX).astype(np.uint16)
    return stored, slope, intercept, 0, "US"


def write_synthetic_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike[str],
    info: SyntheticImageInfo,
    uid_root: str,
) -> list[Path]:
    """Write one synthetic image as a DICOM series, one file per axial slice (``IM0001.dcm``, ...).

    Args:
        volume: the image in modality units (HU for CT), indexed like its NIfTI file; 2D images
            are (H, W, 1) volumes.
        affine: its NIfTI (RAS) affine.
        out_dir: the series folder (created).
        info: what the files say about the image.
        uid_root: the UID root (see :func:`synthetic_uid`).

    Returns:
        The written files, in slice order.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim == 2:
        volume = volume[:, :, None]
    out_dir = Path(out_dir)
    modality = info.modality.upper() or "OT"
    is_ct = modality == "CT"
    orientation, pixel_spacing, lps, thickness = _geometry(affine)
    stored, slope, intercept, representation, rescale_type = _pixels(volume, modality)
    series_uid = synthetic_uid(uid_root, "series", info.generator_run_id, info.sample_id, info.sha256)
    frame_uid = synthetic_uid(uid_root, "frame", info.generator_run_id, info.sample_id, info.sha256)
    derivation = derivation_description(info.generator_run_id, info.seed, info.model_digest, info.label, info.sample_id)
    written: list[Path] = []
    for k in range(volume.shape[2]):
        instance_uid = synthetic_uid(uid_root, "instance", info.generator_run_id, info.sample_id, info.sha256, str(k))
        position = (lps @ np.array([0.0, 0.0, float(k), 1.0]))[:3]
        ds = DicomDataset()
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: class labels are user text
        ds.SOPClassUID = CTImageStorage if is_ct else SecondaryCaptureImageStorage
        ds.SOPInstanceUID = instance_uid
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"] if is_ct else ["DERIVED", "SECONDARY"]
        # Patient: the pseudonym only; the type 2 attributes are present and empty.
        ds.PatientName = PATIENT_PSEUDONYM
        ds.PatientID = PATIENT_PSEUDONYM
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
        # Study and series.
        ds.StudyInstanceUID = info.study_uid
        ds.StudyDate = ""
        ds.StudyTime = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = ""
        ds.AccessionNumber = ""
        ds.StudyDescription = STUDY_DESCRIPTION
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = info.series_number
        ds.SeriesDescription = series_description(info.label, info.sample_id)
        ds.DerivationDescription = derivation
        ds.ImageComments = IMAGE_COMMENTS
        # Equipment: the generator is the "device".
        ds.Manufacturer = "medsynth"
        ds.ManufacturerModelName = "medsynth conditional GAN"
        ds.SoftwareVersions = _medsynth_version()
        if not is_ct:
            ds.ConversionType = "SYN"
        # Frame of reference and image plane.
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [format_number_as_ds(value) for value in orientation]
        ds.ImagePositionPatient = [format_number_as_ds(float(value)) for value in position]
        ds.PixelSpacing = [format_number_as_ds(value) for value in pixel_spacing]
        ds.SliceThickness = format_number_as_ds(thickness)
        ds.SliceLocation = format_number_as_ds(float(position[2]))
        ds.InstanceNumber = k + 1
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        if is_ct:
            ds.KVP = ""
            ds.AcquisitionNumber = ""
        # Image pixel.
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = representation
        ds.RescaleIntercept = format_number_as_ds(intercept)
        ds.RescaleSlope = format_number_as_ds(slope)
        ds.RescaleType = rescale_type
        if is_ct and info.window is not None:
            low, high = info.window
            ds.WindowCenter = format_number_as_ds((low + high) / 2.0)
            ds.WindowWidth = format_number_as_ds(high - low)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = instance_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        target = out_dir / f"IM{k + 1:04d}.dcm"
        with atomic_path(target) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        written.append(target)
    return written
