"""DICOM PS3.15 Annex E, Table E.1-1: the Basic Application Level Confidentiality Profile and options.

Source of the table
-------------------
The **basic profile column** is read, as data, from ``dicom-anonymizer`` (Kitware, BSD-3; pinned
``dicom-anonymizer==2.1.0`` in pyproject), module
``dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c``: the whole column of the
2026c edition of Table E.1-1 (655 rows, incl. the repeating groups 50xx curve data, 60xx overlay
data and comments), grouped by action code (D, Z, X, U, Z/D, X/Z, X/D, X/Z/D, X/Z/U*). The
attribute names come from the comments beside each row in that module. Nothing is typed by hand.

Why not idiscore, which ships every option column: idiscore 1.6 needs Python >= 3.12, and the
newest release for Python 3.11 (1.2.0, table scraped 2024-09) pins ``dicomgenerator<0.10`` which
pins ``pydicom<3`` and ``numpy<2``: it cannot be installed beside our stack. No other package
installable here ships the option columns. So the **option columns are derived** from the
package's basic column plus the option definitions of PS3.15 E.3, as rules over the attribute
names and the data-dictionary VR (checked against idiscore 1.2.0's option columns when this was
written; the test ``tests/test_ingest_profile.py`` pins the resulting sizes):

* Retain Longitudinal Temporal Information with Modified Dates (E.3.6, CID 7050 ``113107``):
  every row whose VR is DA, DT or TM, except the patient's birth date and time (identity, not
  longitudinal information): 163 rows of the 2026c table. Dates, date-times and times all move
  back by one keyed per-patient offset (whole days plus a sub-day part), a date and its time as one
  instant, so times are modified too and every interval stays exact. idiscore's 2024 column has 165; the
  differences are 3 timestamp/time-zone rows of VR OB/SH (they keep their basic action here) and
  GPS Time Stamp (new in 2026c).
* Retain Patient Characteristics (E.3.7, ``113108``): the retained (K) rows of that column,
  8 rows: Patient's Age, Sex, Size, Weight, Sex Neutered, Ethnic Group, Pregnancy and Smoking
  Status. The free-text rows the standard marks C (allergies, patient state, pre-medication,
  special needs) keep their basic action (removed): stricter than the standard.
* Retain Device Identity (E.3.8, ``113109``): rows naming the device (device / station /
  detector / gantry / generator / cassette / plate / lens / source identifiers and serial
  numbers, calibration, manufacture and installation dates), 42 rows. AE titles, which the
  standard marks C, and free-text device descriptions keep their basic action (removed).
* Clean Descriptors (E.3.5, ``113105``): descriptions, comments, labels, notes, narratives,
  protocol names and reasons of text VR, 107 rows (idiscore's 2024 column: 125, including
  code sequences that stay removed here). Comments about the patient's own identity (pronouns,
  names to use, gender identity) stay removed. "Clean" keeps the text after removing every
  identifying value known for the patient (names and their parts, IDs, dates, addresses, phone
  numbers): it cannot find identifiers that appear nowhere else in the header, so it is off by
  default.
* Retain Safe Private (E.3.10, ``113111``): an explicit allow-list in the config (private
  creator + element offset); without it every private element is removed.

Attributes the table does not list (newer attributes, vendor-defined public tags, the
alternative-calendar dates) get a **safety net by VR** (:meth:`Profile.rule_for`): a person name
(PN) is removed; a date, date-time or time (DA, DT, TM) is shifted with the other dates under
Modified Dates and removed otherwise; Patient's Birth Date / Death Date in Alternative Calendar
and Patient's Alternative Calendar (0010,0033-0035) are removed. Everything else unlisted is kept.

Action codes with alternatives resolve to the most protective choice that keeps files usable:
``Z/D`` → Z, ``X/Z`` / ``X/D`` / ``X/Z/D`` → X, ``X/Z/U*`` → U (keep the reference sequence and
replace the UIDs inside it, so references follow the keyed UID mapping).
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from functools import lru_cache

from typing import TYPE_CHECKING

from pydicom.datadict import dictionary_VR

if TYPE_CHECKING:
    from pipeline.ingest.config import IngestConfig

__all__ = [
    "profile_for",
    "TABLE_PACKAGE",
    "TABLE_MODULE",
    "TABLE_EDITION",
    "ACTION_GROUPS",
    "CID7050",
    "TableRow",
    "Profile",
    "basic_table",
    "build_profile",
    "derive_modified_dates",
    "derive_patient_characteristics",
    "derive_device_identity",
    "derive_clean_descriptors",
    "SAFETY_NET",
    "ALTERNATIVE_CALENDAR",
]

TABLE_PACKAGE = "dicom-anonymizer"
TABLE_MODULE = "dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c"
TABLE_EDITION = "2026c"

# Group name in the package → the action code as printed in Table E.1-1.
ACTION_GROUPS: dict[str, str] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
# How a code with alternatives is applied (see the module docstring).
_RESOLVED: dict[str, str] = {
    "D": "D", "Z": "Z", "X": "X", "U": "U",
    "Z/D": "Z", "X/Z": "X", "X/D": "X", "X/Z/D": "X", "X/Z/U*": "U",
}

# CID 7050 "De-identification Method" codes (PS3.16), scheme DCM.
CID7050: dict[str, tuple[str, str]] = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_pixel_data": ("113101", "Clean Pixel Data Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "device_identity": ("113109", "Retain Device Identity Option"),
    "safe_private": ("113111", "Retain Safe Private Option"),
}

_ROW = re.compile(r"\(\s*0x([0-9A-Fa-f]{4}),\s*0x([0-9A-Fa-f]{4})\s*\),\s*#\s*(.+?)\s*$")

# E.3.7: the attributes the option retains unchanged (K in the option column).
_PATIENT_CHARACTERISTICS = (
    "Patient's Age", "Patient's Sex", "Patient's Size", "Patient's Weight", "Patient's Sex Neutered",
    "Ethnic Group", "Pregnancy Status", "Smoking Status",
)
_DEVICE = re.compile(
    r"\b(Device|Station|Detector|Gantry|Generator|Cassette|Plate ID|Lens|Treatment Machine|"
    r"Source Manufacturer|Source Serial|Serial Number|Calibration|Installation|Manufacture)\b"
)
_DESCRIPTOR = re.compile(
    r"(Description|Comments?|Remarks|Notes?|Narrative|Label|Label Text|Protocol Name|Reason for .*|"
    r"Impressions|Additional Patient History|Medical Alerts|Occupation|Treatment Sites?)$"
)

# Attributes outside Table E.1-1 that carry the patient's dates in another calendar (PS3.3 C.7.1.1).
ALTERNATIVE_CALENDAR = frozenset({0x00100033, 0x00100034, 0x00100035})
SAFETY_NET = "safety_net"  # the rule name of the by-VR actions on attributes the table does not list

_PERSONAL = re.compile(r"Patient|Gender|Pronoun|Name to Use|Sex Parameters")


@dataclass(frozen=True)
class TableRow:
    """One row of Table E.1-1's basic profile column."""

    tag: int  # (group << 16) | element
    name: str  # attribute name as the standard prints it
    code: str  # action code as printed (D, Z, X, U, Z/D, X/Z, X/D, X/Z/D, X/Z/U*)
    mask: int = 0xFFFFFFFF  # repeating groups: which bits of a tag must equal ``tag``

    @property
    def keyword_vr(self) -> str | None:
        """The data-dictionary VR, or None for attributes newer than pydicom's dictionary."""
        if self.mask != 0xFFFFFFFF:
            return None
        try:
            return dictionary_VR(self.tag)
        except KeyError:
            return None


@lru_cache(maxsize=1)
def basic_table() -> tuple[TableRow, ...]:
    """Every row of the basic profile column, read from the pinned package (see module docstring)."""
    module = importlib.import_module(TABLE_MODULE)
    names: dict[int, str] = {}
    for line in inspect.getsource(module).splitlines():
        match = _ROW.search(line)
        if match:
            names[(int(match.group(1), 16) << 16) | int(match.group(2), 16)] = match.group(3)
    rows: list[TableRow] = []
    for group_name, code in ACTION_GROUPS.items():
        for entry in getattr(module, group_name):
            if len(entry) == 2:
                tag = (entry[0] << 16) | entry[1]
                rows.append(TableRow(tag=tag, name=names.get(tag, f"({entry[0]:04X},{entry[1]:04X})"), code=code))
            else:  # (group, element, group mask, element mask): 50xx / 60xx repeating groups
                group, element, group_mask, element_mask = entry
                tag = (group << 16) | element
                mask = (group_mask << 16) | element_mask
                label = f"({group >> 8:02X}xx,{element:04X})" if element_mask else f"({group >> 8:02X}xx,xxxx)"
                rows.append(TableRow(tag=tag, name=label, code=code, mask=mask))
    return tuple(rows)


def derive_modified_dates(rows: tuple[TableRow, ...]) -> frozenset[int]:
    """Rows of the Modified Dates option column: DA/DT/TM attributes but the birth date and time."""
    return frozenset(
        row.tag
        for row in rows
        if row.keyword_vr in ("DA", "DT", "TM") and not row.name.startswith("Patient's Birth")
    )


def derive_patient_characteristics(rows: tuple[TableRow, ...]) -> frozenset[int]:
    """Rows the Retain Patient Characteristics option keeps (E.3.7)."""
    return frozenset(row.tag for row in rows if row.name in _PATIENT_CHARACTERISTICS)


def derive_device_identity(rows: tuple[TableRow, ...]) -> frozenset[int]:
    """Rows the Retain Device Identity option keeps (E.3.8); AE titles stay removed."""
    return frozenset(
        row.tag
        for row in rows
        if row.mask == 0xFFFFFFFF
        and _DEVICE.search(row.name)
        and row.keyword_vr != "AE"
        and not row.name.endswith("Description")  # free text: a descriptor, not an identity
    )


def derive_clean_descriptors(rows: tuple[TableRow, ...]) -> frozenset[int]:
    """Rows the Clean Descriptors option cleans instead of removing (E.3.5); text VRs only."""
    text_vrs = {"LO", "LT", "SH", "ST", "UT", "UC", None}
    return frozenset(
        row.tag
        for row in rows
        if row.mask == 0xFFFFFFFF
        and _DESCRIPTOR.search(row.name)
        and not _PERSONAL.search(row.name)  # comments about the patient's own identity stay removed
        and row.keyword_vr in text_vrs
    )


@dataclass(frozen=True)
class Profile:
    """The resolved action for every tag, with the options in force.

    ``rule(tag)`` gives ``(action, rule_name)`` where action is one of D Z X K C U (C: clean
    free text; for dates under the modified-dates option: shift) and ``rule_name`` says which
    column decided it (``basic`` or an option name); None when the table does not list the tag
    (kept, and sequences are still recursed into).
    """

    options: tuple[str, ...]
    actions: dict[int, tuple[str, str]] = field(repr=False)
    masked: tuple[tuple[int, int, str], ...] = field(repr=False)
    edition: str = TABLE_EDITION

    def rule(self, tag: int) -> tuple[str, str] | None:
        found = self.actions.get(tag)
        if found is not None:
            return found
        group = tag >> 16
        if 0x5000 <= group <= 0x60FF:
            for value, mask, action in self.masked:
                if tag & mask == value:
                    return action, "basic"
        return None

    def rule_for(self, tag: int, vr: str) -> tuple[str, str] | None:
        """:meth:`rule`, with the safety net by VR for public attributes the table does not list.

        None: keep the element (sequences are still recursed into).
        """
        found = self.rule(tag)
        if found is not None or (tag >> 16) & 1:
            return found
        if tag in ALTERNATIVE_CALENDAR or vr == "PN":
            return "X", SAFETY_NET
        if vr in ("DA", "DT", "TM"):
            return ("C", SAFETY_NET) if "modified_dates" in self.options else ("X", SAFETY_NET)
        return None

    @property
    def codes(self) -> list[tuple[str, str]]:
        """CID 7050 (code, meaning) of the profile and each option in force."""
        return [CID7050["basic"], *(CID7050[name] for name in self.options)]


def build_profile(
    *,
    modified_dates: bool = True,
    patient_characteristics: bool = False,
    device_identity: bool = False,
    clean_descriptors: bool = False,
    safe_private: bool = False,
) -> Profile:
    """Resolve Table E.1-1 with the chosen options into one action per tag."""
    rows = basic_table()
    actions: dict[int, tuple[str, str]] = {}
    masked: list[tuple[int, int, str]] = []
    for row in rows:
        action = _RESOLVED[row.code]
        if row.mask != 0xFFFFFFFF:
            masked.append((row.tag, row.mask, action))
        else:
            actions[row.tag] = (action, "basic")
    options: list[str] = []
    # Order matters only where columns overlap (e.g. calibration dates): later options win.
    if clean_descriptors:
        options.append("clean_descriptors")
        for tag in derive_clean_descriptors(rows):
            actions[tag] = ("C", "clean_descriptors")
    if modified_dates:
        options.append("modified_dates")
        for tag in derive_modified_dates(rows):
            actions[tag] = ("C", "modified_dates")
    if device_identity:
        options.append("device_identity")
        for tag in derive_device_identity(rows):
            actions[tag] = ("K", "device_identity")
    if patient_characteristics:
        options.append("patient_characteristics")
        for tag in derive_patient_characteristics(rows):
            actions[tag] = ("K", "patient_characteristics")
    if safe_private:
        options.append("safe_private")
    return Profile(options=tuple(sorted(options, key=list(CID7050).index)), actions=actions, masked=tuple(masked))


def profile_for(config: "IngestConfig") -> Profile:
    """The resolved profile for a config's de-identification options."""
    options = config.deid
    return build_profile(
        modified_dates=options.modified_dates,
        patient_characteristics=options.patient_characteristics,
        device_identity=options.device_identity,
        clean_descriptors=options.clean_descriptors,
        safe_private=bool(options.safe_private),
    )
