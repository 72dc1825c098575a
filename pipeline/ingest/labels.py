"""Labels that cannot leak: label folders that look like patients, and the labels template.

Without ``--labels`` the first folder level under each source is the class label, and labels are
written into ``manifest.csv`` and every later output. On a patient-per-folder tree
(``Name_Surname_MRN.../``) that makes identifiers the labels. :func:`label_folder_problems` finds
such folders from what the scan already read, before anything is written: a folder name holding a
PatientID or patient name from the DICOM headers, an ID-like number, or one folder per patient.

:func:`template_rows` gives the rows of a ``key,label`` labels file for the same sources: every
DICOM PatientID and NIfTI path (relative to its source), with the folder label where the folders
are ordinary class names. The rows are identifiers by nature; the stage writes them owner-only.

Nothing here returns or formats a folder name or header value: problems are counts.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import PurePosixPath

from pipeline.ingest.audit import Identifiers, Matcher
from pipeline.ingest.deid import identifier_candidates
from pipeline.ingest.discover import ScannedFile, nifti_subject_key

__all__ = ["LabelFolderProblems", "label_folder_problems", "template_rows", "TemplateRows"]

# A class tree rarely has this many classes with one patient each; a patient-per-folder tree always does.
MANY_LABELS = 8
SINGLE_SUBJECT_SHARE = 0.8
# Medical record numbers, accession numbers and dates carry long digit runs; class names do not ("covid19", "t2w").
_ID_DIGITS = 5
_PIECES = re.compile(r"[^A-Za-z0-9]+")


@dataclass
class LabelFolderProblems:
    """How many label folders look like identifiers, and why (counts only; never a name)."""

    folders: int = 0
    subjects: int = 0
    header_match: int = 0  # folder name holds a PatientID or a patient name part from the headers
    id_like: int = 0  # folder name holds a number of _ID_DIGITS or more digits
    one_patient_each: int = 0  # folders holding a single subject (reported when most folders do)

    @property
    def many_single(self) -> bool:
        return self.folders >= MANY_LABELS and self.one_patient_each >= SINGLE_SUBJECT_SHARE * self.folders

    @property
    def found(self) -> bool:
        return bool(self.header_match or self.id_like or self.many_single)

    def reasons(self) -> list[str]:
        """Why the folders look like identifiers, one phrase per reason (no folder name, no value)."""
        reasons = []
        if self.header_match:
            reasons.append(f"{self.header_match} folder name(s) contain a PatientID or patient name from the DICOM headers")
        if self.id_like:
            reasons.append(f"{self.id_like} folder name(s) contain an ID-like number ({_ID_DIGITS} or more digits)")
        if self.many_single:
            reasons.append(
                f"{self.one_patient_each} of {self.folders} folders hold a single patient each "
                f"({self.folders} classes for {self.subjects} patients: one folder per patient, not per class)"
            )
        return reasons


def _label_of(item: ScannedFile) -> str | None:
    parts = PurePosixPath(item.file.rel).parts
    return parts[0] if len(parts) > 1 else None


def _subject_of(item: ScannedFile) -> str:
    if item.kind == "dicom":
        return "dicom\x00" + item.patient_id
    return "nifti\x00" + nifti_subject_key(item.file, label_from_folder=True)


def _header_matcher(scanned: list[ScannedFile]) -> Matcher:
    values: dict[bytes, str] = {}
    for item in scanned:
        if item.kind != "dicom":
            continue
        for candidate in identifier_candidates(item.patient_id.encode("utf-8", "replace"), "LO"):
            values.setdefault(candidate, "PatientID")
        for candidate in identifier_candidates(item.patient_name.encode("utf-8", "replace"), "PN"):
            values.setdefault(candidate, "patient name")
    return Matcher(Identifiers(values=values))


def _id_like(name: str) -> bool:
    return any(sum(char.isdigit() for char in piece) >= _ID_DIGITS for piece in _PIECES.split(name))


def label_folder_problems(scanned: list[ScannedFile]) -> LabelFolderProblems:
    """Check the label folders (first level under each source) of the scanned images.

    Args:
        scanned: the scan of every source file (only DICOM and NIfTI images count).

    Returns:
        The counts; ``found`` is true when the folders must not become labels.
    """
    images = [item for item in scanned if item.kind in ("dicom", "nifti")]
    # One label per folder name, across sources: that is how the names reach the manifest.
    subjects: dict[str, set[str]] = defaultdict(set)
    for item in images:
        label = _label_of(item)
        if label is not None:
            subjects[label].add(_subject_of(item))
    problems = LabelFolderProblems(
        folders=len(subjects),
        subjects=len({subject for members in subjects.values() for subject in members}),
        one_patient_each=sum(1 for members in subjects.values() if len(members) == 1),
    )
    if not subjects:
        return problems
    matcher = _header_matcher(images)
    for label in subjects:
        problems.header_match += bool(matcher.kinds_in(label.encode("utf-8", "replace")))
        problems.id_like += _id_like(label)
    return problems


@dataclass
class TemplateRows:
    """Rows of a labels template (PHI: keys are PatientIDs and source paths) and counts about them."""

    rows: list[tuple[str, str]]
    dicom_patients: int
    nifti_files: int
    filled: int  # rows whose label came from an ordinary class folder
    without_id: int  # DICOM files without a PatientID (a labels file cannot name them)
    folders_look_like_ids: bool


def template_rows(scanned: list[ScannedFile]) -> TemplateRows:
    """The ``key,label`` rows for the scanned sources, in the keys ``--labels`` reads.

    DICOM: one row per PatientID. NIfTI: one row per file, keyed by its path relative to its source.
    The label is the file's first folder when every label folder is an ordinary class name and the
    key's files agree on it; otherwise it is left empty for the user to fill in.
    """
    problems = label_folder_problems(scanned)
    use_folders = not problems.found
    dicom_labels: dict[str, set[str | None]] = defaultdict(set)
    nifti_labels: dict[str, set[str | None]] = defaultdict(set)
    without_id = 0
    for item in scanned:
        label = _label_of(item) if use_folders else None
        if item.kind == "dicom":
            if not item.patient_id:
                without_id += 1
                continue
            dicom_labels[item.patient_id].add(label)
        elif item.kind == "nifti":
            nifti_labels[item.file.rel].add(label)
    rows: list[tuple[str, str]] = []
    filled = 0
    for book in (dicom_labels, nifti_labels):
        for key in sorted(book):
            labels = book[key]
            label = next(iter(labels)) if len(labels) == 1 else None
            filled += label is not None
            rows.append((key, label or ""))
    return TemplateRows(
        rows=rows,
        dicom_patients=len(dicom_labels),
        nifti_files=len(nifti_labels),
        filled=filled,
        without_id=without_id,
        folders_look_like_ids=problems.found,
    )
