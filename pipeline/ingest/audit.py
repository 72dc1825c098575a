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
letters or digits), so a date never "matches" inside a long UID. Labels are not identifiers.

Precision: the tool's own fixed vocabulary is never matched, and no identifier is dropped for it.
The places where ingest writes its vocabulary - CSV column headers and the columns of fixed words
(quarantine reasons, formats, modality...), JSON keys and the fields of fixed words in audit.jsonl,
every string of ingest.json, the de-identification attributes ingest adds to a DICOM file and its
file meta - are searched with the vocabulary's tokens blanked out (:func:`tool_vocabulary`: DICOM
keywords and attribute names, UID names such as SOP classes, the string literals of the ingest and
contracts code, config keys). Every other place - file names, DICOM elements, NIfTI headers, data
cells - is searched whole. A value that also occurs in a retained attribute (a manufacturer's name
in a private element, say) stays on the search list; only an output DICOM element holding exactly
that retained text is not a finding.

Findings name the file, the place (tag, header field, "file name", "content"), the kind of
identifier and a private reference (:meth:`AuditReport.record`); never the value. The value is
written only to the private folder, where :func:`explain` resolves a reference for its owner.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import io
import json
import os
import re
import secrets
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path, PurePosixPath

import pydicom

from pipeline.contracts.synthetic import MARKER_KEYWORDS, is_marker_text, is_synthetic_patient
from pipeline.core.errors import InputError
from pipeline.core.faults import EnvironmentFailure
from pipeline.ingest.config import DeidOptions, IngestConfig
from pipeline.ingest.deid import STOP_VALUES, DeidContext, anonymize, identifier_candidates, identifier_kind, is_identifier, tag_text
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
    "name_findings",
    "scrub_vocabulary",
    "structure_findings",
    "header_tokens",
    "INGEST_RECORD",
    "FINDINGS_FILE",
    "explain",
    "tool_vocabulary",
]

INGEST_RECORD = "ingest.json"
FINDINGS_FILE = "audit_findings.jsonl"  # in the private folder: reference -> place and matched value
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
# CSV columns and JSON fields whose values are the tool's fixed words (reasons, formats, rule names...).
_VOCABULARY_FIELDS = frozenset(
    {
        "reason", "format", "modality", "source_format", "dtype", "geometry", "origin", "split", "status",
        "tag", "keyword", "action", "rule", "field", "kind", "where",
    }
)
# Attributes ingest adds to every anonymized file (their texts are the tool's: CID 7050 meanings, method).
_OWN_DICOM_TAGS = frozenset({0x00120062, 0x00120063, 0x00120064, 0x00280301, 0x00280303})
# Modules whose string literals are the tool's output vocabulary (reasons, headers, keys, option names).
_VOCABULARY_PACKAGES = ("pipeline.ingest", "pipeline.contracts")
_TOKEN_BYTES = re.compile(rb"[a-z0-9\x80-\xff]+")


@dataclass(frozen=True)
class Finding:
    """One leak: where (file, place) and what kind of identifier; never the value in public.

    ``value`` (the matched identifier, PHI) stays in memory until :meth:`AuditReport.record` writes it
    to the private folder under ``ref``; :meth:`line` shows the reference, never the value.
    """

    path: str
    where: str
    kind: str
    value: bytes = field(default=b"", repr=False)
    ref: str = ""

    def line(self) -> str:
        return f"  {self.path}: {self.where}: {self.kind}" + (f" [ref {self.ref}]" if self.ref else "")


@dataclass
class AuditReport:
    """Result of :func:`audit` (counts and findings; no identifying value anywhere)."""

    directory: Path
    files: int
    identifiers: int
    sources: int
    findings: list[Finding] = field(default_factory=list)
    private: Path | None = None  # where :meth:`record` wrote the findings' references

    @property
    def ok(self) -> bool:
        return not self.findings

    def record(self, private: Path) -> None:
        """Give every finding a reference and append (reference, file, place, kind, value) to
        ``private/audit_findings.jsonl`` (owner-only): the one place the matched values are written."""
        private = Path(private)
        private.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(private, 0o700)
        except OSError:
            pass
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines = []
        referenced = []
        for finding in self.findings:
            ref = finding.ref or "f-" + secrets.token_hex(6)
            referenced.append(dataclasses.replace(finding, ref=ref))
            lines.append(
                json.dumps(
                    {
                        "ref": ref,
                        "time": stamp,
                        "directory": str(self.directory),
                        "file": finding.path,
                        "where": finding.where,
                        "kind": finding.kind,
                        "value": finding.value.decode("utf-8", "replace"),
                    },
                    sort_keys=True,
                )
            )
        path = private / FINDINGS_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
        self.findings = referenced
        self.private = private

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
        if self.private is not None:
            lines.append(
                f"  What a finding matched is in the private folder, for its owner only: "
                f"medsynth audit --explain REF --private {self.private}"
            )
        return lines


def explain(ref: str, private: Path) -> list[str]:
    """The recorded finding ``ref`` (file, place, kind and the matched value) from the private folder.

    The value is PHI: this is for the owner of the private folder, never for a log or a shared output.

    Raises:
        InputError: no findings file in ``private``, it cannot be read, or it holds no such reference.
    """
    path = Path(private) / FINDINGS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(
            f"--private {private}: no {FINDINGS_FILE} there. Fix: pass the private folder of the run or audit that printed the reference."
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({type(exc).__name__}). Fix: run as the owner of the private folder.") from None
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("ref") == ref:
            lines = [
                f"Finding {ref} (audit of {entry.get('directory')} at {entry.get('time')}):",
                f"  file: {entry.get('file')}",
                f"  place: {entry.get('where')}",
                f"  kind: {entry.get('kind')}",
            ]
            value = entry.get("value") or ""
            lines.append(f"  matched value: {value!r}" if value else "  matched value: none (a structure finding)")
            return lines
    raise InputError(f"--explain {ref}: no such reference in {path}. Fix: copy the reference from the audit's output (f-...).")


@dataclass
class Identifiers:
    """Identifying values (lower-cased bytes -> kind), ready to search for. PHI: memory only.

    ``allowed``: retained texts (whole element values, lower-cased) that hold an identifier; an
    output DICOM element holding exactly one of them is what the profile kept, not a leak.
    """

    values: dict[bytes, str] = field(default_factory=dict)
    allowed: frozenset[bytes] = frozenset()

    def add(self, values: dict[bytes, str]) -> None:
        for value, kind in values.items():
            self.values.setdefault(value, kind)

    def finalize(self, kept_text: Iterable[bytes], labels: Iterable[str]) -> "Identifiers":
        """Drop labels, placeholders and short values; note the retained texts that hold an identifier.

        A value that also occurs in retained text stays on the list (it is still a leak anywhere
        else); only the retained texts themselves are allowed, as whole DICOM element values.
        """
        exempt = set(_VOCABULARY) | {label.lower().encode() for label in labels}
        by_token: dict[bytes, list[bytes]] = {}
        for text in set(kept_text):
            for token in set(_TOKEN.findall(text)):
                by_token.setdefault(token, []).append(text)
        final: dict[bytes, str] = {}
        allowed: set[bytes] = set()
        for value, kind in self.values.items():
            if value in exempt or value in STOP_VALUES or not is_identifier(value):
                continue
            tokens = _TOKEN.findall(value)
            if not tokens:
                continue
            final[value] = kind
            for text in by_token.get(max(tokens, key=len), ()):
                if _bounded_find(text, value):
                    allowed.add(text)
        return Identifiers(values=final, allowed=frozenset(allowed))


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
        self.allowed = identifiers.allowed
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
        return [kind for _, kind in self.matches_in(text, binary)]

    def matches_in(self, text: bytes, binary: bool = False) -> list[tuple[bytes, str]]:
        """``(identifier, kind)`` of every identifier found in ``text`` (any case)."""
        tokens = set(text.translate(_TOKEN_TABLE).split())
        found = [
            (token, self.single[token])
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
                    found.append((value, kind))
        return found

    def findings(self, text: bytes, rel: str, where: str, binary: bool = False, vocabulary: bool = False) -> list[Finding]:
        """Findings for the identifiers in ``text`` at one place; ``vocabulary``: a place of the tool's
        fixed words, searched with those words blanked out."""
        found = self.matches_in(text, binary)
        if found and vocabulary:
            found = self.matches_in(scrub_vocabulary(text), binary)
        return [Finding(rel, where, kind, value) for value, kind in found]


@lru_cache(maxsize=1)
def tool_vocabulary() -> frozenset[bytes]:
    """Every token of the tool's own fixed words (lower-cased): DICOM keywords and attribute names,
    UID names (SOP classes, transfer syntaxes), the string literals of the ingest and contracts code
    (reasons, column headers, JSON keys, option names; docstrings excluded) and config keys."""
    from pydicom.datadict import DicomDictionary, RepeatersDictionary
    from pydicom.uid import UID_dictionary

    texts: list[str] = []
    for entry in (*DicomDictionary.values(), *RepeatersDictionary.values()):
        texts += [entry[2], entry[4]]
    texts += [entry[0] for entry in UID_dictionary.values()]
    texts += list(_source_literals())
    texts += list(_config_keys(IngestConfig))
    vocabulary: set[bytes] = set()
    for text in texts:
        vocabulary.update(_TOKEN.findall(text.lower().encode("utf-8", "replace")))
    return frozenset(vocabulary)


def _source_literals() -> Iterator[str]:
    """The string constants of the vocabulary packages' modules, docstrings excluded."""
    import importlib
    import pkgutil

    for package_name in _VOCABULARY_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            spec = importlib.util.find_spec(f"{package_name}.{info.name}")
            if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
                continue
            tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
            docstrings = {
                id(node.body[0].value)
                for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and node.body
                and isinstance(node.body[0], ast.Expr)
                and isinstance(node.body[0].value, ast.Constant)
            }
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                    yield node.value


def _config_keys(model: type) -> Iterator[str]:
    for name, info in getattr(model, "model_fields", {}).items():
        yield name
        annotation = info.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                yield from _config_keys(candidate)


def scrub_vocabulary(text: bytes) -> bytes:
    """``text`` lower-cased with every token of the tool's vocabulary blanked (other bytes kept)."""
    vocabulary = tool_vocabulary()
    return _TOKEN_BYTES.sub(lambda match: b" " * len(match.group()) if match.group() in vocabulary else match.group(), text.lower())


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
        elif scanned.kind == "unread":  # its identifiers would be missing from the search: no partial audit
            raise EnvironmentFailure(
                f"{scanned.reason} while reading a file under source folder #{file.source + 1}: {scanned.fix}"
            )
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


# Names ingest gives its own outputs: never matched as file names (the pseudonymous names hold only hex).
_OWN_NAMES = frozenset({"manifest.csv", "quarantine.csv", "audit.jsonl", INGEST_RECORD, "images", "dicom"})


def name_findings(rel: str, matcher: Matcher) -> list[Finding]:
    """Identifiers in an output's relative path (the tool's own fixed file names excepted)."""
    parts = [part for part in PurePosixPath(rel).parts if part not in _OWN_NAMES]
    return matcher.findings("/".join(parts).encode("utf-8", "replace"), rel, "file name") if parts else []


def scan_output_file(path: Path, rel: str, matcher: Matcher | None, profile: Profile | None) -> list[Finding]:
    """Findings in one output file (name, content; structure unless ``profile`` is None)."""
    findings: list[Finding] = []
    if matcher is not None:
        findings += name_findings(rel, matcher)
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
            if matcher.matches_in(data, binary=binary):  # most files hold nothing: only those are parsed
                findings += _scan_text(data, rel, lowered_name, matcher, binary)
    return findings


def _scan_text(data: bytes, rel: str, name: str, matcher: Matcher, binary: bool) -> list[Finding]:
    """Findings in a non-image file: CSV and JSON place by place (vocabulary places scrubbed), anything else whole."""
    if not binary:
        try:
            text = data.decode("utf-8-sig")
            if name.endswith(".csv"):
                return _scan_csv(text, rel, matcher)
            if name.endswith(".jsonl"):
                return [found for line in text.splitlines() if line.strip() for found in _scan_json(json.loads(line), rel, matcher, False)]
            if name.endswith(".json"):
                return _scan_json(json.loads(text), rel, matcher, name == INGEST_RECORD)
        except (UnicodeDecodeError, ValueError, csv.Error):
            pass  # not what its name says: searched whole below
    return matcher.findings(data, rel, "content", binary=binary)


def _scan_csv(text: str, rel: str, matcher: Matcher) -> list[Finding]:
    """A CSV cell by cell: the header row and the columns of fixed words are vocabulary places."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    header = rows[0]
    vocabulary_columns = {index for index, name in enumerate(header) if name.strip().lower() in _VOCABULARY_FIELDS}
    findings = [found for cell in header for found in matcher.findings(cell.encode(), rel, "content (header)", vocabulary=True)]
    for row in rows[1:]:
        for index, cell in enumerate(row):
            column = header[index] if index < len(header) else f"#{index + 1}"
            place = f"content (column {column})"
            findings += matcher.findings(cell.encode(), rel, place, vocabulary=index in vocabulary_columns)
    return findings


def _scan_json(payload: object, rel: str, matcher: Matcher, all_vocabulary: bool) -> list[Finding]:
    """A JSON document value by value: keys, the fields of fixed words (and every string of
    ingest.json, written from config and counts) are vocabulary places."""
    findings: list[Finding] = []
    stack: list[tuple[object, bool]] = [(payload, all_vocabulary)]
    while stack:
        item, vocabulary = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                findings += matcher.findings(str(key).encode(), rel, "content (key)", vocabulary=True)
                stack.append((value, all_vocabulary or str(key).lower() in _VOCABULARY_FIELDS))
        elif isinstance(item, list):
            stack.extend((value, vocabulary) for value in item)
        elif item is not None:
            text = item if isinstance(item, str) else json.dumps(item)
            findings += matcher.findings(text.encode("utf-8", "replace"), rel, "content", vocabulary=vocabulary and isinstance(item, str))
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
        findings += matcher.findings(header[148:228], rel, "NIfTI descrip")
        findings += matcher.findings(header[348:], rel, "NIfTI header extension", binary=True)
    return findings


def _scan_dicom(data: bytes, rel: str, matcher: Matcher | None, profile: Profile | None) -> list[Finding]:
    end = _dicom_header_end(data)
    findings: list[Finding] = []
    if matcher is not None and matcher.kinds_in(data[:end], binary=False) and matcher.kinds_in(_without_allowed(data[:end], matcher)):
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


def _without_allowed(header: bytes, matcher: Matcher) -> bytes:
    """The header lower-cased with the retained texts blanked: a hit that remains needs the element-by-element
    look (a vendor name kept in Manufacturer and also removed from a private element is then no reason to parse)."""
    lowered = header.lower()
    for text in matcher.allowed:
        if text in lowered:
            lowered = lowered.replace(text, b" ")
    return lowered


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
        vr = raw.VR or (pydicom.datadict.dictionary_VR(tag) if pydicom.datadict.dictionary_has_tag(tag) else "UN")
        rule = profile.rule_for(tag, vr.split(" or ")[0])
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
    """Name the element(s) holding identifiers (only called when the raw scan found something).

    The file meta and the de-identification attributes ingest adds are vocabulary places; an
    element holding exactly a retained text (:attr:`Identifiers.allowed`) is what the profile kept.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:
        return matcher.findings(data[: _dicom_header_end(data)], rel, "DICOM header")
    findings: list[Finding] = []
    explained = False  # a raw hit lies in an element that is no finding (vocabulary or retained text)
    meta = getattr(ds, "file_meta", None)
    elements = [(elem, True) for elem in meta] if meta is not None else []
    elements += list(_elements_with_ownership(ds, False))
    for elem, own in elements:
        if elem.VR == "SQ":
            continue
        text = _element_text(elem)
        where = f"{tag_text(int(elem.tag))} {elem.keyword or ''}".rstrip()
        if own or text.strip(b" \x00").lower() in matcher.allowed:
            explained = explained or bool(matcher.matches_in(text))
            if not own:
                continue
        found = matcher.findings(text, rel, where, vocabulary=own)
        if elem.VR in _DATE_TIME_VRS and found:
            # A date or time element holds digits derived from the source's own dates and times. At cohort scale
            # a shifted time reads like some patient's 6-digit Study ID by chance: a coincidence of digits, not a
            # copy. The source's dates are still searched there (an unshifted date is a leak).
            explained = True
            found = [finding for finding in found if finding.kind == identifier_kind("DA")]
        findings += found
    if findings or explained:
        return findings
    return [Finding(rel, "DICOM header", "identifier between elements")]


_DATE_TIME_VRS = frozenset({"DA", "DT", "TM"})


def _elements_with_ownership(ds: pydicom.Dataset, own: bool) -> Iterator[tuple[pydicom.DataElement, bool]]:
    """Every element (depth first) with whether ingest wrote it (the de-identification attributes and their items)."""
    for elem in ds:
        mine = own or int(elem.tag) in _OWN_DICOM_TAGS
        yield elem, mine
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from _elements_with_ownership(item, mine)


def _element_text(elem: pydicom.DataElement) -> bytes:
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(item) for item in value).encode("utf-8", "replace")
    return str(value).encode("utf-8", "replace")


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
    searched = identifiers if identifiers is not None else Identifiers()
    chunks = [files[start : start + _AUDIT_CHUNK] for start in range(0, len(files), _AUDIT_CHUNK)]
    jobs = [(chunk, searched, options if check_dicom_structure else None) for chunk in chunks]
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


def _scan_chunk(files: list[tuple[str, str]], identifiers: Identifiers, options: DeidOptions | None) -> list[Finding]:
    """Scan a chunk of files (the unit of work of a pool worker)."""

    matcher = Matcher(identifiers) if identifiers.values else None
    profile = profile_for(IngestConfig(deid=options)) if options is not None else None
    findings: list[Finding] = []
    with quiet_readers():
        for path, rel in files:
            findings += scan_output_file(Path(path), rel, matcher, profile)
    return findings


def _dedupe(findings: list[Finding]) -> list[Finding]:
    return list(dict.fromkeys(findings))
