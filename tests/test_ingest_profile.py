"""Table E.1-1 comes from the pinned package, whole; options and the anonymizer follow it."""

from __future__ import annotations

from collections import Counter
from importlib.metadata import version

import pydicom
from pydicom.data import get_testdata_file

from pipeline.ingest.deid import DeidContext, anonymize
from pipeline.ingest.keys import shift_date, shift_datetime
from pipeline.ingest.profile import (
    TABLE_EDITION,
    basic_table,
    build_profile,
    derive_clean_descriptors,
    derive_device_identity,
    derive_modified_dates,
    derive_patient_characteristics,
)


def test_table_is_the_whole_2026c_basic_column() -> None:
    assert version("dicom-anonymizer") == "2.1.0"
    rows = basic_table()
    assert TABLE_EDITION == "2026c"
    assert len(rows) == 655 == len({(row.tag, row.mask) for row in rows})
    assert Counter(row.code for row in rows) == {
        "X": 415, "D": 93, "U": 55, "Z": 42, "X/D": 23, "X/Z": 11, "X/Z/D": 8, "Z/D": 6, "X/Z/U*": 2,
    }
    by_tag = {row.tag: row for row in rows}
    known = {
        0x00100010: ("Patient's Name", "Z"),
        0x00100020: ("Patient ID", "Z/D"),
        0x00100030: ("Patient's Birth Date", "Z"),
        0x00080018: ("SOP Instance UID", "U"),
        0x0020000D: ("Study Instance UID", "U"),
        0x00081140: ("Referenced Image Sequence", "X/Z/U*"),
        0x00101002: ("Other Patient IDs Sequence", "X"),
        0x00400275: ("Request Attributes Sequence", "X"),
        0x00080080: ("Institution Name", "X/Z/D"),
        0x00081030: ("Study Description", "X"),
    }
    for tag, (name, code) in known.items():
        assert (by_tag[tag].name, by_tag[tag].code) == (name, code)
    # repeating groups: curve data, overlay data and comments
    assert {row.name for row in rows if row.mask != 0xFFFFFFFF} == {"(50xx,xxxx)", "(60xx,3000)", "(60xx,4000)"}


def test_derived_option_columns() -> None:
    rows = basic_table()
    names = {row.tag: row.name for row in rows}
    dates = derive_modified_dates(rows)
    assert len(dates) == 163
    assert 0x00080020 in dates and 0x00100030 not in dates  # study date shifts, birth date never kept
    characteristics = {names[tag] for tag in derive_patient_characteristics(rows)}
    assert characteristics == {
        "Patient's Age", "Patient's Sex", "Patient's Size", "Patient's Weight", "Patient's Sex Neutered",
        "Ethnic Group", "Pregnancy Status", "Smoking Status",
    }
    device = derive_device_identity(rows)
    assert len(device) == 42 and 0x00181000 in device and 0x00081010 in device  # serial number, station name
    assert 0x00080055 not in device  # AE titles stay removed
    descriptors = derive_clean_descriptors(rows)
    assert len(descriptors) == 107 and 0x00081030 in descriptors and 0x00104000 not in descriptors  # patient comments


def test_profile_resolution_and_options() -> None:
    basic = build_profile(modified_dates=False)
    assert basic.rule(0x00100010) == ("Z", "basic")
    assert basic.rule(0x00080080) == ("X", "basic")  # X/Z/D → X
    assert basic.rule(0x00081140) == ("U", "basic")  # X/Z/U* → keep references, new UIDs
    assert basic.rule(0x60024000) == ("X", "basic")  # overlay comments in any 60xx group
    assert basic.rule(0x00280010) is None  # Rows: not in the table, kept
    full = build_profile(patient_characteristics=True, device_identity=True, clean_descriptors=True, safe_private=True)
    assert full.rule(0x00080020) == ("C", "modified_dates")
    assert full.rule(0x00101010) == ("K", "patient_characteristics")
    assert full.rule(0x00181000) == ("K", "device_identity")
    assert full.rule(0x00081030) == ("C", "clean_descriptors")
    assert [code for code, _ in full.codes] == ["113100", "113105", "113107", "113108", "113109", "113111"]


def test_anonymize_walks_every_element_of_a_real_file() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    original_uid = ds.SOPInstanceUID
    ctx = DeidContext(profile=build_profile(), key=b"k" * 32, subject_id="sub-x", date_offset=80_000)
    anonymize(ds, ctx)
    assert not any(elem.tag.is_private for elem in ds.iterall())
    assert ds.SOPInstanceUID != original_uid and ds.SOPInstanceUID.startswith("2.25.")
    assert not ds.PatientName and not ds.PatientBirthDate  # Z: present, empty
    assert original_uid.lower().encode() in ctx.identifiers
    assert b"ct1" not in ctx.identifiers  # too short to search for
    actions = Counter(action for (_, _, action, _), count in ctx.audit.items())
    assert actions["X"] and actions["U"] and actions["C"]


def test_date_shift_parsing() -> None:
    assert shift_date("20000301", 1) == "20000229"
    assert shift_date("20000101-20000110", 1) == "19991231-20000109"
    assert shift_date("2000", 1) is None and shift_date("20001340", 1) is None
    assert shift_datetime("20000301120000.5+0100", 1) == "20000229120000.5+0100"


def test_fast_writer_matches_pydicom_byte_for_byte() -> None:
    """The raw-copy writer gives exactly pydicom's bytes (explicit and implicit VR, nested sequences)."""
    import io

    import numpy as np

    from pipeline.ingest.dicomio import encode_file, fast_pixels, scan_header

    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "rtplan.dcm", "examples_overlay.dcm", "JPEG2000.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        syntax = str(ds.file_meta.TransferSyntaxUID)
        anonymize(ds, DeidContext(profile=build_profile(), key=b"k" * 32, subject_id="sub-x", date_offset=80_000))
        ours = encode_file(ds, syntax)
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        theirs = buffer.getvalue()

        def body(data: bytes) -> bytes:  # the dataset after the file meta group
            return data[144 + int.from_bytes(data[140:144], "little") :]

        assert body(ours) == body(theirs), name
        assert ours[:128] == b"\x00" * 128  # a source preamble can hold anything: never copied
        back = pydicom.dcmread(io.BytesIO(ours))
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        if "PixelData" in ds:
            np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm"):
        path = get_testdata_file(name)
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(fast_pixels(ds)[0], ds.pixel_array)
        media, values = scan_header(open(path, "rb").read(1 << 16))
        assert values["SeriesInstanceUID"] == ds.SeriesInstanceUID and values["PatientID"] == ds.PatientID


def test_malformed_numbers_dates_and_times_are_emptied_not_copied() -> None:
    """A kept DS/IS/TM value holding free text (a name) must not reach the output."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    def planted() -> pydicom.Dataset:
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        for tag, vr, value in (
            (0x00200011, "IS", b"12ZORBLAXQUENTIN"),  # SeriesNumber: not in the table, kept
            (0x00200032, "DS", b"ZORBLAXQUENTIN\\1\\2"),  # ImagePositionPatient
            (0x00080030, "TM", b"ZORBLAX QUENTIN "),  # StudyTime: kept under Modified Dates
            (0x00200013, "IS", b"7 "),  # InstanceNumber: a valid value stays
        ):
            ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
        return ds

    for options in ({}, {"modified_dates": False}, {"patient_characteristics": True, "device_identity": True}):
        ds = planted()
        rows = ds.Rows
        ctx = DeidContext(profile=build_profile(**options), key=b"k" * 32, subject_id="sub-x", date_offset=80_000)
        anonymize(ds, ctx)
        for elem in ds.iterall():
            assert b"zorblax" not in str(elem.value).lower().encode(), (options, elem.keyword)
        assert ds.InstanceNumber == 7 and ds.Rows == rows
        assert "SeriesNumber" in ds and ds.SeriesNumber is None  # emptied, not removed
        assert any(rule == "malformed_value" and tag == 0x00200011 for (_, tag, _, rule) in ctx.audit)
        assert any(b"zorblax" in value for value in ctx.identifiers)  # the leak audit searches for it
