"""Fast DICOM paths for the common case, each with a pydicom fallback.

Bare pydicom spends most of an anonymizer's time in per-element Python: converting raw element
bytes it will write back unchanged, and re-encoding them. Here:

* :func:`scan_header` reads the few tags the scan needs straight from the first bytes of a file
  (explicit or implicit VR little endian); anything unusual falls back to pydicom.
* :func:`encode_file` writes a dataset whose untouched elements are still raw by copying their
  bytes, and lets pydicom encode only the elements anonymization replaced. It applies only when
  the dataset keeps its original little-endian encoding and character set, which is exactly when
  pydicom itself would write the raw bytes unchanged, so the output is byte-identical to
  ``pydicom.dcmwrite`` (tests check it).
* :func:`fast_pixels` views native (uncompressed, little-endian) pixel data with numpy.

These functions use ``Dataset._dict`` (pydicom 3) to avoid per-element tag conversions.
"""

from __future__ import annotations

import struct
import warnings
from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

__all__ = ["scan_header", "encode_file", "fast_pixels", "IMPLEMENTATION_VERSION"]

IMPLEMENTATION_VERSION = "MEDSYNTH"
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_LONG_VR_STR = frozenset(vr.decode() for vr in _LONG_VRS)
# String VRs whose ASCII values are encoded here exactly as pydicom would (no charset involved).
_SIMPLE_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UT"})
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_SCAN_LAST = 0x0020000E  # SeriesInstanceUID: the last tag the scan needs
_SCAN_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x00100020: "PatientID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}


class _Unsupported(Exception):
    """The fast path does not handle this file; use pydicom."""


# ------------------------------------------------------------------------------------------
# Scanning
# ------------------------------------------------------------------------------------------


def scan_header(head: bytes) -> tuple[str, dict[str, str]] | None:
    """``(media storage SOP class, {keyword: value})`` for the scan's tags, or None (use pydicom).

    ``head`` is the start of a file with a DICOM preamble and file meta (64 KiB is plenty for
    almost any header up to the series UID).
    """
    try:
        if head[128:132] != b"DICM":
            raise _Unsupported
        offset, meta = _read_meta(head, 132)
        syntax = meta.get(0x00020010, "")
        if syntax not in (_EXPLICIT_LE, _IMPLICIT_LE):
            raise _Unsupported
        values = _read_until(head, offset, implicit=syntax == _IMPLICIT_LE)
        return meta.get(0x00020002, ""), values
    except (_Unsupported, struct.error, IndexError, UnicodeDecodeError, ValueError):
        return None


def _read_meta(data: bytes, offset: int) -> tuple[int, dict[int, str]]:
    meta: dict[int, str] = {}
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        if group != 0x0002:
            return offset, meta
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", data, offset + 8)[0]
            start = offset + 12
        else:
            length = struct.unpack_from("<H", data, offset + 6)[0]
            start = offset + 8
        if length == 0xFFFFFFFF or start + length > len(data):
            raise _Unsupported
        if vr in (b"UI", b"SH", b"AE"):
            meta[(group << 16) | element] = data[start : start + length].decode("ascii").strip(" \x00")
        offset = start + length
    raise _Unsupported


def _element_header(data: bytes, offset: int, implicit: bool) -> tuple[bytes | None, int, int]:
    """(VR or None when implicit, value length, value offset) of the element at ``offset`` (PS3.5 7.1)."""
    if implicit:
        return None, struct.unpack_from("<I", data, offset + 4)[0], offset + 8
    vr = data[offset + 4 : offset + 6]
    if vr in _LONG_VRS:
        return vr, struct.unpack_from("<I", data, offset + 8)[0], offset + 12
    return vr, struct.unpack_from("<H", data, offset + 6)[0], offset + 8


def _read_until(data: bytes, offset: int, implicit: bool) -> dict[str, str]:
    values: dict[str, str] = {}
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        tag = (group << 16) | element
        if tag > _SCAN_LAST:
            return values
        vr, length, start = _element_header(data, offset, implicit)
        is_sequence = length == 0xFFFFFFFF if implicit else vr == b"SQ"
        if length == 0xFFFFFFFF:
            if not is_sequence:
                raise _Unsupported
            offset = _skip_undefined(data, start, implicit)
            continue
        if tag == 0x00041220:  # DirectoryRecordSequence: a DICOMDIR
            values["DirectoryRecordSequence"] = "1"
        if start + length > len(data):
            raise _Unsupported
        name = _SCAN_TAGS.get(tag)
        if name is not None:
            values[name] = data[start : start + length].decode("latin-1").strip(" \x00")
        offset = start + length
    raise _Unsupported  # the header goes on past the bytes we read


def _skip_undefined(data: bytes, offset: int, implicit: bool) -> int:
    """Offset just after an undefined-length sequence's delimiter (items parsed, not decoded)."""
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        tag = (group << 16) | element
        length = struct.unpack_from("<I", data, offset + 4)[0]
        if tag == _SEQ_END:
            return offset + 8
        if tag != _ITEM:
            raise _Unsupported
        if length != 0xFFFFFFFF:
            offset += 8 + length
            continue
        offset = _skip_item(data, offset + 8, implicit)
    raise _Unsupported


def _skip_item(data: bytes, offset: int, implicit: bool) -> int:
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        tag = (group << 16) | element
        if tag == _ITEM_END:
            return offset + 8
        _, length, start = _element_header(data, offset, implicit)
        if length == 0xFFFFFFFF:
            offset = _skip_undefined(data, start, implicit)
        else:
            offset = start + length
    raise _Unsupported


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


def _meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00" if vr == b"UI" else b" "
        if vr in _LONG_VRS:
            return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
        return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value

    body = b"".join(
        [
            element(0x00020001, b"OB", b"\x00\x01"),
            element(0x00020002, b"UI", sop_class.encode("ascii")),
            element(0x00020003, b"UI", sop_instance.encode("ascii")),
            element(0x00020010, b"UI", transfer_syntax.encode("ascii")),
            element(0x00020012, b"UI", PYDICOM_IMPLEMENTATION_UID.encode("ascii")),
            element(0x00020013, b"SH", IMPLEMENTATION_VERSION.encode("ascii")),
        ]
    )
    group_length = struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HI", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def encode_file(ds: Dataset, transfer_syntax: str) -> bytes:
    """The bytes of a DICOM file for ``ds`` (new file meta) in ``transfer_syntax``.

    Uses the raw-copy path when ``ds`` keeps its original little-endian encoding and character
    set; otherwise ``pydicom.dcmwrite``.
    """
    syntax = UID(transfer_syntax)
    implicit = syntax == _IMPLICIT_LE
    original = ds.original_encoding
    same = (
        original == (implicit, True)
        and not syntax.is_deflated
        and syntax.is_little_endian
        and ds.original_character_set == ds._character_set
    )
    if same:
        try:
            body = _encode_dataset(ds, implicit)
            return _meta_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(syntax)) + body
        except _Unsupported:
            pass
    return _pydicom_bytes(ds, syntax)


def _pydicom_bytes(ds: Dataset, syntax: UID) -> bytes:
    from pydicom.dataset import FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    buffer = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _encode_dataset(ds: Dataset, implicit: bool) -> bytes:
    parts: list[bytes] = []
    elements = ds._dict
    encodings = ds.get("SpecificCharacterSet", "iso8859")
    pack_tag = struct.Struct("<HH").pack
    pack_short = struct.Struct("<H").pack
    pack_long = struct.Struct("<I").pack
    for tag in sorted(elements):
        group, element = tag >> 16, tag & 0xFFFF
        if group <= 0x0002 or (element == 0 and group > 6):
            continue
        elem = elements[tag]
        if isinstance(elem, RawDataElement) and not elem.is_buffered and elem.value is not None:
            value = elem.value
            undefined = elem.length == 0xFFFFFFFF
            if implicit:
                if elem.is_implicit_VR is not True:
                    raise _Unsupported
                parts.append(pack_tag(group, element) + pack_long(0xFFFFFFFF if undefined else len(value)))
            else:
                vr = elem.VR
                if elem.is_implicit_VR or not vr or len(vr) != 2:
                    raise _Unsupported
                if vr in _LONG_VR_STR:
                    parts.append(pack_tag(group, element) + vr.encode() + b"\x00\x00" + pack_long(0xFFFFFFFF if undefined else len(value)))
                else:
                    if undefined or len(value) > 0xFFFF:
                        raise _Unsupported
                    parts.append(pack_tag(group, element) + vr.encode() + pack_short(len(value)))
            parts.append(value)
            if undefined:
                parts.append(_SEQ_DELIMITER)
            continue
        if isinstance(elem, RawDataElement):
            elem = ds[tag]
        encoded = _simple_value(elem)
        if encoded is not None:
            vr = elem.VR
            if implicit:
                parts.append(pack_tag(group, element) + pack_long(len(encoded)) + encoded)
            elif vr in _LONG_VR_STR:
                parts.append(pack_tag(group, element) + vr.encode() + b"\x00\x00" + pack_long(len(encoded)) + encoded)
            else:
                parts.append(pack_tag(group, element) + vr.encode() + pack_short(len(encoded)) + encoded)
            continue
        buffer = DicomBytesIO()
        buffer.is_little_endian = True
        buffer.is_implicit_VR = implicit
        write_data_element(buffer, elem, encodings)
        parts.append(buffer.getvalue())
    return b"".join(parts)


def _simple_value(elem: object) -> bytes | None:
    """The encoded value of an empty element or an ASCII string element (what anonymization
    writes: emptied values, dummies, new UIDs, shifted dates); None: let pydicom encode it."""
    vr = getattr(elem, "VR", None)
    value = getattr(elem, "value", None)
    if vr == "SQ" or getattr(elem, "is_buffered", False):
        return None
    if value is None or value == "" or value == b"":
        return b""
    if vr not in _SIMPLE_STRING_VRS:
        return None
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if not all(isinstance(item, str) for item in value):
            return None
        text = "\\".join(value)
    else:
        return None
    if not text.isascii():
        return None
    data = text.encode("ascii")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return data


# ------------------------------------------------------------------------------------------
# Pixels
# ------------------------------------------------------------------------------------------


def fast_pixels(ds: Dataset) -> np.ndarray | None:
    """Native little-endian grayscale pixels as ``(frames, rows, columns)``, or None (use pydicom)."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax not in (_EXPLICIT_LE, _IMPLICIT_LE):
        return None
    try:
        bits = int(ds.BitsAllocated)
        stored = int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if samples != 1 or bits not in (8, 16, 32) or not 0 < stored <= bits:
        return None
    if str(ds.get("PhotometricInterpretation", "")).strip() not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    raw = ds._dict.get(0x7FE00010)
    value = raw.value if raw is not None else None
    if not isinstance(value, (bytes, bytearray)):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    expected = frames * rows * columns * dtype.itemsize
    if len(value) < expected or len(value) > expected + 1:
        return None  # truncated or padded oddly: let pydicom decide (and explain)
    pixels = np.frombuffer(value, dtype=dtype, count=frames * rows * columns).reshape(frames, rows, columns)
    if stored < bits:  # as pydicom does: mask unused high bits, or sign-extend from the stored bits
        shift = bits - stored
        pixels = (pixels << shift) >> shift if signed else pixels & dtype.type((1 << stored) - 1)
    return pixels
