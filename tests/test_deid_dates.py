"""Dates and times by Table E.1-1's option columns, the safety net by VR, and declared options that hold."""

from __future__ import annotations

import datetime as dt
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from _ingest_data import write_series
from pipeline.ingest import IngestConfig, run
from pipeline.ingest.audit import structure_findings
from pipeline.ingest.config import DeidOptions
from pipeline.ingest.deid import DeidContext, anonymize
from pipeline.ingest.keys import shift_datetime, shift_instant, shift_time
from pipeline.ingest.profile import build_profile

# Date/time pairs CT_small.dcm carries, and the times the issue found kept verbatim.
_PAIRS = (
    ("StudyDate", "StudyTime"),
    ("SeriesDate", "SeriesTime"),
    ("AcquisitionDate", "AcquisitionTime"),
    ("ContentDate", "ContentTime"),
    ("InstanceCreationDate", "InstanceCreationTime"),
    ("PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"),
    ("DateOfLastCalibration", "TimeOfLastCalibration"),
)


def _source() -> pydicom.Dataset:
    """CT_small with every pair above filled, plus attributes Table E.1-1 does not list."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = "20040119", "235959.250"
    ds.DateOfLastCalibration, ds.TimeOfLastCalibration = ["20031231", "20040101"], ["0830", "1745"]
    ds.SecondaryReviewerName = "Quenivere^Zorblattix"  # (0014,0104) PN, not in the table
    ds.SecondaryReviewDate, ds.SecondaryReviewTime = "20040120", "101010"  # (0014,0102/0103)
    ds.add_new(0x00100033, "LO", "5764/08/17")  # PatientBirthDateInAlternativeCalendar
    ds.add_new(0x00100034, "LO", "5830/01/02")  # PatientDeathDateInAlternativeCalendar
    ds.add_new(0x00100035, "CS", "HEBREW")  # PatientAlternativeCalendar
    return ds


def _instant(date: str, time: str) -> dt.datetime:
    whole, _, fraction = time.partition(".")
    moment = dt.datetime.strptime(date + whole.ljust(6, "0"), "%Y%m%d%H%M%S")
    return moment + dt.timedelta(microseconds=int(fraction.ljust(6, "0")) if fraction else 0)


def test_modified_dates_shift_dates_and_times_as_one_instant() -> None:
    source = _source()
    ds = _source()
    ctx = DeidContext(profile=build_profile(), key=b"k" * 32, subject_id="sub-x", date_offset=80_000)
    anonymize(ds, ctx)
    offsets, coarse = [], []
    for date_kw, time_kw in _PAIRS:
        dates, times = source.data_element(date_kw).value, source.data_element(time_kw).value
        new_dates, new_times = ds.data_element(date_kw).value, ds.data_element(time_kw).value
        pairs = zip(*(list(v) if isinstance(v, (list, pydicom.multival.MultiValue)) else [v] for v in (dates, times, new_dates, new_times)))
        for date, time, new_date, new_time in pairs:
            assert new_time != time and new_date != date, (date_kw, time_kw)  # no time is kept verbatim
            assert len(new_time.split(".")[0]) == len(time.split(".")[0])  # precision kept
            moved = _instant(date, time) - _instant(new_date, new_time)
            (offsets if len(time) >= 6 else coarse).append(moved)
    offsets = set(offsets)
    # One offset for every instant of the patient: intervals are exact; whole days plus a sub-day part.
    assert len(offsets) == 1
    offset = offsets.pop()
    assert offset.days >= 80_000 and offset.seconds > 0
    assert coarse and all(dt.timedelta(0) <= moved - offset < dt.timedelta(minutes=1) for moved in coarse)  # HHMM: truncated
    assert len(ds.PerformedProcedureStepStartTime) == len("235959.250")  # the fraction keeps its digits
    # The safety net: a PN the table does not list is removed, its DA/TM shifted with the others.
    assert "SecondaryReviewerName" not in ds
    assert _instant("20040120", "101010") - _instant(ds.SecondaryReviewDate, ds.SecondaryReviewTime) == offset
    for tag in (0x00100033, 0x00100034, 0x00100035):  # alternative-calendar dates: removed
        assert tag not in ds
    assert b"zorblattix" in ctx.identifiers and b"5764/08/17" in ctx.identifiers  # searched for by the audit
    rules = {(tag, rule) for (_, tag, _, rule) in ctx.audit}
    assert (0x00140104, "safety_net") in rules and (0x00100033, "safety_net") in rules
    assert structure_findings(ds, "x.dcm", build_profile())[1:] == []  # only the identity flag (set by the task) is missing


def test_without_modified_dates_every_date_and_time_follows_the_basic_profile() -> None:
    source = _source()
    ds = _source()
    profile = build_profile(modified_dates=False)
    anonymize(ds, DeidContext(profile=profile, key=b"k" * 32, subject_id="sub-x", date_offset=None))
    source_values = {str(elem.value) for elem in source.iterall() if elem.VR in ("DA", "DT", "TM") and elem.value}
    for elem in ds.iterall():
        if elem.VR in ("DA", "DT", "TM") and elem.value:
            assert str(elem.value) not in source_values, elem.keyword
            assert elem.value in ("19000101", "000000", "19000101000000"), elem.keyword  # D: a dummy
    assert "SecondaryReviewDate" not in ds and "SecondaryReviewTime" not in ds and "SecondaryReviewerName" not in ds
    # The audit's structure check applies the same safety net: a kept unlisted PN or date is a finding.
    leaked = _source()
    leaked.PatientIdentityRemoved = "YES"
    places = {finding.where for finding in structure_findings(leaked, "x.dcm", profile)}
    assert "(0014,0104) SecondaryReviewerName" in places and "(0014,0102) SecondaryReviewDate" in places
    assert "(0010,0033) PatientBirthDateInAlternativeCalendar" in places


def test_time_shift_parsing() -> None:
    hour = 3_600_000_000
    assert shift_time("0030", hour) == "2330" and shift_time("12", hour) == "11"
    assert shift_time("12:30:45.5", 500_000) == "123045.0"  # ACR-NEMA form read, DICOM form written
    assert shift_time("123045.123456", 1) == "123045.123455"
    assert shift_time("2500", 0) is None and shift_time("noon", 0) is None
    assert shift_instant("20000301", "003000", 1, hour) == ("20000228", "233000")  # across midnight
    assert shift_datetime("20000301003000.5+0100", 1, hour) == "20000228233000.5+0100"
    assert shift_datetime("20000301", 1, hour) == "20000229"  # a date alone moves by whole days


@pytest.mark.parametrize("modified_dates", [True, False])
def test_declared_options_are_true_of_the_output(tmp_path: Path, modified_dates: bool) -> None:
    """113107 and LongitudinalTemporalInformationModified=MODIFIED only when every date and time moved."""
    source = tmp_path / "source"
    files = write_series(source / "lesion", "CT_small.dcm", 2, series="dates-1", plant=False)
    out = tmp_path / "dataset"
    config = IngestConfig(workers=1, deid=DeidOptions(modified_dates=modified_dates))
    run([source], out, config, private=tmp_path / "private")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        originals = [pydicom.dcmread(path) for path in files]
    source_values = {
        str(elem.value) for ds in originals for elem in ds.iterall() if elem.VR in ("DA", "DT", "TM") and elem.value
    }
    outputs = sorted((out / "dicom").rglob("*.dcm"))
    assert len(outputs) == 2
    for path in outputs:
        ds = pydicom.dcmread(path)
        codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
        assert ("113107" in codes) is modified_dates
        assert ds.LongitudinalTemporalInformationModified == ("MODIFIED" if modified_dates else "REMOVED")
        kept = [elem.keyword for elem in ds.iterall() if elem.VR in ("DA", "DT", "TM") and str(elem.value) in source_values]
        assert kept == []
