"""Find the inputs: walk the sources, classify each file, group DICOM files into series, assign labels.

The scan reads only each DICOM file's header (a handful of tags). Its result stays in memory in
the main process: it holds PatientIDs and source paths, which never reach the console, a log,
MLflow or the dataset (only the private folder, through the path map).
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pydicom
from pydicom.errors import InvalidDicomError

from pipeline.core.errors import InputError
from pipeline.core.faults import environment_cause, environment_fix
from pipeline.ingest.dicomio import scan_header

__all__ = [
    "NIFTI_SUFFIXES",
    "DICOMDIR_CLASS",
    "SourceFile",
    "ScannedFile",
    "SeriesGroup",
    "walk_sources",
    "UNREADABLE_FOLDER_REASON",
    "scan_file",
    "scan_files",
    "group_series",
    "read_labels",
    "LabelBook",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_HEAD_BYTES = 1 << 16  # enough for the tags up to SeriesInstanceUID in almost any header
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_SCAN_TAGS = [
    "PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
    "DirectoryRecordSequence", "PixelData", "FloatPixelData", "DoubleFloatPixelData",
]


@dataclass(frozen=True, order=True)
class SourceFile:
    """One input file: absolute path, path relative to its source folder, and the source's index."""

    source: int
    rel: str  # POSIX, relative to the source folder
    path: str  # absolute


@dataclass(frozen=True)
class ScannedFile:
    """What the scan learnt about one file (in memory only: ``patient_id`` is PHI)."""

    file: SourceFile
    kind: str  # "dicom", "nifti", "dicomdir", "other"; "unread": the machine failed to read it
    reason: str = ""  # why a file is unusable (kind "other" or a broken DICOM), or the machine's failure
    fix: str = ""  # kind "unread": what the user does before re-running
    patient_id: str = ""
    patient_name: str = ""  # PHI: only compared with label folder names, never written
    series_uid: str = ""
    sop_uid: str = ""


@dataclass
class SeriesGroup:
    """DICOM files that share (PatientID, SeriesInstanceUID), or one NIfTI file."""

    kind: str  # "dicom" or "nifti"
    key: str  # PHI: PatientID + NUL + SeriesInstanceUID, or the NIfTI path; hashed before use
    subject_key: str  # PHI: PatientID, or the NIfTI subject's source path; hashed before use
    files: list[SourceFile] = field(default_factory=list)
    duplicates: list[SourceFile] = field(default_factory=list)


UNREADABLE_FOLDER_REASON = "unreadable folder (permission or I/O error): the files in it were not read"


def walk_sources(sources: list[Path]) -> list[SourceFile]:
    """Every regular file under the sources, recursively, in a stable order.

    Hidden files are included (non-images end in quarantine); hidden folders (names starting
    with '.', e.g. .snapshot, .Trash-1000) are not walked. A subfolder that cannot be listed is
    an entry whose ``rel`` ends with "/" (quarantined by the scan, never silently skipped).

    Raises:
        InputError: a source folder does not exist, is not a folder or cannot be listed.
    """
    found: list[SourceFile] = []
    for index, source in enumerate(sources):
        root = Path(source)
        if not root.is_dir():
            raise InputError(
                f"source folder #{index + 1}: not found or not a folder. Fix: pass an existing folder of DICOM/NIfTI files."
            )
        found += _files_under(root, index)
    return sorted(found)


def _files_under(root: Path, index: int) -> list[SourceFile]:
    """The files below ``root`` as ``os.walk(root, followlinks=False)`` finds them, hidden folders left out.

    Hidden files are read: a DICOM file named ".1234" is still an image, and anything that is
    not one (.DS_Store) lands in quarantine.csv with a reason. Hidden folders are not:
    .snapshot/.zfs/.Trash copies would otherwise become label folders or shadow the originals.
    Symlinked folders are not followed; a symlinked file counts, under its target's path. A
    folder that cannot be listed is returned as an entry of its own (``rel`` ends with "/"), so
    that ingest reports it. A folder is resolved once, not every file in it (resolving is most
    of a walk's time).

    Raises:
        InputError: ``root`` itself cannot be listed.
    """
    found: list[SourceFile] = []
    pending = [(str(root), os.path.realpath(root), "")]
    while pending:
        folder, real_folder, prefix = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            if not prefix:
                raise InputError(
                    f"source folder #{index + 1}: cannot be read (permission or I/O error). "
                    "Fix: make it readable by this user, or pass another folder."
                ) from None
            # Its files cannot even be listed: it goes to quarantine.csv (a name ending in "/")
            # instead of vanishing without a trace.
            found.append(SourceFile(source=index, rel=prefix, path=real_folder))
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    if not entry.is_symlink() and not entry.name.startswith("."):
                        pending.append((entry.path, os.path.join(real_folder, entry.name), f"{prefix}{entry.name}/"))
                    continue
                if not entry.is_file():  # sockets, fifos, broken links
                    continue
                real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real_folder, entry.name)
            except OSError:  # cannot even tell what it is: the scan fails to read it and quarantines it
                real = os.path.join(real_folder, entry.name)
            found.append(SourceFile(source=index, rel=prefix + entry.name, path=real))
    return found


def _is_nifti(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(NIFTI_SUFFIXES)


def _unreadable(file: SourceFile, exc: OSError, reason: str) -> ScannedFile:
    """A file or folder that could not be read: the machine's failure, or the file's own property.

    A permission or an I/O error says nothing about the file (fixing the machine and re-running
    reads it), so it is never quarantined; a name too long for the OS is a property of the tree.
    """
    cause = environment_cause(exc)
    if cause is not None:
        return ScannedFile(file=file, kind="unread", reason=cause, fix=environment_fix(exc))
    return ScannedFile(file=file, kind="other", reason=reason)


def scan_file(file: SourceFile) -> ScannedFile:
    """Classify one file from its name and (for DICOM) its header. Never raises."""
    if file.rel.endswith("/"):  # a folder the walk could not list
        try:
            os.scandir(file.path).close()
        except OSError as exc:
            return _unreadable(file, exc, UNREADABLE_FOLDER_REASON)
        return ScannedFile(file=file, kind="other", reason=UNREADABLE_FOLDER_REASON)
    if _is_nifti(file.rel):
        return ScannedFile(file=file, kind="nifti")
    if PurePosixPath(file.rel).name.upper() == "DICOMDIR":
        return ScannedFile(file=file, kind="dicomdir")
    try:
        with open(file.path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError as exc:
        return _unreadable(file, exc, "unreadable file (permission or I/O error)")
    has_preamble = len(head) >= 132 and head[128:132] == b"DICM"
    fast = scan_header(head) if has_preamble else None
    if fast is not None:
        media_class, values = fast
        if media_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in values:
            return ScannedFile(file=file, kind="dicomdir")
        return ScannedFile(
            file=file,
            kind="dicom",
            patient_id=values.get("PatientID", ""),
            patient_name=values.get("PatientName", ""),
            series_uid=values.get("SeriesInstanceUID", ""),
            sop_uid=values.get("SOPInstanceUID", ""),
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(file.path, stop_before_pixels=True, specific_tags=_SCAN_TAGS, force=not has_preamble)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError, OverflowError, AttributeError, NotImplementedError) as exc:
        if has_preamble:
            return ScannedFile(file=file, kind="other", reason=f"unreadable DICOM header ({type(exc).__name__})")
        return ScannedFile(file=file, kind="other", reason="not a DICOM or NIfTI file")
    except Exception as exc:  # pydicom raises many types for corrupt headers; a scan never crashes
        if has_preamble:
            return ScannedFile(file=file, kind="other", reason=f"unreadable DICOM header ({type(exc).__name__})")
        return ScannedFile(file=file, kind="other", reason="not a DICOM or NIfTI file")
    meta_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    if meta_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        return ScannedFile(file=file, kind="dicomdir")
    try:
        sop_class = str(ds.get("SOPClassUID", "") or "")
        series = str(ds.get("SeriesInstanceUID", "") or "").strip()
        sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        patient = str(ds.get("PatientID", "") or "").strip()
        patient_name = str(ds.get("PatientName", "") or "").strip()
    except Exception as exc:
        return ScannedFile(file=file, kind="other", reason=f"unreadable DICOM header ({type(exc).__name__})")
    if not has_preamble and not (sop_class or series or sop_uid):
        # A forced read of a non-DICOM file yields a few garbage elements, never these.
        return ScannedFile(file=file, kind="other", reason="not a DICOM or NIfTI file")
    return ScannedFile(
        file=file, kind="dicom", patient_id=patient, patient_name=patient_name, series_uid=series, sop_uid=sop_uid
    )


def scan_files(files: list[SourceFile]) -> list[ScannedFile]:
    """:func:`scan_file` over a chunk (the unit of work sent to a pool worker)."""
    from pipeline.ingest.pool import quiet_readers

    with quiet_readers():
        return [scan_file(file) for file in files]


def nifti_subject_key(file: SourceFile, label_from_folder: bool) -> str:
    """The source path that identifies a NIfTI file's subject.

    The subject is the first folder below the label level (``SOURCE/<label>/<subject>/...`` or,
    with a labels CSV, ``SOURCE/<subject>/...``); a file lying directly at that level is its own
    subject.
    """
    parts = PurePosixPath(file.rel).parts
    skip = 1 if label_from_folder else 0
    if len(parts) > skip + 1:
        return f"{file.source}:" + "/".join(parts[: skip + 1])
    return f"{file.source}:{file.rel}"


def group_series(scanned: list[ScannedFile], label_from_folder: bool) -> list[SeriesGroup]:
    """Group DICOM files by (PatientID, SeriesInstanceUID); one group per NIfTI file.

    Files repeating a SOPInstanceUID already seen in the series are set aside as duplicates
    (the first by source path is kept). A DICOM file without SeriesInstanceUID is its own series.
    """
    groups: dict[str, SeriesGroup] = {}
    seen_sop: dict[str, set[str]] = defaultdict(set)
    for item in sorted(scanned, key=lambda scanned_file: scanned_file.file):
        if item.kind == "nifti":
            key = f"nifti\x00{item.file.source}\x00{item.file.rel}"
            groups[key] = SeriesGroup(
                kind="nifti", key=key, subject_key="nifti\x00" + nifti_subject_key(item.file, label_from_folder), files=[item.file]
            )
            continue
        if item.kind != "dicom":
            continue
        series = item.series_uid or f"file:{item.file.source}:{item.file.rel}"
        key = f"dicom\x00{item.patient_id}\x00{series}"
        group = groups.setdefault(key, SeriesGroup(kind="dicom", key=key, subject_key="dicom\x00" + item.patient_id))
        if item.sop_uid and item.sop_uid in seen_sop[key]:
            group.duplicates.append(item.file)
            continue
        if item.sop_uid:
            seen_sop[key].add(item.sop_uid)
        group.files.append(item.file)
    return [groups[key] for key in sorted(groups)]


@dataclass(frozen=True)
class LabelBook:
    """Labels from a CSV (``key,label``) or, without one, from the first folder under each source."""

    by_key: dict[str, str] | None  # None: folder convention

    @property
    def from_folders(self) -> bool:
        return self.by_key is None

    def label_for(self, group: SeriesGroup, patient_id: str) -> tuple[str | None, str]:
        """``(label, problem)``: the group's label, or None and why not (a quarantine reason)."""
        if self.by_key is None:
            labels = {PurePosixPath(file.rel).parts[0] for file in group.files if len(PurePosixPath(file.rel).parts) > 1}
            if any(len(PurePosixPath(file.rel).parts) == 1 for file in group.files):
                return None, "no label (file lies directly in the source folder; expected SOURCE/<label>/...)"
            if len(labels) != 1:
                return None, "conflicting labels (the series spans several label folders)"
            return labels.pop(), ""
        if group.kind == "nifti":
            label = self.by_key.get(group.files[0].rel)
        else:
            label = self.by_key.get(patient_id)
        if label is None:
            return None, "no label (key not in the labels CSV)"
        return label, ""


def read_labels(path: Path | None) -> LabelBook:
    """Read a ``key,label`` CSV into a :class:`LabelBook` (no CSV: the folder convention).

    Raises:
        InputError: missing file, missing columns, empty label, conflicting duplicate keys. The
            message names the row, never the key (a key can be a PatientID).
    """
    if path is None:
        return LabelBook(by_key=None)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: labels file not found. Fix: pass a CSV with columns key,label or leave --labels out.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable UTF-8 CSV ({type(exc).__name__}). Fix: save it as UTF-8 CSV.") from None
    reader = csv.DictReader(text.splitlines())
    columns = [name.strip() for name in reader.fieldnames or []]
    if "key" not in columns or "label" not in columns:
        # The first row is not echoed: in a CSV without a header it is a PatientID and its label.
        raise InputError(
            f"{path}: the first row must be the header key,label (found {len(columns)} column(s) without both names). "
            "Fix: add or rename the header row."
        )
    labels: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        row = {str(name).strip(): (value or "").strip() for name, value in row.items() if name is not None}
        key, label = row.get("key", ""), row.get("label", "")
        if not key:
            raise InputError(f"{path} row {line}, column 'key': empty key. Fix: fill it in or delete the row.")
        if not label:
            raise InputError(f"{path} row {line}, column 'label': empty label. Fix: fill it in or delete the row.")
        if any(char in label for char in ",\n\r\"") or label.startswith("."):
            raise InputError(f"{path} row {line}, column 'label': labels may not contain commas, quotes or newlines.")
        if labels.get(key, label) != label:
            raise InputError(f"{path} row {line}, column 'key': this key was given another label on an earlier row.")
        labels[key] = label
    if not labels:
        raise InputError(f"{path}: no rows. Fix: add one key,label row per patient (DICOM) or NIfTI file.")
    return LabelBook(by_key=labels)
