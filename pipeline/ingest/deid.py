"""Apply the resolved Table E.1-1 profile to a pydicom dataset, recursing into every sequence.

One walk over the elements does three things at once, reading raw element bytes wherever it can
(no value conversion for the elements it keeps, which is what makes it fast):

* applies the action of each tag (D Z X K C U, private elements, repeating groups, and the
  safety net by VR for public attributes the table does not list);
* records, for the audit log, which rule acted on which tag (never the value);
* gathers the identifying values it removed (names, IDs, dates, UIDs, private text) and the
  text it kept, for the leak audit and for cleaning descriptors. These stay in memory and in
  worker results only; they are never written or logged.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from pydicom import config
from pydicom.datadict import DicomDictionary, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

from pipeline.ingest.config import SafePrivateElement
from pipeline.ingest.keys import (
    keyed_uid,
    shift_date,
    shift_datetime,
    shift_instant,
    shift_time,
    time_offset_microseconds,
)
from pipeline.ingest.profile import SAFETY_NET, Profile

__all__ = [
    "DUMMY_VALUES",
    "STOP_VALUES",
    "DeidContext",
    "anonymize",
    "identifier_candidates",
    "is_identifier",
    "identifier_kind",
    "tag_text",
]

DUMMY_VALUES: dict[str, object] = {
    "AE": "ANON", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DT": "19000101000000",
    "TM": "000000", "DS": "0", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED", "SH": "ANONYMIZED",
    "ST": "ANONYMIZED", "UT": "ANONYMIZED", "UC": "ANONYMIZED", "PN": "ANONYMIZED", "UR": "",
    "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0,
}
# Values that are never treated as identifiers: our own dummies and common placeholders.
STOP_VALUES = frozenset(
    {
        b"anonymized", b"anonymous", b"anon", b"unknown", b"none", b"null", b"n/a", b"test", b"yes",
        b"19000101", b"19000101000000", b"000000", b"removed", b"redacted", b"original", b"primary",
        b"secondary", b"derived", b"axial", b"other", b"patient",
        b"dicomdir",  # the index file name fixed by PS3.10, not an identifier
    }
)
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})
_FREE_TEXT = frozenset({"LO", "LT", "SH", "ST", "UT", "UC"})
# Retained values the leak audit must not mistake for identifiers (numbers and times excluded).
_KEPT_TEXT_VRS = frozenset({"AE", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "UC", "UI", "UT"})
_NUMERIC_LIKE = re.compile(rb"^[0-9.\-+/: ]+$")
_NAME_PARTS = re.compile(rb"[\^= ,]+")
_PRINTABLE = re.compile(rb"^[\x20-\x7e]+$")
# The character repertoire of the VRs whose values are numbers, dates or times (PS3.5 6.2, plus the
# '-' of ranges and the ACR-NEMA '.'/':' separators). A kept value outside it is free text where a
# number belongs - it can hold anything, a name included - so it is emptied instead of copied.
_FORMATTED_VALUE = {
    "DA": re.compile(rb"^[0-9.\- \\]*$"),
    "TM": re.compile(rb"^[0-9.:\- \\]*$"),
    "DT": re.compile(rb"^[0-9.+\- \\]*$"),
    "DS": re.compile(rb"^[0-9.+\-eE \\]*$"),
    "IS": re.compile(rb"^[0-9+\- \\]*$"),
    "AS": re.compile(rb"^[0-9DWMY \\]*$"),
}


def _date_time_pairs() -> dict[int, int]:
    """DA tag -> TM tag of the same event, and back (StudyDate/StudyTime, DateOfLastCalibration/
    TimeOfLastCalibration...), from the data dictionary: the pairs that shift as one instant."""
    pairs: dict[int, int] = {}
    for tag, entry in DicomDictionary.items():
        vr, keyword = entry[0], entry[4]
        if vr != "DA" or "Date" not in keyword:
            continue
        partner = tag_for_keyword(keyword.replace("Date", "Time"))
        if partner is not None and DicomDictionary[partner][0] == "TM":
            pairs[tag] = partner
            pairs[partner] = tag
    return pairs


_PAIRS = _date_time_pairs()


def tag_text(tag: int) -> str:
    """``(gggg,eeee)`` for a tag number."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def is_identifier(value: bytes) -> bool:
    """Is a (lower-cased, stripped) value distinctive enough to search for without false alarms?"""
    if len(value) < 4 or value in STOP_VALUES:
        return False
    if _NUMERIC_LIKE.match(value) and len(value.replace(b".", b"").replace(b" ", b"")) < 6:
        return False  # short numbers occur everywhere (sizes, counts)
    return True


_KINDS = {
    "PN": "person name", "DA": "date", "DT": "date", "UI": "UID", "LO": "identifier or text", "SH": "identifier or text",
    "AE": "network name", "LT": "free text", "ST": "free text", "UT": "free text", "UC": "free text", "UR": "address",
}


def identifier_kind(vr: str) -> str:
    """The kind of identifier a value of this VR is, as audit findings name it."""
    return _KINDS.get(vr, "identifier")


def identifier_candidates(value: bytes, vr: str) -> set[bytes]:
    """The searchable identifiers in one element value (lower-cased bytes)."""
    if vr in ("TM", "DS", "IS", "AS", "CS", "SQ") or not value:
        return set()
    value = value.lower()
    parts = [value] if vr in _SINGLE_VALUED else value.split(b"\\")
    found: set[bytes] = set()
    for part in parts:
        part = part.strip(b" \x00")
        if vr == "DT":
            part = part[:8]
        if vr == "PN":
            found.update(piece for piece in _NAME_PARTS.split(part) if is_identifier(piece))
        if vr in _FREE_TEXT and len(part) > 64:
            # A long free text is searched by its comma/semicolon-separated pieces.
            found.update(piece.strip() for piece in re.split(rb"[,;\n\r]+", part) if is_identifier(piece.strip()))
            continue
        if is_identifier(part):
            found.add(part)
    return found


@dataclass
class DeidContext:
    """What one series' anonymization needs, and what it learns (per worker, never shared)."""

    profile: Profile
    key: bytes
    subject_id: str
    date_offset: int | None  # days every date moves back; None: Modified Dates is off (dates follow the table)
    safe_private: tuple[SafePrivateElement, ...] = ()
    # The sub-day part of the same offset (microseconds); None: keyed from (key, subject_id).
    time_offset: int | None = None
    # Outputs of the walk:
    audit: Counter = field(default_factory=Counter)  # (parent path, tag, action, rule) -> element count
    identifiers: dict[bytes, str] = field(default_factory=dict)  # value -> kind
    kept_text: set[bytes] = field(default_factory=set)
    _deferred: list[tuple[Dataset, int, str, str]] = field(default_factory=list)
    # The files of a series repeat their study/series/frame UIDs and dates: map each value once.
    _uids: dict[str, str] = field(default_factory=dict)
    _dates: dict[tuple[str, str, str], str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.time_offset is None:
            self.time_offset = time_offset_microseconds(self.key, self.subject_id)

    def new_uid(self, uid: str) -> str:
        """The keyed replacement of ``uid`` (same key, same UID → same new UID)."""
        mapped = self._uids.get(uid)
        if mapped is None:
            mapped = self._uids[uid] = keyed_uid(self.key, uid)
        return mapped

    def shifted(self, value: str, vr: str, partner: str = "") -> str | None:
        """A DA/DT/TM value moved back by the patient's offset; None if it cannot be parsed.

        ``partner``: the time of a date (or the date of a time) of the same event, e.g. StudyTime
        for StudyDate: the two shift as one instant. Without one, a date moves by whole days and a
        time by the sub-day part (modulo a day).
        """
        cached = (vr, value, partner)
        if cached not in self._dates:
            self._dates[cached] = _shift_value(value, vr, partner, self.date_offset or 0, self.time_offset or 0)
        return self._dates[cached]


def _shift_value(value: str, vr: str, partner: str, days: int, micros: int) -> str | None:
    if vr == "DT":
        return shift_datetime(value, days, micros)
    if partner:
        instant = shift_instant(value, partner, days, micros) if vr == "DA" else shift_instant(partner, value, days, micros)
        if instant is not None:
            return instant[0] if vr == "DA" else instant[1]
    return shift_date(value, days) if vr == "DA" else shift_time(value, micros)


def anonymize(ds: Dataset, ctx: DeidContext) -> None:
    """Anonymize ``ds`` in place (top level and every nested sequence item).

    Descriptors under the Clean Descriptors option are cleaned after the walk, once every
    identifier of the dataset is known. The caller sets the pseudonymous PatientID/Name and the
    de-identification method attributes (see :func:`pipeline.ingest.task`).
    """
    _walk(ds, ctx, "")
    deferred, ctx._deferred = ctx._deferred, []
    for parent, tag, vr, path in deferred:
        _clean_descriptor(parent, tag, vr, path, ctx)


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _element_vr(elem: DataElement | RawDataElement, tag: int) -> str:
    vr = elem.VR
    if not vr or vr == "UN":
        known = _dictionary_vr(tag) if not (tag >> 16) & 1 else "UN"
        vr = known if known != "UN" else (vr or "UN")
    if " or " in vr:  # ambiguous dictionary VRs such as 'US or SS'
        vr = vr.split(" or ")[0]
    return vr


def _value_bytes(elem: DataElement | RawDataElement) -> bytes:
    """The element's value as bytes, without converting raw elements."""
    value = elem.value
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (MultiValue, list, tuple)):
        return b"\\".join(_text(item) for item in value)
    return _text(value)


def _text(value: object) -> bytes:
    if isinstance(value, PersonName):
        value = str(value)
    return str(value).encode("utf-8", "replace")


def _new_element(tag: int, vr: str, value: object) -> DataElement:
    # Values written here are ours (dummies, keyed UIDs, shifted dates, empty): valid by
    # construction, so pydicom's per-value validation is skipped.
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


def _walk(ds: Dataset, ctx: DeidContext, path: str) -> None:
    # Works on the dataset's element dict directly (pydicom 3 ``Dataset._dict``): no tag
    # conversion and no value decoding for the elements it keeps, which is most of them.
    elements = ds._dict
    private_keep = _safe_private_tags(ds, ctx) if ctx.safe_private else set()
    rule_of = ctx.profile.rule_for
    original = list(elements.items())
    partners = {tag: raw for tag, raw in original if tag in _PAIRS}  # dates and times before any shift
    for tag, raw in original:
        group, element = tag >> 16, tag & 0xFFFF
        if group == 0x0002:
            continue  # file meta is rebuilt by the writer
        if element == 0x0000:  # group lengths are retired and would be wrong after edits
            del elements[tag]
            continue
        vr = _element_vr(raw, tag)
        if group & 1:
            if tag in private_keep:
                ctx.audit[(path, tag, "K", "safe_private")] += 1
                ctx.kept_text.add(_value_bytes(raw).strip(b" \x00").lower())
                continue
            # Private creators name a vendor's block, not a patient: only the data elements count.
            if element >= 0x1000 and vr in ("LO", "SH", "PN", "LT", "ST", "UT", "UC", "UN"):
                value = _value_bytes(raw).strip(b" \x00")
                if vr != "UN" or _PRINTABLE.match(value or b"\x00"):
                    _note(ctx, value, "LO" if vr == "UN" else vr, "private element text")
            del elements[tag]
            ctx.audit[(path, group << 16 | 0xFFFF, "X", "private")] += 1
            continue
        rule = rule_of(tag, vr)
        if rule is None:
            _keep(ds, tag, raw, vr, path, ctx)
            continue
        action, source = rule
        if vr == "SQ":
            _sequence_action(ds, tag, raw, action, source, path, ctx)
            continue
        if action != "K" and source != "clean_descriptors":  # a cleaned descriptor is kept, minus identifiers
            _note(ctx, _value_bytes(raw), vr)
        if action == "X":
            del elements[tag]
        elif action == "Z":
            elements[tag] = _new_element(tag, vr, None)
        elif action == "D":
            elements[tag] = _new_element(tag, vr, _dummy(vr, raw, ctx))
        elif action == "U":
            if vr == "UI":
                elements[tag] = _new_element(tag, vr, _map_uids(raw, ctx))
            else:
                elements[tag] = _new_element(tag, vr, None)
                action = "Z"
        elif action == "K":
            if _keep(ds, tag, raw, vr, path, ctx) == "Z":
                continue  # audited as malformed_value
        elif action == "C":
            if source in ("modified_dates", SAFETY_NET):
                action = _shift(ds, tag, raw, vr, ctx, partners.get(_PAIRS.get(tag, -1)))
            else:
                ctx._deferred.append((ds, tag, vr, path))
                continue  # audited once cleaned
        ctx.audit[(path, tag, action, source)] += 1


def _malformed(raw: DataElement | RawDataElement, vr: str) -> bool:
    """Does a number/date/time value hold characters its VR does not allow (e.g. a name)?"""
    pattern = _FORMATTED_VALUE.get(vr)
    return pattern is not None and not pattern.match(_value_bytes(raw).strip(b" \x00"))


def _blank_malformed(ds: Dataset, tag: int, raw: DataElement | RawDataElement, vr: str, ctx: DeidContext) -> None:
    # The value is searched for in the output like any removed identifier ("LO": as text).
    _note(ctx, _value_bytes(raw), "LO", "malformed value")
    ds._dict[tag] = _new_element(tag, vr, None)


def _keep(ds: Dataset, tag: int, raw: DataElement | RawDataElement, vr: str, path: str, ctx: DeidContext) -> str:
    """Keep an element (recursing into sequences); returns the action taken ("Z" for a malformed value)."""
    if _malformed(raw, vr):
        _blank_malformed(ds, tag, raw, vr, ctx)
        ctx.audit[(path, tag, "Z", "malformed_value")] += 1
        return "Z"
    if vr == "SQ":
        for item in ds[tag].value or ():
            _walk(item, ctx, path + tag_text(tag) + "[].")
    elif vr in _KEPT_TEXT_VRS:
        value = _value_bytes(raw).strip(b" \x00")
        if value:
            ctx.kept_text.add(value.lower())
    return "K"


def _sequence_action(
    ds: Dataset, tag: int, raw: DataElement | RawDataElement, action: str, source: str, path: str, ctx: DeidContext
) -> None:
    if action == "X":
        _harvest_sequence(ds[tag].value, ctx)
        del ds._dict[tag]
    elif action == "Z":
        _harvest_sequence(ds[tag].value, ctx)
        ds._dict[tag] = DataElement(tag, "SQ", Sequence([]))
    else:
        # D, U (X/Z/U*), K, C on a sequence: keep its structure and apply the table inside.
        for item in ds[tag].value or ():
            _walk(item, ctx, path + tag_text(tag) + "[].")
    ctx.audit[(path, tag, action if action in ("X", "Z") else f"{action}:recurse", source)] += 1


def _harvest_sequence(items: Sequence | None, ctx: DeidContext) -> None:
    """Collect the identifiers inside a sequence that is removed whole (for the leak audit)."""
    for item in items or ():
        for elem in item.iterall():
            vr = _element_vr(elem, int(elem.tag))
            group, element = int(elem.tag) >> 16, int(elem.tag) & 0xFFFF
            if vr != "SQ" and (not group & 1 or (element >= 0x1000 and (vr in _FREE_TEXT or vr == "PN"))):
                _note(ctx, _value_bytes(elem), vr)


def _note(ctx: DeidContext, value: bytes, vr: str, kind: str | None = None) -> None:
    """Remember the identifiers in a removed or replaced value (for the leak audit and cleaning)."""
    for candidate in identifier_candidates(value, vr):
        ctx.identifiers.setdefault(candidate, kind or identifier_kind(vr))


def _dummy(vr: str, raw: DataElement | RawDataElement, ctx: DeidContext) -> object:
    if vr == "UI":
        return _map_uids(raw, ctx)
    return DUMMY_VALUES.get(vr)


def _map_uids(raw: DataElement | RawDataElement, ctx: DeidContext) -> str | list[str] | None:
    text = _value_bytes(raw).decode("ascii", "replace").strip(" \x00")
    if not text:
        return None
    mapped = [ctx.new_uid(uid.strip(" \x00")) for uid in text.split("\\") if uid.strip(" \x00")]
    return mapped[0] if len(mapped) == 1 else mapped


def _shift(
    ds: Dataset, tag: int, raw: DataElement | RawDataElement, vr: str, ctx: DeidContext, partner: object | None
) -> str:
    """Shift a DA, DT or TM value by the patient's offset (Modified Dates); returns the action taken.

    ``partner``: the source element of the same event's time (for a date) or date (for a time);
    value by value, the two move as one instant. A value that cannot be parsed is removed (X), a
    time holding free text is emptied (Z, searched for like a removed value).
    """
    text = _value_bytes(raw).decode("ascii", "replace").strip(" \x00")
    if vr in ("TM", "DT") and _malformed(raw, vr):
        _blank_malformed(ds, tag, raw, vr, ctx)
        return "Z"
    if not text:
        return "K"
    if ctx.date_offset is None or vr not in ("DA", "DT", "TM"):
        del ds._dict[tag]
        return "X"
    values = text.split("\\")
    paired = _partner_values(partner, len(values)) if vr != "DT" else [""] * len(values)
    shifted = [ctx.shifted(value.strip(" \x00"), vr, other) for value, other in zip(values, paired)]
    if any(value is None for value in shifted):
        del ds._dict[tag]  # an unparsable date or time cannot be shifted safely
        return "X"
    ds._dict[tag] = _new_element(tag, vr, shifted[0] if len(shifted) == 1 else shifted)
    return "C"


def _partner_values(partner: object | None, count: int) -> list[str]:
    """The partner element's values, one per value of the shifted element; empty strings when they do not pair up."""
    if partner is None:
        return [""] * count
    values = [value.strip(" \x00") for value in _value_bytes(partner).decode("ascii", "replace").strip(" \x00").split("\\")]  # type: ignore[arg-type]
    return values if len(values) == count else [""] * count


def _clean_descriptor(ds: Dataset, tag: int, vr: str, path: str, ctx: DeidContext) -> None:
    """Keep a descriptor with every known identifier of the series blanked out (Clean Descriptors)."""
    text = _value_bytes(ds.get_item(tag)).decode("utf-8", "replace")
    cleaned = text
    for identifier in sorted(ctx.identifiers, key=len, reverse=True):
        needle = identifier.decode("utf-8", "replace")
        cleaned = re.sub(rf"(?<![0-9A-Za-z]){re.escape(needle)}(?![0-9A-Za-z])", "***", cleaned, flags=re.IGNORECASE)
    ds[tag] = DataElement(tag, vr, cleaned.strip() or None)
    ctx.kept_text.add(cleaned.strip().lower().encode("utf-8", "replace"))
    ctx.audit[(path, tag, "C", "clean_descriptors")] += 1


def _safe_private_tags(ds: Dataset, ctx: DeidContext) -> set[int]:
    """Private tags of this dataset level on the allow-list, plus their private creators."""
    creators: dict[tuple[int, int], str] = {}
    for tag in ds.keys():
        tag = int(tag)
        group, element = tag >> 16, tag & 0xFFFF
        if group & 1 and 0x0010 <= element <= 0x00FF:
            creators[(group, element)] = _value_bytes(ds.get_item(tag)).decode("latin-1").strip(" \x00").upper()
    keep: set[int] = set()
    for tag in ds.keys():
        tag = int(tag)
        group, element = tag >> 16, tag & 0xFFFF
        if not group & 1 or element < 0x1000:
            continue
        block, offset = element >> 8, element & 0xFF
        creator = creators.get((group, block))
        if creator is None:
            continue
        for allowed in ctx.safe_private:
            if allowed.creator.strip().upper() == creator and allowed.element == offset and allowed.group in (None, group):
                keep.add(tag)
                keep.add((group << 16) | block)
    return keep
