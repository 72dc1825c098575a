"""Third-party conformance: ingest over the `pydicom-data` and `deid-data` packages, scored against Table E.1-1.

No leaked value, no false alarm (the self-audit stays quiet, so the run exits 0), every file accounted
for, and every required action of Table E.1-1 done right on what is written (benchmarks/deid_conformance.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import deid_conformance as conformance  # noqa: E402


@pytest.mark.slow  # minutes: the burned-in text detector runs on every screened image of the corpus
@pytest.mark.parametrize("corpus", conformance.CORPORA)
def test_ingest_conforms_on_a_packaged_corpus(corpus: str, tmp_path: Path) -> None:
    files = conformance.dicom_files(conformance.corpus_folder(corpus))
    assert len(files) >= 10  # the package is installed whole (dev extra)
    summary, pairs = conformance.ingest_corpus(files, tmp_path)  # raises CheckFailed on any audit finding
    assert summary.audit_findings == 0 and summary.audit_identifiers > 0
    assert summary.files_seen == summary.dicom_files_written + summary.quarantined_files
    score = conformance.score_pairs(pairs)
    assert score.files == len(files) and score.written == summary.dicom_files_written > 0
    assert score.leaks == 0, score.leaked
    assert score.elements > 50 and score.action_score >= 0.999, score.wrong


def test_the_scorer_sees_a_kept_time_and_a_leaked_name(tmp_path: Path) -> None:
    """The scorer is not lenient: a time kept verbatim under 113107 and a name left in a kept attribute count."""
    import pydicom
    from pydicom.data import get_testdata_file

    from pipeline.ingest.deid import DeidContext, anonymize
    from pipeline.ingest.profile import build_profile

    source = tmp_path / "source.dcm"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Zorblattix^Quenivere"
    ds.save_as(source, enforce_file_format=True)
    output = tmp_path / "output.dcm"
    ds = pydicom.dcmread(source)
    study_time = ds.StudyTime
    anonymize(ds, DeidContext(profile=build_profile(), key=b"k" * 32, subject_id="sub-x", date_offset=80_000))
    ds.PatientIdentityRemoved = "YES"
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "113107", "DCM", "Modified Dates"
    ds.DeidentificationMethodCodeSequence = [item]
    ds.save_as(output, enforce_file_format=True)
    clean = conformance.score_pairs([(source, output)])
    assert clean.action_score == 1.0 and clean.leaks == 0
    ds.StudyTime = study_time  # kept verbatim: the gap
    ds.BodyPartExamined = "ZORBLATTIX"  # a kept attribute holding the removed name
    ds.save_as(output, enforce_file_format=True)
    flawed = conformance.score_pairs([(source, output)])
    assert flawed.wrong == {("StudyTime", "C"): 1}
    assert flawed.leaks == 1 and flawed.leaked == {"PatientName": 1}
