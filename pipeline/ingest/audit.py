"""Leak audit: search a folder for every identifying value of the sources, and check its DICOM/NIfTI.

``audit(DIR, against=[SOURCE, ...])`` gathers the identifying values of the sources - what the
profile removes or replaces in their DICOM headers (names, IDs, dates, UIDs, addresses, private
text), NIfTI header text and extensions, and the names of their files and folders - and searches
every file of DIR for them: file names, CSV/JSON/text, DICOM headers (element by element, up to
the pixel data), NIfTI headers and extensions (gz-decompressed), any other file in full.
Without ``against`` it still checks structure: DICOM files must say PatientIdentityRemoved=YES
and hold no private element and no value the profile removes; NIfTI files must have empty
aux_file/db_name/intent_name and no header extension.

An export's synthetic DICOM files (PatientName and PatientID both the synthetic pseudonym) may
carry the marker texts export writes into descriptions the profile otherwise removes; both sides read
them from :mod:`pipeline.contracts.synthetic`. Only the exact marker texts pass: anything else in
those attributes is still a finding, and with ``against`` every value is still searched.

Matching is case-insensitive and on token boundaries (an identifier must not be glued to other
letters or digits), so a date never "matches" inside a long UID. Values that also occur in
retained attributes (e.g. a manufacturer's name) or are labels are not identifiers.

Findings name the file, the place (tag, header field, "file name", "content") and the kind of
identifier; never the value.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pydicom

from pipeline.contracts.synthetic import MARKER_KEYWORDS, is_marker_text, is_synthetic_patient
from pipeline.core.errors import InputError
from pipeline.ingest.config import DeidOptions, IngestConfig
from pipeline.ingest.deid import STOP_VALUES, DeidContext, anonymize, identifier_candidates, is_identifier, tag_text
from pipeline.ingest.discover import NIFTI_SUFFIXES, scan_file, walk_sources
from pipeline.ingest.pool import pool_map, quiet_readers
from pipeline.ingest.profile import Profile, profile_for

__all__ = [
    "Finding",
    "AuditReport",
    "Identifiers",
    "Matcher",
    "audit",
    "harvest_sources",
    "path_identifiers",
    "scan_output_file",
    "structure_findings",
    "header_tokens",
    "INGEST_RECORD",
]

INGEST_RECORD = "ingest.json"
_AUDIT_CHUNK = 128
_TOKEN = re.compile(rb"[a-z0-9\x80-\xff]+")
# Lower-cases letters and blanks every byte that cannot be part of a token: ``split()`` then
# gives the same tokens as ``_TOKEN.findall(text.lower())``, four times faster.
_TOKEN_TABLE = bytes(
    (byte + 32 if 65 <= byte <= 90 else byte) if (48 <= byte <= 57 or 65 <= byte <= 90 or 97 <= byte <= 122 or byte >= 128) else 32
    for byte in range(256)
)
_PATH_PIECES = re.compile(r"[_\-. ^,]+")
_PIXEL_TAG = b"\xe0\x7f\x10\x00"
_MIN_BINARY = 8  # in non-text files only long identifiers are searched (random bytes match short ones)
_EXTENSIONS = (".nii.gz", ".nii", ".dcm", ".dicom", ".ima", ".img", ".hdr", ".json", ".gz")
_VOCABULARY = frozenset(
    {
        b"dicom", b"nifti", b"images", b"image", b"series", b"study", b"scan", b"scans", b"data", b"real",
        b"synthetic", b"train", b"test", b"manifest", b"quarantine", b"audit", b"private", b"medsynth",
        b"int16", b"int32", b"float32", b"float64", b"uint8", b"patient", b"assumed",
    }
)


@dataclass(frozen=True)
class Finding:
    """One leak: where (file, place) and what kind of identifier; never the value."""

    path: str
    where: str
    kind: str

    def line(self) -> str:
        return f"  {self.path}: {self.where}: {self.kind}"


@dataclass
class AuditReport:
    """Result of :func:`audit` (counts and findings; no identifying value anywhere)."""

    directory: Path
    files: int
    identifiers: int
    sources: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def lines(self) -> list[str]:
        head = (
            f"Audit of {self.directory}: {self.files} files scanned"
            + (
                f" for {self.identifiers} identifying values of {self.sources} source folder(s)"
                if self.sources
                else " (structure only; pass --against SOURCE to search for source identifiers)"
            )
        )
        if self.ok:
            return [head, "  no finding"]
        lines = [head, f"  {len(self.findings)} finding(s):"]
        shown = self.findings[:200]
        lines += [finding.line() for finding in shown]
        if len(self.findings) > len(shown):
            lines.append(f"  ... and {len(self.findings) - len(shown)} more")
        return lines


@dataclass
class Identifiers:
    """Identifying values (lower-cased bytes -> kind), ready to search for. PHI: memory only."""

    values: dict[bytes, str] = field(default_factory=dict)

    def add(self, values: dict[bytes, str]) -> None:
        for value, kind in values.items():
            self.values.setdefault(value, kind)

    def finalize(self, kept_text: Iterable[bytes], labels: Iterable[str]) -> "Identifiers":
        """Drop values that also occur in retained text, labels or our own vocabulary."""
        exempt = set(_VOCABULARY) | {label.lower().encode() for label in labels}
        kept_tokens: set[bytes] = set()
        kept_blob = b"\n".join(sorted(set(kept_text)))
        kept_tokens.update(_TOKEN.findall(kept_blob))
        final: dict[bytes, str] = {}
        for value, kind in self.values.items():
            if value in exempt or value in STOP_VALUES or not is_identifier(value):
                continue
            tokens = _TOKEN.findall(value)
            if not tokens:
                continue
            if len(tokens) == 1 and tokens[0] == value:
                if value in kept_tokens:
                    continue
            elif all(token in kept_tokens for token in tokens) and _bounded_find(kept_blob, value):
                continue
            final[value] = kind
        return Identifiers(values=final)


def _bounded_find(text: bytes, needle: bytes) -> bool:
    """Is ``needle`` in ``text`` with no letter or digit glued to either end?"""
    start = text.find(needle)
    while start >= 0:
        end = start + len(needle)
        before = text[start - 1 : start]
        after = text[end : end + 1]
        if not (before and _TOKEN.match(before)) and not (after and _TOKEN.match(after)):
            return True
        start = text.find(needle, start + 1)
    return False


class Matcher:
    """Token-indexed search for many identifiers in one pass over a text.

    Multi-token identifiers ("john smith", "1.2.3") are indexed by their longest token, so a
    text is checked only against the identifiers that share a token with it, not against all.
    """

    def __init__(self, identifiers: Identifiers) -> None:
        self.single: dict[bytes, str] = {}
        self.multi: dict[bytes, list[tuple[bytes, tuple[bytes, ...], str]]] = {}
        for value, kind in identifiers.values.items():
            tokens = tuple(_TOKEN.findall(value))
            if len(tokens) == 1 and tokens[0] == value:
                self.single[value] = kind
            elif tokens:
                self.multi.setdefault(max(tokens, key=len), []).append((value, tokens, kind))

    def _multi_candidates(self, tokens: set[bytes]) -> list[tuple[bytes, tuple[bytes, ...], str]]:
        return [entry for token in sorted(tokens & self.multi.keys()) for entry in self.multi[token]]

    def may_match(self, tokens: set[bytes]) -> bool:
        """Could a text with these tokens hold an identifier? (exact for single-token identifiers)"""
        if tokens & self.single.keys():
            return True
        return any(all(part in tokens for part in parts) for _, parts, _ in self._multi_candidates(tokens))

    def kinds_in(self, text: bytes, binary: bool = False) -> list[str]:
        """Kinds of the identifiers found in ``text`` (any case)."""
        tokens = set(text.translate(_TOKEN_TABLE).split())
        found = [
            self.single[token]
            for token in sorted(tokens & self.single.keys())
            if not binary or len(token) >= _MIN_BINARY
        ]
        lowered = b""
        for value, parts, kind in self._multi_candidates(tokens):
            if binary and len(value) < _MIN_BINARY:
                continue
            if all(part in tokens for part in parts):
                lowered = lowered or text.lower()
                if _bounded_find(lowered, value):
                    found.append(kind)
        return found


# ------------------------------------------------------------------------------------------
# Harvesting identifiers from sources
# ------------------------------------------------------------------------------------------


def path_identifiers(rel: str) -> dict[bytes, str]:
    """Identifiers in a source file's relative path: each folder and file name, and their ID-like pieces.

    Label folders are dropped later (:meth:`Identifiers.finalize`): labels are in the output by design.
    """
    parts = list(PurePosixPath(rel).parts)
    found: dict[bytes, str] = {}
    for index, part in enumerate(parts):
        name = part
        if index == len(parts) - 1:
            lowered = name.lower()
            for suffix in _EXTENSIONS:
                if lowered.endswith(suffix):
                    name = name[: -len(suffix)]
                    break
        encoded = name.lower().encode("utf-8", "replace")
        if is_identifier(encoded):
            found.setdefault(encoded, "file or folder name")
        for piece in _PATH_PIECES.split(name):
            # Pieces with digits are IDs, MRNs, dates; letter-only pieces are mostly ordinary words
            # (names are gathered from the headers they come from).
            piece_bytes = piece.lower().encode("utf-8", "replace")
            if len(piece_bytes) >= 5 and any(char.isdigit() for char in piece) and is_identifier(piece_bytes):
                found.setdefault(piece_bytes, "file or folder name")
    return found


def harvest_sources(sources: list[Path], options: DeidOptions) -> tuple[Identifiers, set[bytes]]:
    """Identifiers (and retained text) of every file under the sources, as ingest would see them."""
    profile = profile_for(IngestConfig(deid=options))
    identifiers = Identifiers()
    kept: set[bytes] = set()
    for file in walk_sources(sources):
        identifiers.add(path_identifiers(file.rel))
        scanned = scan_file(file)
        if scanned.kind == "dicom":
            found, retained = _harvest_dicom(file.path, profile)
            identifiers.add(found)
            kept |= retained
        elif scanned.kind == "nifti":
            identifiers.add(_harvest_nifti(file.path))
    return identifiers, kept


def _harvest_dicom(path: str, profile: Profile) -> tuple[dict[bytes, str], set[bytes]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        ctx = DeidContext(profile=profile, key=b"audit", subject_id="", date_offset=0)
        anonymize(ds, ctx)
    except Exception:
        return {}, set()
    return ctx.identifiers, ctx.kept_text


def _harvest_nifti(path: str) -> dict[bytes, str]:
    header = _nifti_header_bytes(Path(path))
    if header is None:
        return {}
    found: dict[bytes, str] = {}
    fields = {"descrip": (148, 80), "aux_file": (228, 24), "db_name": (14, 18), "intent_name": (328, 16)}
    for offset, size in fields.values():
        value = header[offset : offset + size].split(b"\x00")[0]
        for candidate in identifier_candidates(value, "LT"):
            found.setdefault(candidate, "NIfTI header text")
    if len(header) > 352:
        for candidate in identifier_candidates(header[352:].replace(b"\x00", b" "), "LT"):
            found.setdefault(candidate, "NIfTI extension text")
    return found


def _nifti_header_bytes(path: Path) -> bytes | None:
    """Header and extensions of a NIfTI-1 file (without the voxel data), or None if unreadable."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as handle:  # type: ignore[operator]
            head = handle.read(348)
            if len(head) < 348:
                return None
            little = struct.unpack("<i", head[:4])[0] == 348
            vox_offset = int(struct.unpack("<f" if little else ">f", head[108:112])[0])
            rest = handle.read(max(0, min(vox_offset, 1 << 24) - 348)) if vox_offset > 348 else handle.read(4)
            return head + rest
    except (OSError, EOFError, struct.error, ValueError):
        return None


# ------------------------------------------------------------------------------------------
# Scanning the output
# ------------------------------------------------------------------------------------------


def header_tokens(data: bytes) -> set[bytes]:
    """The search tokens of a DICOM file's header (everything before the pixel data)."""
    return set(data[: _dicom_header_end(data)].translate(_TOKEN_TABLE).split())


def _dicom_header_end(data: bytes) -> int:
    """Offset of the top-level PixelData element (or the file's end)."""
    start = data.find(_PIXEL_TAG, 132)
    while start >= 0:
        vr = data[start + 4 : start + 6]
        if vr in (b"OB", b"OW") and data[start + 6 : start + 8] == b"\x00\x00":
            return start
        length = int.from_bytes(data[start + 4 : start + 8], "little")
        if length in (len(data) - start - 8, 0xFFFFFFFF):
            return start
        start = data.find(_PIXEL_TAG, start + 1)
    return len(data)


def scan_output_file(path: Path, rel: str, matcher: Matcher | None, profile: Profile | None) -> list[Finding]:
    """Findings in one output file (name, content; structure unless ``profile`` is None)."""
    findings: list[Finding] = []
    if matcher is not None:
        for kind in matcher.kinds_in(rel.encode("utf-8", "replace")):
            findings.append(Finding(rel, "file name", kind))
    try:
        data = path.read_bytes()
    except OSError:
        return [Finding(rel, "file", "unreadable during the audit")]
    lowered_name = path.name.lower()
    if lowered_name.endswith(NIFTI_SUFFIXES):
        findings += _scan_nifti(path, rel, matcher)
    elif data[128:132] == b"DICM":
        findings += _scan_dicom(data, rel, matcher, profile)
    else:
        if data[:2] == b"\x1f\x8b":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError):
                pass
        if matcher is not None:
            binary = _is_binary(data)
            for kind in matcher.kinds_in(data, binary=binary):
                findings.append(Finding(rel, "content", kind))
    return findings


def _is_binary(data: bytes) -> bool:
    sample = data[:65536]
    if not sample:
        return False
    try:
        sample.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return sum(byte < 9 or 13 < byte < 32 for byte in sample) > len(sample) // 100


def _scan_nifti(path: Path, rel: str, matcher: Matcher | None) -> list[Finding]:
    header = _nifti_header_bytes(path)
    if header is None:
        return [Finding(rel, "NIfTI header", "unreadable NIfTI header")]
    findings: list[Finding] = []
    for name, (offset, size) in {"aux_file": (228, 24), "db_name": (14, 18), "intent_name": (328, 16)}.items():
        if header[offset : offset + size].strip(b"\x00 "):
            findings.append(Finding(rel, f"NIfTI {name}", "text in a field that must be empty"))
    if len(header) > 352 and header[348:352] != b"\x00\x00\x00\x00":
        findings.append(Finding(rel, "NIfTI header extension", "extension present (may carry PHI)"))
    if matcher is not None:
        for kind in matcher.kinds_in(header[148:228], binary=False):
            findings.append(Finding(rel, "NIfTI descrip", kind))
        for kind in matcher.kinds_in(header[348:], binary=True):
            findings.append(Finding(rel, "NIfTI header extension", kind))
    return findings


def _scan_dicom(data: bytes, rel: str, matcher: Matcher | None, profile: Profile | None) -> list[Finding]:
    end = _dicom_header_end(data)
    findings: list[Finding] = []
    if matcher is not None and matcher.kinds_in(data[:end], binary=False):
        findings += _locate_in_dicom(data, rel, matcher)
    if profile is None:  # structure already checked by whoever wrote the file (ingest's workers)
        return findings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as exc:
        return findings + [Finding(rel, "DICOM header", f"unreadable ({type(exc).__name__})")]
    return findings + structure_findings(ds, rel, profile)


def structure_findings(ds: pydicom.Dataset, rel: str, profile: Profile) -> list[Finding]:
    """What must not be in a de-identified DICOM dataset: no identity-removed flag, private
    elements (unless the Retain Safe Private option is in force), attributes the profile removes,
    values in attributes it empties (the pseudonymous PatientName/ID excepted, and the marker texts
    of a synthetic file)."""
    findings: list[Finding] = []
    if str(ds.get("PatientIdentityRemoved", "")).strip().upper() != "YES":
        findings.append(Finding(rel, "(0012,0062) PatientIdentityRemoved", "not YES (file not de-identified)"))
    return findings + _structure(ds, rel, profile, "", _synthetic_markers(ds))


def _synthetic_markers(ds: pydicom.Dataset) -> frozenset[int]:
    """Tags of a synthetic file that hold exactly the marker text export writes there (none in other files)."""
    try:
        if not is_synthetic_patient(str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))):
            return frozenset()
        return frozenset(
            tag for tag, keyword in _MARKER_TAGS.items() if tag in ds and is_marker_text(keyword, str(ds[tag].value or ""))
        )
    except Exception:  # an undecodable value is no marker: the element is then judged like any other
        return frozenset()


_MARKER_TAGS = {int(pydicom.datadict.tag_for_keyword(keyword)): keyword for keyword in MARKER_KEYWORDS}


def _structure(
    ds: pydicom.Dataset, rel: str, profile: Profile, path: str, markers: frozenset[int] = frozenset()
) -> list[Finding]:
    """Elements that the profile removes but that are present (private ones included); ``markers``
    are top-level tags holding a synthetic file's own marker text."""
    findings: list[Finding] = []
    allowed_private = "safe_private" in profile.options
    for tag, raw in list(ds._dict.items()):  # pydicom 3: no tag conversion, no value decoding
        group = tag >> 16
        if group == 0x0002 or tag in markers:
            continue
        if group & 1:
            if not allowed_private:
                findings.append(Finding(rel, path + tag_text(tag), "private element present"))
            continue
        rule = profile.rule(tag)
        vr = raw.VR or (pydicom.datadict.dictionary_VR(tag) if pydicom.datadict.dictionary_has_tag(tag) else "UN")
        if rule is not None and tag not in (0x00100010, 0x00100020):
            if rule[0] == "X":
                findings.append(Finding(rel, f"{path}{tag_text(tag)} {_keyword(tag)}", "attribute the profile removes is present"))
                continue
            value = raw.value
            if rule[0] == "Z" and vr != "SQ" and value not in (None, b"", ""):
                if not (isinstance(value, (bytes, bytearray)) and not value.strip(b" \x00")):
                    findings.append(Finding(rel, f"{path}{tag_text(tag)} {_keyword(tag)}", "attribute the profile empties has a value"))
                    continue
        if vr == "SQ":
            for item in ds[tag].value or ():
                findings += _structure(item, rel, profile, path + tag_text(tag) + "[].")
    return findings


def _keyword(tag: int) -> str:
    return pydicom.datadict.keyword_for_tag(tag) or ""


def _locate_in_dicom(data: bytes, rel: str, matcher: Matcher) -> list[Finding]:
    """Name the element(s) holding identifiers (only called when the raw scan found something)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:
        return [Finding(rel, "DICOM header", kind) for kind in matcher.kinds_in(data[: _dicom_header_end(data)])]
    findings: list[Finding] = []
    for elem in ds.iterall():
        if elem.VR == "SQ":
            continue
        value = elem.value
        if isinstance(value, (bytes, bytearray)):
            text = bytes(value)
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(item) for item in value).encode("utf-8", "replace")
        else:
            text = str(value).encode("utf-8", "replace")
        for kind in matcher.kinds_in(text):
            findings.append(Finding(rel, f"{tag_text(int(elem.tag))} {elem.keyword or ''}".rstrip(), kind))
    return findings or [Finding(rel, "DICOM header", "identifier between elements")]


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def _record_options(directory: Path) -> DeidOptions:
    record = directory / INGEST_RECORD
    if record.is_file():
        try:
            payload = json.loads(record.read_text(encoding="utf-8"))
            return DeidOptions.model_validate(payload.get("deid", {}))
        except (ValueError, TypeError):
            pass
    return DeidOptions()


def _labels(directory: Path) -> set[str]:
    manifest = directory / "manifest.csv"
    if not manifest.is_file():
        return set()
    import csv

    try:
        with open(manifest, encoding="utf-8-sig", newline="") as handle:
            return {row.get("label") or "" for row in csv.DictReader(handle)} - {""}
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()  # labels only spare their own words from the search: without them it finds more, never less


def audit(
    directory: Path,
    against: list[Path] | None = None,
    *,
    identifiers: Identifiers | None = None,
    options: DeidOptions | None = None,
    exclude: Iterable[str] = (),
    source_count: int | None = None,
    check_dicom_structure: bool = True,
    workers: int = 1,
) -> AuditReport:
    """Scan ``directory`` for PHI; see the module docstring.

    Args:
        directory: the folder to audit (a dataset, a report, an export...).
        against: source folders whose identifying values are searched for.
        identifiers: already-gathered identifiers (ingest passes what its workers collected).
        options: the de-identification options the output was made with (default: read from
            ``DIR/ingest.json``, else the defaults).
        exclude: relative paths to skip (none by default).
        source_count: how many source folders ``identifiers`` came from (for the report).
        check_dicom_structure: parse each DICOM file to check its structure (ingest checks the
            files it writes while writing them, and skips this).
        workers: processes to scan with.

    Raises:
        InputError: the folder does not exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: folder not found. Fix: pass the folder to audit (e.g. a dataset written by ingest).")
    options = options or _record_options(directory)
    sources = list(against or [])
    if sources and identifiers is None:
        for index, source in enumerate(sources, start=1):
            if not Path(source).is_dir():  # the path is not echoed: source paths can name patients
                raise InputError(
                    f"--against #{index}: folder not found or not a folder. Fix: pass the source folder the dataset was made from."
                )
        with quiet_readers():
            gathered, kept = harvest_sources(sources, options)
        identifiers = gathered.finalize(kept, _labels(directory))
    skip = set(exclude)
    files = [
        (str(path), path.relative_to(directory).as_posix())
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.relative_to(directory).as_posix() not in skip
    ]
    values = identifiers.values if identifiers is not None else {}
    chunks = [files[start : start + _AUDIT_CHUNK] for start in range(0, len(files), _AUDIT_CHUNK)]
    jobs = [(chunk, values, options if check_dicom_structure else None) for chunk in chunks]
    findings: list[Finding] = []
    scanned = len(files)
    for index, found in pool_map(_scan_chunk, jobs, workers, lambda _: None):
        if isinstance(found, BaseException):
            findings += [Finding(rel, "file", f"audit failed ({type(found).__name__})") for _, rel in chunks[index]]
        else:
            findings += found
    findings.sort(key=lambda finding: (finding.path, finding.where, finding.kind))
    return AuditReport(
        directory=directory,
        files=scanned,
        identifiers=len(identifiers.values) if identifiers is not None else 0,
        sources=source_count if source_count is not None else len(sources),
        findings=_dedupe(findings),
    )


def _scan_chunk(files: list[tuple[str, str]], values: dict[bytes, str], options: DeidOptions | None) -> list[Finding]:
    """Scan a chunk of files (the unit of work of a pool worker)."""

    matcher = Matcher(Identifiers(values=values)) if values else None
    profile = profile_for(IngestConfig(deid=options)) if options is not None else None
    findings: list[Finding] = []
    with quiet_readers():
        for path, rel in files:
            findings += scan_output_file(Path(path), rel, matcher, profile)
    return findings


def _dedupe(findings: list[Finding]) -> list[Finding]:
    return list(dict.fromkeys(findings))
