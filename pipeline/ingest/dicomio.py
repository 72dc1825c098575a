"""Fast DICOM paths for the common case, each with a pydicom fallback.

Bare pydicom spends most of an anonymizer's time in per-element Python: converting raw element
bytes it will write back unchanged, and re-encoding them. Here:

* :func:`scan_header` reads the few tags the scan needs straight from the first bytes of a file
  (explicit or implicit VR little endian); anything unusual falls back to pydicom.
* :func:`read_file` parses a little-endian file into the same raw elements ``pydicom.dcmread``
  gives, without pydicom's per-element file reads and VR decoding (a third of a bare read).
* :func:`encode_file` writes a dataset whose untouched elements are still raw by copying their
  bytes, and lets pydicom encode only the elements anonymization replaced. It applies only when
  the dataset keeps its original little-endian encoding and character set, which is exactly when
  pydicom itself would write the raw bytes unchanged, so the output is byte-identical to
  ``pydicom.dcmwrite`` (tests check it).
* :func:`element_value` decodes the numbers and ASCII codes a reader needs (geometry, pixel
  description, modality) from raw bytes; pydicom converts everything else.
* :func:`fast_pixels` views native (uncompressed, little-endian) pixel data with numpy.

These functions use ``Dataset._dict`` (pydicom 3) to avoid per-element tag conversions.
"""

from __future__ import annotations

import struct
import warnings
from io import BytesIO
from typing import Any

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_sequence
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID
from pydicom.valuerep import VR as _VR
from pydicom.values import convert_string

__all__ = [
    "scan_header",
    "read_file",
    "element_value",
    "SharedElements",
    "encode_file",
    "fast_pixels",
    "IMPLEMENTATION_VERSION",
]

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
_VR_NAMES = {str(vr.value).encode("ascii"): str(vr.value) for vr in _VR}  # b"OB" -> "OB"
_HEADER = struct.Struct("<HH2sH")  # tag, explicit VR, 16-bit length
_LONG = struct.Struct("<I")
_SCAN_LAST = 0x0020000E  # SeriesInstanceUID: the last tag the scan needs
_SCAN_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x00100010: "PatientName",
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


def _element_header(data: bytes, offset: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None when implicit, value length, value offset) of the element at ``offset`` (PS3.5 7.1)."""
    group, element, vr, length = _HEADER.unpack_from(data, offset)
    if implicit:
        return (group << 16) | element, None, _LONG.unpack_from(data, offset + 4)[0], offset + 8
    if vr in _LONG_VRS:
        return (group << 16) | element, vr, _LONG.unpack_from(data, offset + 8)[0], offset + 12
    return (group << 16) | element, vr, length, offset + 8


def _read_until(data: bytes, offset: int, implicit: bool) -> dict[str, str]:
    values: dict[str, str] = {}
    while offset + 8 <= len(data):
        tag, vr, length, start = _element_header(data, offset, implicit)
        if tag > _SCAN_LAST:
            return values
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
        tag, _, length, start = _element_header(data, offset, implicit)
        if tag == _ITEM_END:
            return offset + 8
        if length == 0xFFFFFFFF:
            offset = _skip_undefined(data, start, implicit)
        else:
            offset = start + length
    raise _Unsupported


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


def read_file(content: bytes) -> FileDataset | None:
    """``pydicom.dcmread(BytesIO(content))`` for the common files; None: use pydicom.

    Handles files with a preamble whose dataset is little endian, explicit or implicit VR (the
    compressed transfer syntaxes included). The elements are pydicom's own: the same raw
    elements (tag, VR, length, value, offset), undefined-length sequences parsed by pydicom's
    ``read_sequence``, encapsulated pixel data as pydicom reads it. Anything else - no preamble,
    big endian, deflate, a command set, a VR the transfer syntax contradicts, a truncated or
    padded end - is left to pydicom, so every oddity is handled (or reported) the way it does.
    """
    try:
        return _read_file(content)
    except Exception:  # any surprise: pydicom reads the file (and reports its problem) as it always did
        return None


def _read_file(content: bytes) -> FileDataset:
    if len(content) < 144 or content[128:132] != b"DICM":
        raise _Unsupported
    meta_elements, offset, _ = _raw_elements(content, 132, implicit=False, meta=True)
    file_meta = FileMetaDataset(meta_elements)
    file_meta.set_original_encoding(False, True, default_encoding)
    syntax_element = meta_elements.get(0x00020010)
    if syntax_element is None or not syntax_element.value:
        raise _Unsupported
    syntax = UID(syntax_element.value.decode("ascii").strip(" \x00"))
    if syntax == _IMPLICIT_LE:
        implicit = True
    elif syntax == _EXPLICIT_LE or (syntax.is_compressed and not syntax.is_deflated and syntax.is_little_endian):
        implicit = False
    else:
        raise _Unsupported
    if offset + 6 > len(content):
        raise _Unsupported  # nothing after the file meta: pydicom decides what that is
    if struct.unpack_from("<H", content, offset)[0] == 0x0000:
        raise _Unsupported  # a command set: pydicom reads it apart
    vr = content[offset + 4 : offset + 6]
    # pydicom's check that the dataset matches the transfer syntax (else it switches VR mode)
    if (not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B)) != implicit:
        raise _Unsupported
    elements, _, encoding = _raw_elements(content, offset, implicit=implicit, meta=False)
    dataset = Dataset(elements)
    dataset.set_original_encoding(implicit, True, encoding)
    ds = FileDataset(BytesIO(content), dataset, content[:128], file_meta, implicit, True)
    ds.set_original_encoding(implicit, True, dataset._character_set)
    return ds


def _raw_elements(
    data: bytes, offset: int, implicit: bool, meta: bool
) -> tuple[dict[BaseTag, RawDataElement | DataElement], int, str | list[str]]:
    """The elements from ``offset`` to the end (``meta``: to the end of group 0002), as pydicom's
    ``data_element_generator`` yields them; also the end offset and the character encoding."""
    elements: dict[BaseTag, RawDataElement | DataElement] = {}
    encoding: str | list[str] = default_encoding
    end = len(data)
    unpack_header = _HEADER.unpack_from
    unpack_long = _LONG.unpack_from
    vr_names = _VR_NAMES
    new_tuple = tuple.__new__
    while offset < end:
        group, element, vr_bytes, length = unpack_header(data, offset)
        if meta and group != 0x0002:
            break
        number = group << 16 | element
        if implicit:
            vr = None
            length = unpack_long(data, offset + 4)[0]
            start = offset + 8
        else:
            vr = vr_names.get(vr_bytes)
            if vr is None:
                raise _Unsupported  # pydicom would guess (implicit VR switch, unknown VR)
            if vr in _LONG_VR_STR:
                length = unpack_long(data, offset + 8)[0]
                start = offset + 12
            else:
                start = offset + 8
        if number == _ITEM_END or number == _SEQ_END or number == _ITEM:
            raise _Unsupported  # a delimiter at the top level
        tag = BaseTag(number)  # the dict keys pydicom uses
        if length != 0xFFFFFFFF:
            offset = start + length
            if offset > end:
                raise _Unsupported  # truncated: pydicom reports it
            value = data[start:offset] if length else empty_value_for_VR(vr, raw=True)
            if number == 0x00080005:
                encoding = convert_encodings(convert_string(value or b"", True))
            # tuple.__new__: the NamedTuple constructor's keyword handling costs more than the parse
            elements[tag] = new_tuple(RawDataElement, (tag, vr, length, value, start, implicit, True, True, False))
            continue
        vr = _undefined_length_vr(data, start, tag, vr)
        if vr == "SQ":
            buffer = BytesIO(data)
            buffer.seek(start)
            sequence = read_sequence(buffer, implicit, True, 0xFFFFFFFF, encoding)
            elements[tag] = DataElement(tag, vr, sequence, start, is_undefined_length=True)
            offset = buffer.tell()
            continue
        value, offset = _encapsulated_value(data, start)
        elements[tag] = RawDataElement(tag, vr, length, value, start, implicit, True)
    if meta and not elements:
        raise _Unsupported
    return elements, offset, encoding


def _undefined_length_vr(data: bytes, start: int, tag: int, vr: str | None) -> str | None:
    """The VR pydicom gives an undefined-length element (PS3.5 6.2.2: UN of undefined length is SQ)."""
    if vr == "UN" and pydicom_config.settings.infer_sq_for_un_vr:
        return "SQ"
    if vr is None or (vr == "UN" and pydicom_config.replace_un_with_known_vr):
        try:
            return dictionary_VR(tag)
        except KeyError:
            return "SQ" if struct.unpack_from("<I", data, start)[0] == 0xE000FFFE else vr
    return vr


def _encapsulated_value(data: bytes, start: int) -> tuple[bytes, int]:
    """An undefined-length non-sequence value (encapsulated pixel data): its items up to the
    sequence delimiter, parsed item by item; returns the value and the offset after the delimiter."""
    offset = start
    while True:
        tag, length = struct.unpack_from("<II", data, offset)
        if tag == 0xE0DDFFFE:
            if length != 0:
                raise _Unsupported
            return data[start:offset], offset + 8
        if tag != 0xE000FFFE or offset + 8 + length > len(data):
            raise _Unsupported
        offset += 8 + length


_NUMBER_FORMATS = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "FL": "f", "FD": "d"}
# VRs whose values are ASCII by definition (no character set involved).
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})


def element_value(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)`` for a top-level element, without pydicom's conversion where it can.

    Raw little-endian numbers (US UL SS SL FL FD) and ASCII values (CS DS IS UI AS DA DT TM AE)
    are decoded from their bytes: DS as float, IS as int, text stripped; several values give a
    list. Every other element, and any value these rules do not cover (empty or malformed text),
    is pydicom's own ``ds[tag].value``.
    """
    tag = tag_for_keyword(keyword)
    elem = ds._dict.get(tag) if tag is not None else None
    if elem is None:
        return default
    if type(elem) is RawDataElement and elem.is_little_endian and not elem.is_buffered:
        vr = elem.VR
        if vr is None:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        value = elem.value
        try:
            if vr in _ASCII_VRS:
                return _ascii_value(value, vr)
            number = _NUMBER_FORMATS.get(vr)
            if number is not None:
                return _number_value(value, number)
        except (ValueError, UnicodeDecodeError, struct.error):
            pass  # let pydicom convert (and complain) as it always would
    return ds[tag].value


def _ascii_value(value: bytes | None, vr: str) -> Any:
    # As pydicom's converters: trailing padding off the whole value, then split on backslashes.
    text = value.decode("ascii").rstrip(" \x00") if value else ""
    parts = text.split("\\")
    if not text or (vr in ("DS", "IS") and not all(part.strip() for part in parts)):
        raise ValueError("empty values: pydicom decides what they become")
    if vr == "DS":
        items: list[object] = [float(part) for part in parts]
    elif vr == "IS":
        items = [int(part) for part in parts]
    elif vr in ("AE", "UI"):  # pydicom strips each AE title and each UID
        items = [part.strip() for part in parts]
    else:
        items = list(parts)
    return items[0] if len(items) == 1 else items


def _number_value(value: bytes | None, code: str) -> Any:
    if not value:
        return None
    size = struct.calcsize(code)
    if len(value) % size:
        raise ValueError("value length is not a multiple of the VR's size")
    numbers = list(struct.unpack(f"<{len(value) // size}{code}", value))
    return numbers[0] if len(numbers) == 1 else numbers


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


class SharedElements:
    """Elements every file of a series carries (the very same objects), each encoded once.

    The de-identification method code sequence is the same in every anonymized file; pydicom
    would encode it again for each. The elements must not change while this object is in use.
    """

    def __init__(self, *element_sets: dict[int, DataElement]) -> None:
        # Holding the elements keeps their ids from being reused by other objects.
        self._elements = {id(elem): elem for elements in element_sets for elem in elements.values()}
        self._encoded: dict[tuple[int, str], bytes] = {}

    def encoded(self, elem: object, context: str) -> bytes | None:
        """The bytes of ``elem`` encoded in ``context`` before, if it is one of the shared elements."""
        return self._encoded.get((id(elem), context)) if id(elem) in self._elements else None

    def remember(self, elem: object, context: str, data: bytes) -> None:
        if id(elem) in self._elements:
            self._encoded[(id(elem), context)] = data


def encode_file(ds: Dataset, transfer_syntax: str, shared: SharedElements | None = None) -> bytes:
    """The bytes of a DICOM file for ``ds`` (new file meta) in ``transfer_syntax``.

    Uses the raw-copy path when ``ds`` keeps its original little-endian encoding and character
    set; otherwise ``pydicom.dcmwrite``. ``shared``: the series' shared elements, encoded once.
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
            sop_class, sop_instance = element_value(ds, "SOPClassUID"), element_value(ds, "SOPInstanceUID")
            if not sop_class or not sop_instance:
                raise _Unsupported  # pydicom's writer reports the missing attribute
            body = _encode_dataset(ds, implicit, shared or SharedElements())
            return _meta_bytes(str(sop_class), str(sop_instance), str(syntax)) + body
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


def _encode_dataset(ds: Dataset, implicit: bool, shared: SharedElements) -> bytes:
    parts: list[bytes] = []
    elements = ds._dict
    encodings = ds.get("SpecificCharacterSet", "iso8859")
    context = f"{implicit} {encodings}"  # what besides an element decides its encoded bytes
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
        known = shared.encoded(elem, context)
        if known is not None:
            parts.append(known)
            continue
        buffer = DicomBytesIO()
        buffer.is_little_endian = True
        buffer.is_implicit_VR = implicit
        write_data_element(buffer, elem, encodings)
        parts.append(buffer.getvalue())
        shared.remember(elem, context, parts[-1])
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
        bits = int(element_value(ds, "BitsAllocated"))
        stored = int(element_value(ds, "BitsStored"))
        signed = int(element_value(ds, "PixelRepresentation")) == 1
        rows, columns = int(element_value(ds, "Rows")), int(element_value(ds, "Columns"))
        samples = int(element_value(ds, "SamplesPerPixel", 1) or 1)
        frames = int(element_value(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if samples != 1 or bits not in (8, 16, 32) or not 0 < stored <= bits:
        return None
    if str(element_value(ds, "PhotometricInterpretation", "")).strip() not in ("MONOCHROME1", "MONOCHROME2"):
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
