"""Labels that cannot leak: identifier-like label folders stop ingest before it writes anything, the
labels template is private, and a dataset that fails its leak audit leaves the shareable folder."""

from __future__ import annotations

import csv
import re
import stat
from pathlib import Path

import pytest

from _ingest_data import NAME_FAMILY, NAME_GIVEN, PATIENT_ID, all_markers, write_phi_nifti, write_series
from conftest import scan_for_markers
from pipeline.cli import main
from pipeline.contracts.dataset import read_dataset
from pipeline.core.errors import CheckFailed, InputError
from pipeline.ingest import IngestConfig, run, write_labels_template


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out + captured.err


def _patient_tree(source: Path, patients: int = 3) -> list[str]:
    """SOURCE/<Family>_<Given>_<PatientID>/CT/...: one folder per patient, no class folders."""
    folders = []
    for who in (str(index) for index in range(1, patients + 1)):
        folder = f"{NAME_FAMILY}{who}_{NAME_GIVEN}_{PATIENT_ID}{who}"
        write_series(source / folder / "CT", "CT_small.dcm", 2, series=f"patient-{who}", who=who)
        folders.append(folder)
    return folders


def test_patient_folders_stop_ingest_before_anything_is_written(
    tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "source"
    folders = _patient_tree(source)
    out = tmp_path / "dataset"
    code, console = _cli(["ingest", "--source", str(source), "--out", str(out)], capsys)
    assert code == 2, console
    assert console.startswith("error: the label folders look like patient identifiers")
    assert "3 folder name(s) contain a PatientID or patient name from the DICOM headers" in console
    assert "3 folder name(s) contain an ID-like number" in console
    # Cause and fix: --labels FILE, the template command, and that the template is private.
    assert "--labels FILE" in console and "medsynth labels-template --source DIR --out FILE" in console
    assert "keep it private" in console
    # Nothing written: no dataset, no private folder (no key), and no identifying name quoted anywhere.
    assert not out.exists() and not (tmp_path / "dataset.private").exists()
    markers = all_markers() + folders
    assert not [marker for marker in markers if marker.lower() in console.lower()]
    assert scan_for_markers(mlflow_store, markers) == []


def test_folders_named_after_patients_without_numbers_stop_ingest(tmp_path: Path) -> None:
    """A folder holding only the patient's name (from the headers) is caught without any digit in it."""
    source = tmp_path / "source"
    for who in ("A", "B"):
        write_series(source / f"{NAME_FAMILY}{who}_{NAME_GIVEN}", "CT_small.dcm", 2, series=f"named-{who}", who=who)
    with pytest.raises(InputError) as info:
        run([source], tmp_path / "dataset", IngestConfig(workers=1))
    message = str(info.value)
    assert "2 folder name(s) contain a PatientID or patient name" in message
    assert "ID-like number" not in message
    assert NAME_FAMILY.lower() not in message.lower() and NAME_GIVEN.lower() not in message.lower()
    assert not (tmp_path / "dataset").exists()


def test_one_folder_per_patient_stops_ingest_even_with_plain_names(tmp_path: Path) -> None:
    """Eight "classes" of one patient each: the folders are patients, whatever they are called."""
    source = tmp_path / "source"
    for index, letter in enumerate("abcdefgh"):
        write_series(source / f"case-{letter}", "CT_small.dcm", 1, series=f"case-{letter}", who=str(index))
    with pytest.raises(InputError) as info:
        run([source], tmp_path / "dataset", IngestConfig(workers=1))
    message = str(info.value)
    assert "8 of 8 folders hold a single patient each (8 classes for 8 patients" in message
    assert "case-" not in message
    assert not (tmp_path / "dataset").exists()


def test_ordinary_class_folders_pass(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_series(source / "normal" / f"{NAME_FAMILY}1_{PATIENT_ID}1", "CT_small.dcm", 2, series="n1", who="1")
    write_series(source / "normal" / f"{NAME_FAMILY}2_{PATIENT_ID}2", "CT_small.dcm", 2, series="n2", who="2")
    write_series(source / "lesion" / f"{NAME_FAMILY}3_{PATIENT_ID}3", "CT_small.dcm", 2, series="l3", who="3")
    write_series(source / "ct-abdomen" / "scan", "CT_small.dcm", 2, series="a4", who="4")
    summary = run([source], tmp_path / "dataset", IngestConfig(workers=1))
    assert summary.series_written == 4
    assert sorted(read_dataset(tmp_path / "dataset").manifest["label"]) == ["ct-abdomen", "lesion", "normal", "normal"]


def test_labels_template_is_private_and_feeds_ingest(tmp_path: Path) -> None:
    # Class folders: the template is pre-filled from them, keyed as --labels reads keys.
    classes = tmp_path / "classes"
    write_series(classes / "normal" / "p1", "CT_small.dcm", 2, series="c1", who="1")
    write_series(classes / "lesion" / "p2", "MR_small.dcm", 2, series="c2", who="2")
    write_phi_nifti(classes / "lesion" / "vol.nii.gz")
    template = write_labels_template([classes], tmp_path / "private" / "classes.csv", workers=1)
    assert stat.S_IMODE(template.path.stat().st_mode) == 0o600
    with open(template.path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [
        {"key": f"{PATIENT_ID}1", "label": "normal"},
        {"key": f"{PATIENT_ID}2", "label": "lesion"},
        {"key": "lesion/vol.nii.gz", "label": "lesion"},
    ]
    assert (template.dicom_patients, template.nifti_files, template.filled) == (2, 1, 3)
    lines = "\n".join(template.lines())
    assert "readable by you only" in lines and PATIENT_ID not in lines
    # A template never overwrites labels someone may have filled in.
    with pytest.raises(InputError, match="the file exists"):
        write_labels_template([classes], template.path, workers=1)

    # Patient folders: no label is taken from them; ingest refuses the unfilled template, takes the filled one.
    patients = tmp_path / "patients"
    _patient_tree(patients, patients=2)
    unfilled = write_labels_template([patients], tmp_path / "private" / "patients.csv", workers=1)
    assert unfilled.folders_look_like_ids and unfilled.filled == 0
    with pytest.raises(InputError, match="empty label"):
        run([patients], tmp_path / "dataset", IngestConfig(workers=1), labels=unfilled.path)
    with open(unfilled.path, newline="") as handle:
        keys = [row["key"] for row in csv.DictReader(handle)]
    assert keys == [f"{PATIENT_ID}1", f"{PATIENT_ID}2"]
    unfilled.path.write_text("key,label\n" + "".join(f"{key},{label}\n" for key, label in zip(keys, ("normal", "lesion"))))
    summary = run([patients], tmp_path / "dataset", IngestConfig(workers=1), labels=unfilled.path)
    assert summary.series_written == 2
    assert sorted(read_dataset(tmp_path / "dataset").manifest["label"]) == ["lesion", "normal"]
    assert scan_for_markers(tmp_path / "dataset", all_markers()) == []


def test_a_failed_leak_audit_moves_the_dataset_into_the_private_folder(tmp_path: Path) -> None:
    """A label built from a PatientID reaches manifest.csv: the audit finds it and nothing stays shareable."""
    source = tmp_path / "source"
    write_series(source / "p1", "CT_small.dcm", 2, series="leak-1", who="1")
    write_series(source / "p2", "CT_small.dcm", 2, series="leak-2", who="2")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"key,label\n{PATIENT_ID}1,case-{PATIENT_ID}1\n{PATIENT_ID}2,normal\n")
    out, private = tmp_path / "dataset", tmp_path / "private"
    with pytest.raises(CheckFailed) as info:
        run([source], out, IngestConfig(workers=1), labels=labels, private=private)
    message = str(info.value)
    failed = sorted(private.glob("failed-*"))
    assert len(failed) == 1
    assert "manifest.csv: content (column label): identifier or text [ref f-" in message
    assert f"into the private folder: {failed[0]}" in message and "--labels file" in message
    assert PATIENT_ID.lower() not in message.lower()
    # The reference resolves, from the private folder only, to the file, place and matched value.
    from pipeline.ingest.audit import explain

    ref = re.search(r"manifest\.csv: content \(column label\): identifier or text \[ref (f-[0-9a-f]+)\]", message).group(1)
    explained = "\n".join(explain(ref, private))
    assert "manifest.csv" in explained and f"{PATIENT_ID}1".lower() in explained.lower()
    # Everything ingest wrote moved, owner-only; the shareable folder is gone.
    assert not out.exists()
    assert stat.S_IMODE(failed[0].stat().st_mode) == 0o700
    assert {path.name for path in failed[0].iterdir()} == {
        "images", "dicom", "manifest.csv", "quarantine.csv", "audit.jsonl", "ingest.json"
    }
    # With the label fixed, a re-run writes the whole dataset again (the moved files are not "resumed").
    labels.write_text(f"key,label\n{PATIENT_ID}1,lesion\n{PATIENT_ID}2,normal\n")
    summary = run([source], out, IngestConfig(workers=1), labels=labels, private=private)
    assert summary.series_written == 2 and summary.series_resumed == 0
    assert scan_for_markers(out, all_markers()) == []
