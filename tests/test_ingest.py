"""Ingest end to end on real pydicom test files with planted PHI: no leak, faithful pixels, stable UIDs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from _ingest_data import (
    BIRTH_DATE,
    MARKERS,
    NAME_FAMILY,
    PATIENT_ID,
    STUDY_DATE,
    all_markers,
    copy_all_testdata,
    uid,
    write_phi_nifti,
    write_series,
)
from conftest import REPO, scan_for_markers
from pipeline.cli import main
from pipeline.contracts.dataset import read_dataset
from pipeline.ingest import IngestConfig, audit, run
from pipeline.ingest.keys import keyed_uid

PYTHON = sys.executable


def _cohort(root: Path) -> Path:
    """SOURCE/<label>/<patient folder>/...: two DICOM series and one NIfTI, all carrying markers."""
    source = root / "source"
    write_series(source / "normal" / f"{NAME_FAMILY}_{PATIENT_ID}" / "CT", "CT_small.dcm", 4, series="ct-1")
    write_series(source / "lesion" / f"{NAME_FAMILY}B_{PATIENT_ID}B" / "MR", "MR_small.dcm", 3, series="mr-1", who="B")
    write_phi_nifti(source / "lesion" / f"Quenivere_{'MKNIFTI77'}.nii.gz")
    return source


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out + captured.err


def test_ingest_leaks_no_marker_anywhere(tmp_path: Path, mlflow_store: Path, capfd: pytest.CaptureFixture[str]) -> None:
    source = _cohort(tmp_path)
    out = tmp_path / "dataset"
    # capfd: the workers' stderr too (a reader's warning could quote a header value)
    code, console = _cli(["ingest", "--source", str(source), "--out", str(out), "--workers", "2"], capfd)
    assert code == 0, console
    assert "Ingested 3 of 3 series" in console

    markers = all_markers()
    assert scan_for_markers(out, markers) == []
    assert scan_for_markers(mlflow_store, markers) == []
    leaked = [marker for marker in markers if marker.lower() in console.lower()]
    assert leaked == []
    assert str(source) not in console
    # The private folder sits beside the dataset and holds the key and the source map.
    private = tmp_path / "dataset.private"
    assert (private / "pseudonym.key").is_file() and (private / "source_map.csv").is_file()
    assert not (out / "pseudonym.key").exists()

    dataset = read_dataset(out)
    assert sorted(dataset.manifest["label"]) == ["lesion", "lesion", "normal"]
    assert set(dataset.manifest["origin"]) == {"real"}
    for rel in dataset.manifest["path"]:
        assert rel.startswith("images/sub-") and "MK" not in rel
    # every written DICOM re-reads and says it was de-identified
    dicoms = sorted((out / "dicom").rglob("*.dcm"))
    assert len(dicoms) == 7
    for path in dicoms:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.PatientID.startswith("sub-")
        assert "OtherPatientIDsSequence" not in ds and "RequestAttributesSequence" not in ds
        assert not any(elem.tag.is_private for elem in ds.iterall())
        assert {item.CodeValue for item in ds.DeidentificationMethodCodeSequence} == {"113100", "113107"}
        assert ds.StudyDate != STUDY_DATE and len(ds.StudyDate) == 8
        ds.pixel_array  # noqa: B018 - decodes
    # the audit log names rules and tags, never values
    log = (out / "audit.jsonl").read_text()
    assert '"keyword": "PatientName"' in log and NAME_FAMILY.lower() not in log.lower()
    # MLflow got counts and the dataset, nothing identifying (checked above by the scan)
    from pipeline.tracking import list_runs

    run_entity = list_runs("medsynth")[0]
    assert run_entity.data.metrics["series_written"] == 3
    assert run_entity.data.tags["ingest.options"] == "modified_dates"
    assert run_entity.inputs.dataset_inputs, "the output dataset is logged"
    # `medsynth audit --against` agrees
    code, console = _cli(["audit", str(out), "--against", str(source)], capfd)
    assert code == 0, console
    assert "no finding" in console
    assert not [marker for marker in markers if marker.lower() in console.lower()]


def test_pixels_and_affine_match_the_source(tmp_path: Path) -> None:
    source = tmp_path / "source"
    files = write_series(source / "normal" / "p1", "CT_small.dcm", 5, series="ct-geom", spacing=2.5)
    out = tmp_path / "dataset"
    run([source], out, IngestConfig(workers=1))
    dataset = read_dataset(out)
    image = nib.load(out / dataset.manifest.iloc[0]["path"])
    data = np.asarray(image.dataobj)
    slices = sorted((pydicom.dcmread(path) for path in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    expected = np.stack(
        [ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices],
        axis=-1,
    ).transpose(1, 0, 2)
    assert data.shape == expected.shape == (128, 128, 5)
    np.testing.assert_array_equal(data, expected)
    # Affine: LPS -> RAS of the first slice's position, row/column cosines and the slice step.
    first = slices[0]
    row, col = np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
    dy, dx = (float(v) for v in first.PixelSpacing)
    step = (np.asarray(slices[-1].ImagePositionPatient, float) - np.asarray(first.ImagePositionPatient, float)) / 4
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dx, col * dy, step, np.asarray(first.ImagePositionPatient, float)
    np.testing.assert_allclose(image.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-4)
    assert image.header["descrip"].item() == b""
    # The anonymized DICOM keeps the same pixels, in z order.
    written = sorted((out / "dicom").rglob("*.dcm"))
    assert [pydicom.dcmread(path).pixel_array[0, 0] for path in written] == [ds.pixel_array[0, 0] for ds in slices]


def test_uids_map_consistently_per_key(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_series(source / "normal" / "p1", "CT_small.dcm", 3, series="ct-uid")

    def uids(out: Path, private: Path) -> dict[int, tuple[str, str, str, str]]:
        run([source], out, IngestConfig(workers=1), private=private)
        found = {}
        for path in sorted((out / "dicom").rglob("*.dcm")):
            ds = pydicom.dcmread(path)
            reference = ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID if "ReferencedImageSequence" in ds else ""
            found[int(path.stem)] = (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID, reference)
        return found

    first = uids(tmp_path / "a", tmp_path / "key1")
    again = uids(tmp_path / "b", tmp_path / "key1")
    other = uids(tmp_path / "c", tmp_path / "key2")
    assert first == again
    assert all(first[k][0] != other[k][0] and first[k][1] != other[k][1] for k in first)
    original = {uid("ct-uid", k) for k in range(3)}
    assert not original & {value for row in first.values() for value in row}
    # references inside sequences follow the mapping: slice k points at slice k-1
    assert first[2][3] == first[1][0] and first[3][3] == first[2][0]
    key = bytes.fromhex((tmp_path / "key1" / "pseudonym.key").read_text().strip())
    assert first[1][0] == keyed_uid(key, uid("ct-uid", 0))


def test_every_pydicom_test_file_is_written_or_quarantined(tmp_path: Path, mlflow_store: Path) -> None:
    """Acceptance: ingest over all of pydicom's bundled files: exit 0, no traceback, a reason per file."""
    count = copy_all_testdata(tmp_path / "src")
    (tmp_path / "src" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # a hidden file: still accounted for
    count += 1
    (tmp_path / "src" / ".snapshot").mkdir()  # a hidden folder is not walked: its copies would shadow the originals
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "src" / ".snapshot" / "CT_small.dcm")
    out = tmp_path / "dataset"
    completed = subprocess.run(
        [PYTHON, "-m", "pipeline", "ingest", "--source", str(tmp_path / "src"), "--out", str(out), "--workers", "2"],
        capture_output=True, text=True, cwd=mlflow_store, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
             "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Traceback" not in completed.stdout + completed.stderr
    with open(out / "quarantine.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(row["reason"].strip() for row in rows)
    assert all(row["ref"].startswith("q-") for row in rows)
    record = json.loads((out / "ingest.json").read_text())
    with open(tmp_path / "dataset.private" / "source_map.csv", newline="") as handle:
        used = list(csv.DictReader(handle))
    # Nothing lost: every file is either behind an output image or in quarantine.csv (DICOMDIRs included).
    assert record["counts"]["files_seen"] == count == len(rows) + len(used)
    assert any(row["format"] == "dicomdir" for row in rows)
    assert len(read_dataset(out).manifest) >= 10


@pytest.mark.parametrize(
    "variant",
    ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
     "MR_small_jpeg_ls_lossless.dcm", "MR_small_expb.dcm"],
)
def test_transfer_syntaxes_give_the_reference_pixels(tmp_path: Path, variant: str) -> None:
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    source = tmp_path / "source" / "mr"
    source.mkdir(parents=True)
    (source / "image").write_bytes(Path(get_testdata_file(variant)).read_bytes())  # no extension on purpose
    out = tmp_path / "dataset"
    run([tmp_path / "source"], out, IngestConfig(workers=1))
    data = np.asarray(nib.load(next((out / "images").rglob("*.nii.gz"))).dataobj)
    np.testing.assert_array_equal(data[:, :, 0], reference.T.astype(data.dtype))
    written = pydicom.dcmread(next((out / "dicom").rglob("*.dcm")))
    np.testing.assert_array_equal(written.pixel_array, reference)
    assert written.file_meta.TransferSyntaxUID.is_little_endian


def test_enhanced_multiframe_becomes_one_volume(tmp_path: Path) -> None:
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    frames = np.stack([ct.pixel_array + k for k in range(3)])
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    for name in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept"):
        del ds[name]
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    shared = pydicom.Dataset()
    orientation = pydicom.Dataset()
    orientation.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    measures = pydicom.Dataset()
    measures.PixelSpacing = [0.8, 0.7]
    measures.SliceThickness = 2.0
    transform = pydicom.Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    shared.PlaneOrientationSequence = pydicom.Sequence([orientation])
    shared.PixelMeasuresSequence = pydicom.Sequence([measures])
    shared.PixelValueTransformationSequence = pydicom.Sequence([transform])
    ds.SharedFunctionalGroupsSequence = pydicom.Sequence([shared])
    per_frame = []
    for k in (2, 0, 1):  # frames stored out of spatial order
        item, position = pydicom.Dataset(), pydicom.Dataset()
        position.ImagePositionPatient = [10.0 + 2.0 * k, 0.0, 0.0]
        item.PlanePositionSequence = pydicom.Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence(per_frame)
    source = tmp_path / "source" / "ct"
    source.mkdir(parents=True)
    ds.save_as(source / "enhanced.dcm", enforce_file_format=True)
    out = tmp_path / "dataset"
    run([tmp_path / "source"], out, IngestConfig(workers=1))
    image = nib.load(next((out / "images").rglob("*.nii.gz")))
    data = np.asarray(image.dataobj)
    assert data.shape == (128, 128, 3)
    # The slice normal (row x column cosines) is -x (patient right): slices run from x=14 down to
    # x=10, i.e. stored frames 0 (x=14), 2 (x=12), 1 (x=10).
    for z, stored in enumerate((0, 2, 1)):
        np.testing.assert_array_equal(data[:, :, z], (frames[stored].astype(np.int32) - 1024).T)
    np.testing.assert_allclose(image.affine[:3, 2], [2.0, 0.0, 0.0], atol=1e-6)  # LPS step -x = RAS +x
    np.testing.assert_allclose(image.affine[:3, 3], [-14.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.abs(image.header.get_zooms()), [0.7, 0.8, 2.0], atol=1e-5)


def test_nothing_usable_exits_2_with_one_line(tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "source" / "docs"
    source.mkdir(parents=True)
    (source / f"{PATIENT_ID}.txt").write_text("not an image")
    report = source / "report.dcm"
    report.write_bytes(Path(get_testdata_file("reportsi.dcm")).read_bytes())
    code, console = _cli(["ingest", "--source", str(tmp_path / "source"), "--out", str(tmp_path / "dataset")], capsys)
    assert code == 2
    assert console.strip().count("\n") == 0 and console.startswith("error: no usable image series")
    assert PATIENT_ID not in console
    with open(tmp_path / "dataset" / "quarantine.csv", newline="") as handle:
        reasons = sorted(row["reason"] for row in csv.DictReader(handle))
    assert reasons == ["no pixel data: non-image object or stripped image (Basic Text SR Storage)", "not a DICOM or NIfTI file"]


def test_labels_csv_and_missing_label(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_series(source / "p1", "CT_small.dcm", 2, series="s1", who="1")
    write_series(source / "p2", "CT_small.dcm", 2, series="s2", who="2")
    write_phi_nifti(source / "vol.nii.gz")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"key,label\n{PATIENT_ID}1,lesion\nvol.nii.gz,normal\n")
    out = tmp_path / "dataset"
    summary = run([source], out, IngestConfig(workers=1), labels=labels)
    assert summary.series_written == 2
    assert summary.quarantined == {"no label (key not in the labels CSV)": 2}
    assert sorted(read_dataset(out).manifest["label"]) == ["lesion", "normal"]


def test_labels_csv_errors_name_the_row_not_the_key(tmp_path: Path) -> None:
    from pipeline.core.errors import InputError
    from pipeline.ingest.discover import read_labels

    bad = tmp_path / "labels.csv"
    bad.write_text(f"key,label\n{PATIENT_ID},normal\n{PATIENT_ID},lesion\n")
    with pytest.raises(InputError) as info:
        read_labels(bad)
    assert "row 3" in str(info.value) and PATIENT_ID not in str(info.value)
    bad.write_text("id,class\nx,y\n")
    with pytest.raises(InputError, match="key,label"):
        read_labels(bad)


def test_split_is_by_subject_stratified_and_reproducible(tmp_path: Path) -> None:
    from pipeline.ingest.config import SplitConfig
    from pipeline.ingest.split import assign_splits

    subjects = {f"sub-{i:02d}": ["lesion" if i % 2 else "normal"] * (1 + i % 3) for i in range(40)}
    fractions = SplitConfig(train=0.6, val=0.2, test=0.2, seed=3)
    first = assign_splits(subjects, fractions, seed=1)
    assert first == assign_splits(dict(reversed(list(subjects.items()))), fractions, seed=1)
    assert first != assign_splits(subjects, fractions, seed=2)
    for label in ("lesion", "normal"):
        counts = {split: sum(1 for s, v in first.items() if v == split and subjects[s][0] == label) for split in ("train", "val", "test")}
        assert counts == {"train": 12, "val": 4, "test": 4}


def test_date_shift_keeps_intervals_and_options_retain(tmp_path: Path) -> None:
    source = tmp_path / "source"
    files = write_series(source / "normal" / "p1", "CT_small.dcm", 2, series="opt")
    ds = pydicom.dcmread(files[0])
    ds.SeriesDate = "20190315"  # three days after the study date
    ds.PatientSex, ds.PatientAge, ds.DeviceSerialNumber = "F", "071Y", "SN-4471"
    ds.save_as(files[0], enforce_file_format=True)
    out = tmp_path / "dataset"
    config = IngestConfig.model_validate(
        {"workers": 1, "deid": {"patient_characteristics": True, "device_identity": True, "clean_descriptors": True,
                                 "safe_private": [{"creator": "MKCREATOR", "group": 0x0011, "element": 0x02}]}}
    )
    run([source], out, config)
    written = [pydicom.dcmread(path) for path in sorted((out / "dicom").rglob("*.dcm"))]
    from datetime import datetime

    def instant(day: str, time: str) -> datetime:
        return datetime.strptime(day + time[:6], "%Y%m%d%H%M%S")

    def series_after_study(item: pydicom.Dataset) -> object:
        return instant(item.SeriesDate, item.SeriesTime) - instant(item.StudyDate, item.StudyTime)

    # A date and the time of the same event move as one instant (one keyed offset of days and
    # seconds), so the interval between two events is kept exactly, even across midnight. The
    # offset is keyed by a fresh key, so the study time crosses midnight in some runs: which
    # output is the edited slice is told by its interval, never by a date that differs.
    source_intervals = sorted(series_after_study(pydicom.dcmread(path)) for path in files)
    assert source_intervals[-1].days == 3 and source_intervals[0].days == 0
    assert sorted(series_after_study(item) for item in written) == source_intervals
    shifted = max(written, key=series_after_study)
    assert shifted.StudyDate < "19000101"
    assert shifted.PatientSex == "F" and shifted.PatientAge == "071Y" and shifted.DeviceSerialNumber == "SN-4471"
    # Clean Descriptors keeps the description without the patient's name
    assert "scan of" in shifted.StudyDescription and NAME_FAMILY.lower() not in shifted.StudyDescription.lower()
    # Retain Safe Private keeps exactly the allow-listed element (and its creator)
    private = {int(elem.tag): elem.value for elem in shifted.iterall() if elem.tag.is_private}
    assert len(private) == 2
    creator_tag = next(tag for tag, value in private.items() if value == "MKCREATOR")
    block = creator_tag & 0xFF
    assert private[(0x0011 << 16) | (block << 8) | 0x02] == "MKPRIVID901"
    codes = {item.CodeValue for item in shifted.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113105", "113107", "113108", "113109", "113111"}


def test_burned_in_is_quarantined_unless_regions_are_blanked(tmp_path: Path) -> None:
    source = tmp_path / "source"
    files = write_series(source / "normal" / "p1", "CT_small.dcm", 2, series="burn", plant=False)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.BurnedInAnnotation = "YES"
        ds.Manufacturer, ds.ManufacturerModelName = "Acme", "Scanner 9"
        ds.save_as(path, enforce_file_format=True)
    from pipeline.core.errors import InputError

    with pytest.raises(InputError, match="no usable image series"):
        run([source], tmp_path / "q", IngestConfig(workers=1, burned_in={"action": "quarantine"}), private=tmp_path / "key")
    with open(tmp_path / "q" / "quarantine.csv", newline="") as handle:
        assert {row["reason"] for row in csv.DictReader(handle)} == {"possible burned-in PHI"}
    config = IngestConfig.model_validate(
        {"workers": 1, "burned_in": {"blank": [{"manufacturer": "ACME", "model": "scanner 9", "regions": [[0, 0, 20, 10]]}]}}
    )
    summary = run([source], tmp_path / "b", config, private=tmp_path / "key")
    assert summary.series_written == 1
    data = np.asarray(nib.load(next((tmp_path / "b" / "images").rglob("*.nii.gz"))).dataobj)
    for z in range(data.shape[2]):  # each slice's region holds one value: its darkest
        assert np.all(data[:20, :10, z] == data[:, :, z].min())
    ds = pydicom.dcmread(next((tmp_path / "b" / "dicom").rglob("*.dcm")))
    assert ds.BurnedInAnnotation == "NO"
    assert "113101" in {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
    assert np.all(ds.pixel_array[:10, :20] == ds.pixel_array[:10, :20].min())


def test_rerun_skips_finished_series(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_series(source / "normal" / "p1", "CT_small.dcm", 2, series="r1", who="1")
    write_series(source / "lesion" / "p2", "MR_small.dcm", 2, series="r2", who="2")
    out = tmp_path / "dataset"
    first = run([source], out, IngestConfig(workers=1))
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    second = run([source], out, IngestConfig(workers=1))
    assert first.series_resumed == 0 and second.series_resumed == 2
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_audit_finds_a_planted_leak_and_names_file_and_tag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _cohort(tmp_path)
    out = tmp_path / "dataset"
    run([source], out, IngestConfig(workers=1))
    assert audit(out, [source]).ok
    target = next((out / "dicom").rglob("*.dcm"))
    ds = pydicom.dcmread(target)
    ds.ImageComments = f"note {PATIENT_ID}"
    ds.private_block(0x0009, "SOMEVENDOR", create=True).add_new(0x01, "LO", "x")
    ds.PatientBirthDate = "19990101"
    ds.save_as(target, enforce_file_format=True)
    structure = audit(out)  # no sources: structure only
    assert {(finding.where, finding.kind) for finding in structure.findings} == {
        ("(0009,0010)", "private element present"),
        ("(0009,1001)", "private element present"),
        ("(0010,0030) PatientBirthDate", "attribute the profile empties has a value"),
        ("(0020,4000) ImageComments", "attribute the profile removes is present"),
    }
    (out / "notes.json").write_text(json.dumps({"who": BIRTH_DATE}))
    code, console = _cli(["audit", str(out), "--against", str(source)], capsys)
    assert code == 1
    rel = target.relative_to(out).as_posix()
    assert f"{rel}: (0020,4000) ImageComments" in console
    assert "notes.json: content: date" in console
    assert not [marker for marker in MARKERS if marker.lower() in console.lower()]


def test_self_audit_stops_ingest_when_an_identifier_survives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If anonymization ever let an identifier through, ingest's own audit fails the run (exit 1)."""
    import pipeline.ingest.task as task_module
    from pipeline.core.errors import CheckFailed

    real_anonymize = task_module.anonymize

    def leaky(ds: pydicom.Dataset, ctx: object) -> None:  # a deliberately broken anonymizer
        real_anonymize(ds, ctx)
        ds.ImageComments = f"seen by {PATIENT_ID}"

    monkeypatch.setattr(task_module, "anonymize", leaky)
    source = tmp_path / "source"
    write_series(source / "normal" / "p1", "CT_small.dcm", 2, series="leak")
    with pytest.raises(CheckFailed) as info:
        run([source], tmp_path / "dataset", IngestConfig(workers=1))
    message = str(info.value)
    assert "(0020,4000) ImageComments: identifier or text" in message
    assert PATIENT_ID not in message
    # What it wrote left the shareable folder for the private one, and the message says where.
    assert not (tmp_path / "dataset").exists()
    failed = sorted((tmp_path / "dataset.private").glob("failed-*"))
    assert len(failed) == 1 and (failed[0] / "manifest.csv").is_file() and str(failed[0]) in message


def test_quarantine_reasons_never_quote_an_unknown_uid(tmp_path: Path) -> None:
    """A non-standard SOP class UID is a header value: quarantine.csv names it only by its standard name."""
    source = tmp_path / "source"
    write_series(source / "normal" / "p1", "CT_small.dcm", 2, series="ok-1", plant=False)
    for index, (sop_class, modality) in enumerate((("1.2.999.77001234.1", "OT"), ("1.2.999.77001234.2", "SR"))):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        del ds.PixelData
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SeriesInstanceUID = uid("odd", index)
        ds.Modality = modality
        ds.save_as(source / "normal" / f"odd{index}.dcm", enforce_file_format=True)
    out = tmp_path / "dataset"
    run([source], out, IngestConfig(workers=1))
    text = (out / "quarantine.csv").read_text()
    assert "no pixel data" in text and "private or unknown SOP class" in text
    assert "77001234" not in text


def _fails_on_two(value: int) -> int:
    if value == 2:
        raise MemoryError("worker ran out of memory")
    return value * 10


@pytest.mark.parametrize("workers", [1, 2])
def test_pool_reports_a_failed_job_and_goes_on_with_any_worker_count(workers: int) -> None:
    """One failing series must not stop the others, in the serial path as in the process pool."""
    from pipeline.ingest.pool import pool_map

    results = dict(pool_map(_fails_on_two, [(1,), (2,), (3,)], workers, lambda _: None))
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], MemoryError)


def test_a_folder_that_cannot_be_listed_is_quarantined_not_skipped(tmp_path: Path) -> None:
    """Nothing vanishes without a trace: a subfolder the walk cannot list (here: deeper than PATH_MAX,
    since the tests may run as root, for whom permissions do not bite) is a row of quarantine.csv."""
    source = tmp_path / "source"
    (source / "mr").mkdir(parents=True)
    (source / "mr" / "image.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    name, depth = "d" * 100, 0  # 100 characters: within every common file system's name limit
    handle = os.open(source / "mr", os.O_RDONLY)
    try:
        try:  # built level by level through directory handles: the full path is too long for the OS
            while len(str(source / "mr")) + depth * (len(name) + 1) < 4200:
                os.mkdir(name, dir_fd=handle)
                inner = os.open(name, os.O_RDONLY, dir_fd=handle)
                os.close(handle)
                handle, depth = inner, depth + 1
            os.close(os.open("lost.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=handle))
        finally:
            os.close(handle)
        out = tmp_path / "dataset"
        summary = run([source], out, IngestConfig(workers=1))
        assert summary.series_written == 1 and summary.files_seen == 2
        with open(out / "quarantine.csv", newline="") as rows:
            reasons = [row["reason"] for row in csv.DictReader(rows)]
        assert reasons == ["unreadable folder (permission or I/O error): the files in it were not read"]
        with open(tmp_path / "dataset.private" / "quarantine.csv", newline="") as rows:
            assert next(csv.DictReader(rows))["path"].endswith(name)  # the private map says which folder
    finally:
        shutil.rmtree(source, ignore_errors=True)  # pytest's own clean-up cannot remove what it cannot name


def _nifti(path: Path, data: np.ndarray, slope: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    nib.save(image, path)


def test_unusable_images_are_quarantined_with_a_reason_and_2d_images_are_kept(tmp_path: Path) -> None:
    """The NIfTI zoo of issue #14 (and a DICOM series whose RescaleSlope overflows) never reaches the manifest."""
    source = tmp_path / "source"
    ramp = np.arange(16 * 16 * 4, dtype=np.float32).reshape(16, 16, 4)
    with_inf = ramp.copy()
    with_inf[3, 4, 1] = np.inf
    zoo = {
        "all_nan.nii.gz": (np.full((16, 16, 4), np.nan, dtype=np.float32), None, "every voxel is NaN or infinite"),
        "inf.nii.gz": (with_inf, None, "some voxels are NaN or infinite"),
        "scaled.nii.gz": ((ramp + 100).astype(np.int16), 1e37, "unusable image"),
        "four_d.nii.gz": (np.zeros((16, 16, 4, 3), dtype=np.int16), None, "4D or higher"),
        "one_d.nii.gz": (np.arange(64, dtype=np.int16), None, "1D array"),
        "point.nii.gz": (np.ones((1, 1, 1), dtype=np.int16), None, "too small (1x1x1 voxels"),
        "line.nii.gz": (np.ones((64, 1, 1), dtype=np.int16), None, "too small (64x1x1 voxels"),
    }
    for name, (data, slope, _) in zoo.items():
        _nifti(source / "lesion" / name, data, slope)
    _nifti(source / "normal" / "xray.nii.gz", np.arange(64 * 48, dtype=np.int16).reshape(64, 48))  # a 2D image
    _nifti(source / "normal" / "trailing.nii.gz", np.ones((16, 16, 4, 1), dtype=np.int16))  # 3D written as 4D
    overflow = tmp_path / "overflow"
    write_series(overflow, "CT_small.dcm", 2, series="overflow", who="9")
    for path in overflow.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = "1e37"
        ds.save_as(path)
    shutil.copytree(overflow, source / "lesion" / "ct")

    out = tmp_path / "dataset"
    summary = run([source], out, IngestConfig(workers=1))
    with open(out / "quarantine.csv", newline="") as handle:
        reasons = [row["reason"] for row in csv.DictReader(handle)]
    with open(tmp_path / "dataset.private" / "quarantine.csv", newline="") as handle:
        by_name = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(handle)}
    for name, (_, _, reason) in zoo.items():
        assert reason in by_name[name], (name, by_name[name])
        assert by_name[name].startswith("unusable image")
    assert all(by_name[path.name].startswith("unusable image: some voxels are NaN") for path in overflow.glob("*.dcm"))
    assert len(reasons) == len(zoo) + 2
    manifest = read_dataset(out).manifest
    assert summary.series_written == 2 and sorted(manifest["shape"]) == ["16x16x4", "64x48x1"]
    # A re-run remembers the decisions (they are properties of the files) and changes nothing.
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    again = run([source], out, IngestConfig(workers=1))
    assert again.series_resumed == 2 and again.quarantined == summary.quarantined
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_an_unexpected_error_is_quarantined_but_not_remembered(tmp_path: Path) -> None:
    """Only properties of the files are remembered: a series that hit an unexpected error is tried again."""
    source = tmp_path / "source"
    write_series(source / "normal" / "p1", "CT_small.dcm", 2, series="u1", who="1")
    write_series(source / "lesion" / "p2", "MR_small.dcm", 2, series="u2", who="2")
    out = tmp_path / "dataset"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pipeline.ingest import IngestConfig, run, task\n"
        "def broken(*args):\n"
        "    raise ValueError('a bug')\n"
        "task._dicom = broken\n"
        "summary = run([Path(sys.argv[1])], Path(sys.argv[2]), IngestConfig(workers=1))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    broken = subprocess.run([PYTHON, "-c", script, str(source), str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert broken.returncode != 0 and "no usable image series" in broken.stderr  # every series hit the "bug"
    assert not list((tmp_path / "dataset.private" / "state").glob("*.json"))
    summary = run([source], out, IngestConfig(workers=1))
    assert summary.series_written == 2 and summary.series_resumed == 0 and summary.quarantined == {}
