"""The phantom cohort: real DICOM series with intended geometry, NIfTI, labels, planted PHI, determinism."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from pipeline.demo import LABELS, make_cohort, phantom_volume


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("cohort")
    return make_cohort(out, subjects=8, seed=3)


def _series(root: Path) -> dict[str, list[pydicom.Dataset]]:
    series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for path in sorted((root / "dicom").rglob("*")):
        if path.is_file():
            try:
                ds = pydicom.dcmread(path)
                ds.pixel_array  # noqa: B018 - the truncated scout fails here
            except Exception:
                continue
            if ds.SOPClassUID == pydicom.uid.CTImageStorage:
                series[ds.SeriesInstanceUID].append(ds)
    return series


def test_dicom_series_assemble_into_volumes_with_intended_geometry(cohort) -> None:
    series = _series(cohort.out)
    assert len(series) == cohort.dicom_subjects
    for slices in series.values():
        slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
        assert len(slices) == 16
        first = slices[0]
        assert first.SOPClassUID == pydicom.uid.CTImageStorage
        assert list(map(float, first.ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0]
        assert list(map(float, first.PixelSpacing)) == [2.5, 2.5]
        steps = np.diff([float(ds.ImagePositionPatient[2]) for ds in slices])
        assert np.allclose(steps, float(first.SliceThickness))
        assert len({ds.SOPInstanceUID for ds in slices}) == 16
        assert len({ds.StudyInstanceUID for ds in slices}) == 1
        volume = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices], -1)
        assert volume.shape == (128, 128, 16)
        assert volume.min() <= -900  # air outside the body
        assert 400 <= volume.max() <= 4000  # bone (or burned-in glyphs)
        body = volume[volume > -500]
        assert -150 < np.median(body) < 100  # soft tissue


def test_planted_phi_is_in_headers_sequences_private_tags_and_names(cohort) -> None:
    series = _series(cohort.out)
    ds = next(iter(series.values()))[0]
    assert str(ds.PatientName) and ds.PatientID.startswith("MRN")
    assert ds.PatientBirthDate and ds.PatientAddress and ds.InstitutionName and ds.AccessionNumber
    assert ds.ReferringPhysicianName and ds.OperatorsName
    assert str(ds.PatientName).split("^")[0] in ds.StudyDescription
    assert ds.OtherPatientIDsSequence[0].PatientID.startswith("OID")
    assert ds.RequestAttributesSequence[0].AccessionNumber == ds.AccessionNumber
    block = ds.private_block(0x0011, "MEDSYNTH PHANTOM PHI")
    assert block[0x02].value == ds.PatientID
    assert any(ds.PatientID in str(p) for p in (cohort.out / "dicom").rglob("*"))
    assert ds.PatientID in cohort.planted_phi and ds.AccessionNumber in cohort.planted_phi
    burned = [s for s in series.values() if s[0].BurnedInAnnotation == "YES"]
    assert len(burned) == cohort.burned_in_subjects == 1


def test_nifti_subjects_carry_phi_in_header_and_extension(cohort) -> None:
    files = sorted((cohort.out / "nifti").glob("*.nii.gz"))
    assert len(files) == cohort.nifti_subjects >= 1
    image = nib.load(files[0])
    descrip = image.header["descrip"].tobytes().decode().strip("\x00")
    assert any(marker in descrip for marker in cohort.planted_phi)
    assert image.header["aux_file"].tobytes().decode().strip("\x00").startswith("MRN")
    assert image.header.extensions and image.header.extensions[0].get_code() == 6
    assert image.shape == (128, 128, 16)
    assert np.allclose(np.abs(np.diag(image.affine)[:3]), [2.5, 2.5, 4.0])


def test_labels_csv_covers_every_subject_with_two_classes(cohort) -> None:
    labels = pd.read_csv(cohort.out / "labels.csv", dtype=str)
    assert list(labels.columns) == ["key", "label"]
    assert len(labels) == 8
    assert set(labels["label"]) == set(LABELS)
    nifti_keys = {p.name for p in (cohort.out / "nifti").glob("*.nii.gz")}
    assert nifti_keys <= set(labels["key"])


def test_broken_files_are_there_for_quarantine(cohort) -> None:
    kinds = []
    for path in (cohort.out / "dicom").rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds:
                kinds.append("non-image")
            else:
                ds.pixel_array  # noqa: B018
        except Exception:
            kinds.append("broken")
    assert sorted(kinds) == ["broken", "non-image"]


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    first = make_cohort(tmp_path / "a", subjects=5, seed=11)
    make_cohort(tmp_path / "b", subjects=5, seed=11)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    other = make_cohort(tmp_path / "c", subjects=5, seed=12)
    assert set(first.planted_phi) != set(other.planted_phi)


def test_lesion_class_differs_visibly_in_the_liver() -> None:
    rng = np.random.default_rng(0)
    normal, _ = phantom_volume(rng, "normal")
    lesion, _ = phantom_volume(rng, "lesion")
    # The lesion is a hypodense spot: a low-HU region inside soft tissue on every slice.
    for k in range(lesion.shape[2]):
        soft = lesion[:, :, k]
        assert ((soft > -20) & (soft < 10)).sum() > 30


def test_cli_writes_cohort_and_prints_next_step(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo-data", str(tmp_path / "c"), "--subjects", "4", "--seed", "1"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "medsynth ingest" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "pipeline", "demo-data", str(tmp_path / "d"), "--subjects", "2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
