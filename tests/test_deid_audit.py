"""The self-audit with precision: the tool's own vocabulary is never a finding, planted values still are,
and every finding has a private reference that `medsynth audit --explain` resolves for the owner."""

from __future__ import annotations

import csv
import re
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import pydicom
import pytest
from pydicom.data import get_testdata_file

from _ingest_data import write_phi_nifti, write_series
from pipeline.cli import main
from pipeline.ingest import IngestConfig, run
from pipeline.ingest.audit import Identifiers, Matcher, audit, explain


def _restamp(files: list[Path], **values: str) -> None:
    """Set header values in already written source files (the planted values of the issue)."""
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def vocabulary_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Inputs whose values are the tool's own words, ingested once: (source, dataset)."""
    root = tmp_path_factory.mktemp("vocabulary")
    source = root / "source"
    files = write_series(source / "lesion" / "a", "CT_small.dcm", 2, series="vocab-1", who="1")
    # planted values equal to attribute names that audit.jsonl lists (keyword column)
    _restamp(files, InstitutionName="INSTITUTIONNAME", StationName="STATIONNAME")
    # a file named plan.dcm: quarantined with the reason "not a scan (RT Plan Storage)"
    shutil.copyfile(get_testdata_file("rtplan.dcm"), source / "lesion" / "plan.dcm")
    # a file named standard.nii.gz: "standard" is a key of ingest.json
    write_phi_nifti(source / "lesion" / "standard.nii.gz")
    # PatientName "Modality^LUT^Test": "modality" is a column of manifest.csv
    more = write_series(source / "lesion" / "b", "MR_small.dcm", 2, series="vocab-2", who="2")
    _restamp(more, PatientName="Modality^LUT^Test")
    out = root / "dataset"
    summary = run([source], out, IngestConfig(workers=1), private=root / "private")
    assert summary.audit_findings == 0  # ingest exited 0: none of the false alarms of the issue
    assert summary.series_written == 3 and summary.quarantined_files == 1
    return source, out


def test_the_tools_own_words_are_not_findings(vocabulary_inputs: tuple[Path, Path]) -> None:
    source, out = vocabulary_inputs
    # the places of the old false alarms really hold those words
    assert "RT Plan Storage" in (out / "quarantine.csv").read_text()
    jsonl = (out / "audit.jsonl").read_text()
    assert '"keyword": "InstitutionName"' in jsonl and '"keyword": "StationName"' in jsonl
    assert '"standard"' in (out / "ingest.json").read_text()
    assert (out / "manifest.csv").read_text().splitlines()[0].count("modality") == 1
    report = audit(out, [source])
    assert report.ok, report.lines()
    assert report.identifiers > 0


def test_medsynth_audit_against_is_quiet_on_the_vocabulary(vocabulary_inputs: tuple[Path, Path], capsys) -> None:
    source, out = vocabulary_inputs
    with pytest.raises(SystemExit) as stopped:
        main(["audit", str(out), "--against", str(source)])
    assert stopped.value.code == 0
    assert "no finding" in capsys.readouterr().out


def test_the_same_values_in_identifying_places_are_caught(vocabulary_inputs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    """Each planted word of the issue is still found in a DICOM element, a NIfTI header, a data cell or a file name."""
    source, clean = vocabulary_inputs
    out = tmp_path / "dataset"
    shutil.copytree(clean, out)
    dicom = sorted((out / "dicom").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(dicom)
    ds.BodyPartExamined = "STATIONNAME"  # an attribute the table keeps: searched whole
    ds.save_as(dicom, enforce_file_format=True)
    nifti_path = sorted((out / "images").rglob("*.nii.gz"))[0]
    image = nib.load(nifti_path)
    image.header["descrip"] = b"institutionname"
    nib.save(nib.Nifti1Image(image.get_fdata(), image.affine, image.header), nifti_path)
    with open(out / "quarantine.csv", "a", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerow(["q-0", "unreadable file", "Standard", "other"])
    (out / "plan.txt").write_text("notes\n")
    (out / "lut_modality.txt").write_text("x\n")
    report = audit(out, [source])
    places = {(finding.path, finding.where) for finding in report.findings}
    assert (dicom.relative_to(out).as_posix(), "(0018,0015) BodyPartExamined") in places
    assert (nifti_path.relative_to(out).as_posix(), "NIfTI descrip") in places
    assert ("quarantine.csv", "content (column sample_id)") in places
    assert ("plan.txt", "file name") in places and ("lut_modality.txt", "file name") in places
    # The CLI: findings name file, place, kind and a reference; never the value. Exit 1.
    private = tmp_path / "private"
    with pytest.raises(SystemExit) as stopped:
        main(["audit", str(out), "--against", str(source), "--private", str(private)])
    assert stopped.value.code == 1
    printed = capsys.readouterr()
    text = printed.out + printed.err
    for word in ("stationname", "institutionname", "standard"):
        assert word not in text.lower().replace("stationname,", "")
    refs = re.findall(r"BodyPartExamined: .* \[ref (f-[0-9a-f]{12})\]", text)
    assert len(refs) == 1
    assert (private / "audit_findings.jsonl").stat().st_mode & 0o077 == 0
    with pytest.raises(SystemExit):
        main(["audit", "--explain", refs[0], "--private", str(private)])
    explained = capsys.readouterr().out
    assert "BodyPartExamined" in explained and "'stationname'" in explained
    with pytest.raises(SystemExit) as unknown:
        main(["audit", "--explain", "f-000000000000", "--private", str(private)])
    assert unknown.value.code == 2


def test_a_value_also_in_a_kept_attribute_stays_on_the_search_list() -> None:
    """A removed birth date equal to a retained text is still searched; only that retained element is allowed."""
    identifiers = Identifiers(values={b"19431107": "date", b"zorblattix": "person name"}).finalize(
        kept_text={b"19431107", b"scanner zorblattix"}, labels=[]
    )
    assert set(identifiers.values) == {b"19431107", b"zorblattix"}
    assert identifiers.allowed == {b"19431107", b"scanner zorblattix"}
    matcher = Matcher(identifiers)
    assert matcher.kinds_in(b"born 19431107") == ["date"]
    assert matcher.kinds_in(b"Zorblattix.nii.gz") == ["person name"]


def test_alternative_calendar_dates_are_removed_and_the_birth_date_still_searched(tmp_path: Path) -> None:
    source = tmp_path / "source"
    files = write_series(source / "lesion", "CT_small.dcm", 2, series="calendar-1")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.add_new(0x00100033, "LO", ds.PatientBirthDate)  # the same date, in an attribute the table does not list
        ds.add_new(0x00100035, "CS", "ISO8601")
        ds.save_as(path, enforce_file_format=True)
    out = tmp_path / "dataset"
    run([source], out, IngestConfig(workers=1), private=tmp_path / "private")
    for path in (out / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert 0x00100033 not in ds and 0x00100035 not in ds
    birth = pydicom.dcmread(files[0]).PatientBirthDate
    (out / "notes.txt").write_text(f"born {birth}\n")
    report = audit(out, [source])
    assert [(finding.path, finding.kind) for finding in report.findings] == [("notes.txt", "date")]


def test_explain_needs_the_private_folder(tmp_path: Path) -> None:
    from pipeline.core.errors import InputError

    with pytest.raises(InputError, match="--private"):
        explain("f-0", tmp_path / "nowhere")


def _time_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyTime)


def test_a_shifted_time_that_reads_like_another_patients_study_id_is_no_finding(tmp_path: Path) -> None:
    """Numbers collide by chance at cohort scale: patient A's shifted StudyTime equal to patient B's Study ID is no
    leak of that ID (a time element holds only times the tool derived); the ID is still found anywhere else and an
    unshifted date still in a date element."""
    source = tmp_path / "source"
    files_a = write_series(source / "lesion" / "a", "CT_small.dcm", 2, series="collide-a", who="1")
    files_b = write_series(source / "normal" / "b", "CT_small.dcm", 2, series="collide-b", who="2")
    private = tmp_path / "private"
    first = run([source], tmp_path / "first", IngestConfig(workers=1), private=private)
    assert first.audit_findings == 0
    written = sorted((tmp_path / "first" / "dicom").rglob("*.dcm"))
    time_a = _time_of(written[0]).split(".")[0]  # one patient's shifted time (HHMMSS)
    assert len(time_a) == 6
    _restamp(files_b, StudyID=time_a)  # B's Study ID: a 6-digit number, searched for as an identifier

    out = tmp_path / "second"
    second = run([source], out, IngestConfig(workers=1), private=private)  # same key: the same shifted times
    assert second.audit_findings == 0
    assert time_a in {_time_of(path).split(".")[0] for path in (out / "dicom").rglob("*.dcm")}
    assert audit(out, [source]).ok

    # The same value in a text element is a finding; so is the source's date left unshifted in a date element.
    leaked = sorted((out / "dicom").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(leaked)
    ds.BodyPartExamined = time_a
    ds.StudyDate = pydicom.dcmread(files_a[0], stop_before_pixels=True).StudyDate
    ds.save_as(leaked, enforce_file_format=True)
    found = {(finding.where, finding.kind) for finding in audit(out, [source]).findings}
    assert ("(0018,0015) BodyPartExamined", "identifier or text") in found
    assert ("(0008,0020) StudyDate", "date") in found
