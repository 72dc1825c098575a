"""Table E.1-1 comes from the pinned package, whole; options and the anonymizer follow it."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from importlib.metadata import version
from pathlib import Path

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


def _pydicom_test_files() -> list[str]:
    import os

    from pydicom.data import get_testdata_files

    return sorted(path for path in get_testdata_files("**/*") if os.path.isfile(path))


def test_fast_reader_gives_pydicom_elements_for_every_bundled_file() -> None:
    """read_file yields exactly dcmread's elements (or declines) for all of pydicom's test files."""
    import io

    from pydicom.dataelem import RawDataElement

    from pipeline.ingest.dicomio import read_file

    fast = 0
    for path in _pydicom_test_files():
        content = open(path, "rb").read()
        ours = read_file(content)
        if ours is None:
            continue
        fast += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = pydicom.dcmread(io.BytesIO(content))
        name = path.rsplit("/", 1)[-1]
        assert list(ours._dict) == list(theirs._dict), name
        for tag, elem in theirs._dict.items():
            mine = ours._dict[tag]
            assert type(mine) is type(elem), (name, tag)
            if isinstance(elem, RawDataElement):
                assert tuple(mine) == tuple(elem), (name, tag)
            else:  # undefined-length sequences, parsed by pydicom's read_sequence in both
                assert mine == elem, (name, tag)
        assert list(ours.file_meta._dict) == list(theirs.file_meta._dict), name
        for tag in theirs.file_meta._dict:
            assert ours.file_meta[tag].value == theirs.file_meta[tag].value, (name, tag)
        assert ours.original_encoding == theirs.original_encoding, name
        assert ours.original_character_set == theirs.original_character_set, name
        assert ours.preamble == theirs.preamble, name
    assert fast >= 100  # the common files take the fast path; the odd ones (no preamble, big endian...) decline


def test_element_value_agrees_with_pydicom() -> None:
    """element_value decodes what pydicom decodes, for the attributes ingest reads, on every bundled file."""
    import io

    from pipeline.ingest.dicomio import element_value

    keywords = (
        "SamplesPerPixel", "NumberOfFrames", "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
        "PhotometricInterpretation", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
        "SliceThickness", "RescaleSlope", "RescaleIntercept", "SOPClassUID", "Modality", "BurnedInAnnotation",
        "ImageType", "SpacingBetweenSlices", "GridFrameOffsetVector", "StudyDate", "AcquisitionTime",
    )

    def plain(value: object) -> object:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            return [plain(item) for item in value]  # type: ignore[union-attr]
        if isinstance(value, float):
            return float(value)
        if isinstance(value, int):
            return int(value)
        return value if value is None else str(value)

    checked = 0
    for path in _pydicom_test_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fresh = lambda: pydicom.dcmread(io.BytesIO(open(path, "rb").read()), force=True)  # noqa: E731
                theirs, ours = fresh(), fresh()
            except Exception:
                continue
            for keyword in keywords:
                try:
                    expected = plain(theirs.get(keyword, "absent"))
                except Exception:
                    continue  # pydicom cannot convert it: element_value must not invent a value either
                assert plain(element_value(ours, keyword, "absent")) == expected, (path, keyword)
                checked += 1
    assert checked > 1000


def test_shared_sequence_encoding_gives_the_same_bytes() -> None:
    """Encoding a series with the per-series sequence cache changes no byte."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from pipeline.ingest.dicomio import SharedElements, encode_file

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "113100", "DCM", "Basic Application Confidentiality Profile"
    codes = DataElement(0x00120064, "SQ", Sequence([item]))
    shared = SharedElements({codes.tag: codes})
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "CT_small.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds._dict[codes.tag] = codes
        syntax = str(ds.file_meta.TransferSyntaxUID)
        assert encode_file(ds, syntax, shared) == encode_file(ds, syntax), name
    # Another element at the same tag is encoded afresh, never given the shared one's bytes.
    changed = Dataset()
    changed.CodeValue, changed.CodingSchemeDesignator, changed.CodeMeaning = "113107", "DCM", "Retain Longitudinal"
    ds._dict[codes.tag] = DataElement(0x00120064, "SQ", Sequence([changed]))
    assert encode_file(ds, syntax, shared) == encode_file(ds, syntax)
    assert b"Retain Longitudinal" in encode_file(ds, syntax, shared)


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


def test_matcher_finds_multi_token_identifiers_on_token_boundaries() -> None:
    """Multi-token identifiers (names with spaces, UIDs) are found only whole and unglued; single tokens exactly."""
    from pipeline.ingest.audit import Identifiers, Matcher

    matcher = Matcher(
        Identifiers(
            values={
                b"quentin zorblax": "person name",
                b"1.2.826.0.1.3680043.99": "UID",
                b"mrn448812": "identifier or text",
                b"st mary hospital": "identifier or text",
            }
        )
    )
    assert matcher.kinds_in(b"Seen by QUENTIN ZORBLAX today") == ["person name"]
    assert matcher.kinds_in(b"quentin and zorblax apart") == []  # both tokens, never the identifier
    assert matcher.kinds_in(b"uid 1.2.826.0.1.3680043.99\x00") == ["UID"]
    assert matcher.kinds_in(b"uid 1.2.826.0.1.3680043.991") == []  # glued to a digit: another UID
    assert matcher.kinds_in(b"id=MRN448812;") == ["identifier or text"]
    assert sorted(matcher.kinds_in(b"mrn448812 at St Mary Hospital")) == ["identifier or text", "identifier or text"]
    assert matcher.may_match({b"quentin", b"zorblax", b"x"}) and matcher.may_match({b"mrn448812"})
    assert not matcher.may_match({b"quentin", b"mary", b"hospital"})


def test_fast_paths_on_crafted_values() -> None:
    """Padded UIDs, signed numbers, a single-valued ImageType and a meta-only file, as pydicom reads them."""
    import io

    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from pipeline.ingest.config import IngestConfig
    from pipeline.ingest.dicomio import element_value, read_file
    from pipeline.ingest.task import burned_in_decision

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for tag, vr, value in (
        (0x00080016, "UI", b" 1.2.840.10008.5.1.4.1.1.7\x00"),  # Secondary Capture, padded at both ends
        (0x00180050, "DS", b" +1.5 "),  # SliceThickness
        (0x00200013, "IS", b"+3"),  # InstanceNumber
        (0x00080008, "CS", b"SCREEN SAVE "),  # ImageType with a single value
    ):
        ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    copy = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    copy._dict.update({tag: ds._dict[tag] for tag in (0x00080016, 0x00180050, 0x00200013, 0x00080008)})
    for keyword in ("SOPClassUID", "SliceThickness", "InstanceNumber", "ImageType"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the padded UID
            expected = copy.get(keyword)
        assert element_value(ds, keyword) == expected, keyword
    assert burned_in_decision(ds, IngestConfig()) == ("detect", [])  # secondary capture, screen save: text detector

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, pydicom.dcmread(get_testdata_file("CT_small.dcm")), enforce_file_format=True)
    data = buffer.getvalue()
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    assert read_file(data) is not None
    assert read_file(data[:meta_end]) is None  # meta only: pydicom decides what it is
    assert read_file(data[:-3]) is None  # truncated: pydicom reports it
    assert read_file(data[128:]) is None  # no preamble


def test_walk_finds_files_as_os_walk_does(tmp_path: Path) -> None:
    """Hidden folders and symlinked folders are not walked; hidden files and symlinked files are (under the target)."""
    from pipeline.ingest.discover import walk_sources

    source, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    (source / "lesion" / "p1").mkdir(parents=True)
    (source / ".snapshot").mkdir()
    elsewhere.mkdir()
    (source / "lesion" / "p1" / "1.dcm").write_bytes(b"x")
    (source / "lesion" / ".hidden").write_bytes(b"x")
    (source / ".snapshot" / "copy.dcm").write_bytes(b"x")
    (elsewhere / "target.dcm").write_bytes(b"x")
    (source / "lesion" / "link.dcm").symlink_to(elsewhere / "target.dcm")
    (source / "linked_folder").symlink_to(elsewhere, target_is_directory=True)
    (source / "broken.dcm").symlink_to(tmp_path / "missing.dcm")
    os.mkfifo(source / "pipe")
    found = {file.rel: file.path for file in walk_sources([source])}
    assert found == {
        "lesion/.hidden": str((source / "lesion" / ".hidden").resolve()),
        "lesion/link.dcm": str((elsewhere / "target.dcm").resolve()),
        "lesion/p1/1.dcm": str((source / "lesion" / "p1" / "1.dcm").resolve()),
    }


def test_demo_key_is_stored_once_and_never_overrides_a_key(tmp_path: Path) -> None:
    """The phantom demo's seed-derived key is used only when the private folder has none yet."""
    from pipeline.ingest.keys import KEY_BYTES, demo_key, load_or_create_key

    assert demo_key(0) == demo_key(0) != demo_key(1) and len(demo_key(0)) == KEY_BYTES
    assert load_or_create_key(tmp_path / "demo", new_key=demo_key(0)) == demo_key(0)
    assert load_or_create_key(tmp_path / "demo", new_key=demo_key(1)) == demo_key(0)  # the stored key wins
    assert load_or_create_key(tmp_path / "demo") == demo_key(0)
    assert (tmp_path / "demo" / "pseudonym.key").stat().st_mode & 0o077 == 0
    random_key = load_or_create_key(tmp_path / "real")
    assert len(random_key) == KEY_BYTES and random_key not in (demo_key(0), demo_key(1))


def test_demo_key_only_for_the_phantom_cohort(tmp_path: Path, capsys) -> None:
    """`medsynth demo` derives its key only when every source is the cohort it wrote, and never replaces a key."""
    import yaml

    from pipeline.cli import _use_demo_key
    from pipeline.config import load_config
    from pipeline.ingest.keys import KEY_FILE, demo_key
    from pipeline.workflow import RunPaths

    def config(root: Path, sources: list[str]):
        path = root.with_suffix(".yaml")
        path.write_text(yaml.safe_dump({"name": "d", "run_root": str(root), "seed": 4, "sources": sources}))
        return load_config(path)

    demo = config(tmp_path / "demo", [str(tmp_path / "demo" / "raw" / "dicom")])
    _use_demo_key(demo, RunPaths(demo.resolved_run_root))
    assert (tmp_path / "demo" / "private" / KEY_FILE).read_text().strip() == demo_key(4).hex()

    real = config(tmp_path / "real", [str(tmp_path / "demo" / "raw" / "dicom"), str(tmp_path / "hospital")])
    _use_demo_key(real, RunPaths(real.resolved_run_root))
    assert not (tmp_path / "real" / "private" / KEY_FILE).exists()  # ingest will draw a random key

    earlier = config(tmp_path / "earlier", [str(tmp_path / "earlier" / "raw")])
    (tmp_path / "earlier" / "private").mkdir(parents=True)
    (tmp_path / "earlier" / "private" / KEY_FILE).write_text("ab" * 32 + "\n")
    _use_demo_key(earlier, RunPaths(earlier.resolved_run_root))
    assert (tmp_path / "earlier" / "private" / KEY_FILE).read_text().strip() == "ab" * 32
    assert "holds the key of an earlier run" in capsys.readouterr().out
