"""De-identification conformance on third-party DICOM: Table E.1-1 actions scored element by element.

Scores every element of every source file that Table E.1-1 (2026c, the column of the options each
output *declares* in its DeidentificationMethodCodeSequence) gives an action, against the output file
made from it, MIDI-B style: the share of required actions done right. Private data elements count too
(removed unless Retain Safe Private, 113111, is declared). An action is right when:

* X: the element is absent;  Z: present with an empty value (an empty sequence);
* D: present with a value, different from a non-empty source value;
* U: present, every value a UID, none equal to the source's, the same source UID always mapped to the
  same new UID across the corpus;
* C under Modified Dates (113107; DA, DT, TM): present, of its VR's form, different from the source;
* K (a retain option): present and unchanged;
* a code with alternatives (X/Z, Z/D, X/D, X/Z/D, X/Z/U*): any of them. Inside a sequence that is
  kept, each item's elements are scored; inside one that is removed or emptied, nothing more is.

A leak is a source value (a person-name part, ID, date, UID or text of 4+ characters) of an element
whose action is not K that occurs, as a whole word, anywhere in the output file's header, unless the
source also holds it in an element the table keeps. Files a tool does not write (medsynth
quarantines; the others fail) are counted, not scored.

Corpora: the ``pydicom-data`` and ``deid-data`` packages (dev extra). Tools: medsynth ingest, and from
the bench extra dicognito, deid (its default recipe) and dicom-anonymizer, each as its own API runs.

Usage::

    python benchmarks/deid_conformance.py [--corpus pydicom-data deid-data] [--tools medsynth dicognito deid dicom-anonymizer]
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.ingest import IngestConfig, IngestSummary, run  # noqa: E402
from pipeline.ingest.keys import KEY_FILE, keyed_uid  # noqa: E402
from pipeline.ingest.profile import (  # noqa: E402
    basic_table,
    derive_device_identity,
    derive_modified_dates,
    derive_patient_characteristics,
)

__all__ = ["CORPORA", "TOOLS", "Score", "corpus_folder", "dicom_files", "ingest_corpus", "score_pairs", "run_tool", "main"]

CORPORA = ("pydicom-data", "deid-data")
TOOLS = ("medsynth", "dicognito", "deid", "dicom-anonymizer")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_FORMS = {
    "DA": re.compile(r"^\d{8}$"),
    "TM": re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$"),
    "DT": re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$"),
}
_LEAK_VRS = frozenset({"PN", "LO", "SH", "DA", "DT", "UI", "LT", "ST", "UT", "UC", "AE"})
_PLACEHOLDERS = frozenset({"anonymized", "anonymous", "anon", "unknown", "none", "removed", "redacted", "19000101"})


@dataclass
class Score:
    """Counts of one tool on one corpus."""

    files: int = 0  # DICOM files in the corpus (readable by pydicom)
    written: int = 0
    elements: int = 0
    right: int = 0
    leaks: int = 0
    leaked: Counter = field(default_factory=Counter)  # keyword of the source element -> leaked values
    wrong: Counter = field(default_factory=Counter)  # (keyword or private, required code) -> count

    @property
    def action_score(self) -> float:
        return self.right / self.elements if self.elements else float("nan")


def corpus_folder(name: str) -> Path:
    """The folder of DICOM files a corpus package ships."""
    if name == "pydicom-data":
        import data_store

        return Path(data_store.__file__).parent / "data"
    if name == "deid-data":
        import deid_data

        return Path(deid_data.__file__).parent / "data"
    raise ValueError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")


def _read(path: Path, stop: bool = True) -> Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=stop)
    except Exception:
        return None


def dicom_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` pydicom reads as a DICOM dataset with a SOPInstanceUID."""
    return [path for path in sorted(folder.rglob("*")) if path.is_file() and (ds := _read(path)) is not None and "SOPInstanceUID" in ds]


# ------------------------------------------------------------------------------------------
# The required action of each element
# ------------------------------------------------------------------------------------------


def _codes(declared: set[str]) -> Callable[[int, str], str | None]:
    """tag, VR -> the required code of the table's column for the declared options (None: not listed)."""
    rows = basic_table()
    exact = {row.tag: row.code for row in rows if row.mask == 0xFFFFFFFF}
    masked = [(row.tag, row.mask, row.code) for row in rows if row.mask != 0xFFFFFFFF]
    if "113107" in declared:
        exact.update({tag: "C" for tag in derive_modified_dates(rows)})
    if "113109" in declared:
        exact.update({tag: "K" for tag in derive_device_identity(rows)})
    if "113108" in declared:
        exact.update({tag: "K" for tag in derive_patient_characteristics(rows)})

    def code(tag: int, vr: str) -> str | None:
        if tag in exact:
            return exact[tag]
        for value, mask, found in masked:
            if tag & mask == value:
                return found
        return None

    return code


def _declared(ds: Dataset) -> set[str]:
    try:
        return {str(item.CodeValue) for item in ds.get("DeidentificationMethodCodeSequence", []) or []}
    except Exception:
        return set()


def _values(elem: pydicom.DataElement) -> list[str]:
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value).decode("latin-1").strip(" \x00")] if bytes(value).strip(b" \x00") else []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(item).strip() for item in value]
    return [str(value).strip()] if str(value).strip() else []


class _Judge:
    """Scores one (source, output) pair at a time; keeps the corpus-wide UID map for consistency."""

    def __init__(self) -> None:
        self.uids: dict[str, str] = {}

    def action_right(self, code: str, source: pydicom.DataElement, output: pydicom.DataElement | None) -> bool:
        return any(self._one(option, source, output) for option in code.replace("*", "").split("/"))

    def _one(self, code: str, source: pydicom.DataElement, output: pydicom.DataElement | None) -> bool:
        if code == "X":
            return output is None
        if output is None:
            return False
        if source.VR == "SQ":
            items = len(output.value or [])
            return items == 0 if code == "Z" else True  # D/U/K/C on a sequence: kept, items scored inside
        before, after = _values(source), _values(output)
        if code == "Z":  # PS3.15 E.1.1: a zero-length value, or a dummy
            return not after or not before or after != before
        if code == "K":
            return before == after
        if code == "D":
            return bool(after) and (not before or after != before)
        if code == "U":
            if not before:
                return not after
            if len(after) != len(before) or not all(_UID.match(uid) for uid in after):
                return False
            for old, new in zip(before, after):
                if old == new or self.uids.setdefault(old, new) != new:
                    return False
            return True
        if code == "C":  # Modified Dates: a date/time of its form, moved
            if not before:
                return not after
            form = _FORMS.get(source.VR)
            return bool(after) and after != before and (form is None or all(form.match(item) for item in after))
        return False


def _children(ds: Dataset) -> dict[int, pydicom.DataElement]:
    return {int(elem.tag): elem for elem in ds}


def score_pair(source: Dataset, output: Dataset | None, judge: _Judge, score: Score) -> None:
    """Add one source file's elements to ``score`` (``output`` None: the tool wrote nothing for it)."""
    if output is None:
        return
    score.written += 1
    declared = _declared(output)
    code_of = _codes(declared)
    keep_private = "113111" in declared
    removed_values: dict[str, str] = {}  # value -> keyword of the element it came from
    kept_values: set[str] = set()

    def walk(src: Dataset, out: Dataset | None) -> None:
        out_elems = _children(out) if out is not None else {}
        for elem in src:
            tag = int(elem.tag)
            if tag >> 16 in (0x0002, 0x7FE0) or tag & 0xFFFF == 0:
                continue
            if (tag >> 16) & 1:
                if tag & 0xFFFF < 0x1000:
                    continue  # private creators name a vendor's block; their data elements are scored
                code = "K" if keep_private else "X"
            else:
                code = code_of(tag, elem.VR)
            if code is None:
                if elem.VR == "SQ":
                    for index, item in enumerate(elem.value or []):
                        walk(item, _item(out_elems.get(tag), index))
                elif elem.VR not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
                    kept_values.update(value.lower() for value in _values(elem))
                continue
            score.elements += 1
            target = out_elems.get(tag)
            if judge.action_right(code, elem, target):
                score.right += 1
            else:
                score.wrong[(elem.keyword or "private", code)] += 1
            if code != "K":
                removed_values.update(dict.fromkeys(_leak_candidates(elem), elem.keyword or "private"))
            if elem.VR == "SQ" and target is not None and code not in ("X", "Z"):
                for index, item in enumerate(elem.value or []):
                    walk(item, _item(target, index))

    walk(source, output)
    header = _header_text(output)
    for value, keyword in removed_values.items():
        if value not in kept_values and re.search(rf"(?<![a-z0-9]){re.escape(value)}(?![a-z0-9])", header):
            score.leaks += 1
            score.leaked[keyword] += 1


def _item(elem: pydicom.DataElement | None, index: int) -> Dataset | None:
    if elem is None or elem.VR != "SQ" or not elem.value or index >= len(elem.value):
        return None
    return elem.value[index]


def _leak_candidates(elem: pydicom.DataElement) -> Iterator[str]:
    """The searchable source values of an element (lower-case): whole values and person-name parts."""
    if elem.VR == "SQ":
        for item in elem.value or []:
            for child in item.iterall():
                if child.VR in _LEAK_VRS:
                    yield from _leak_candidates(child)
        return
    if elem.VR not in _LEAK_VRS:
        return
    for value in _values(elem):
        pieces = [value] + (re.split(r"[\^= ]+", value) if elem.VR == "PN" else [])
        for piece in pieces:
            piece = piece.strip().lower()
            if len(piece) >= 4 and piece not in _PLACEHOLDERS and not (piece.isdigit() and len(piece) < 6):
                yield piece


def _header_text(ds: Dataset) -> str:
    parts = []
    for elem in ds.iterall():
        if int(elem.tag) >> 16 == 0x7FE0 or elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"):
            continue
        parts.extend(_values(elem))
    return "\n".join(parts).lower()


def score_pairs(pairs: list[tuple[Path, Path | None]]) -> Score:
    """Score (source file, output file or None) pairs of one tool on one corpus."""
    score = Score()
    judge = _Judge()
    for source_path, output_path in pairs:
        source = _read(source_path)
        if source is None:
            continue
        score.files += 1
        output = _read(output_path) if output_path is not None else None
        score_pair(source, output, judge, score)
    return score


# ------------------------------------------------------------------------------------------
# The tools
# ------------------------------------------------------------------------------------------


def ingest_corpus(files: list[Path], work: Path) -> tuple[IngestSummary, list[tuple[Path, Path | None]]]:
    """Run medsynth ingest over copies of ``files`` in ``work``; its summary and (source, output) pairs."""
    source = work / "source" / "corpus"
    copies = []
    for index, path in enumerate(files):
        target = source / f"{index:04d}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copies.append(target)
    out, private = work / "dataset", work / "private"
    summary = run([work / "source"], out, IngestConfig(workers=1), private=private)
    key = bytes.fromhex((private / KEY_FILE).read_text().strip())
    with open(private / "source_map.csv", newline="") as handle:
        used = {Path(row["path"]).resolve() for row in csv.DictReader(handle)}  # the one source of each output
    written = {}
    for path in (out / "dicom").rglob("*.dcm"):
        ds = _read(path)
        if ds is not None:
            written[str(ds.SOPInstanceUID)] = path
    pairs: list[tuple[Path, Path | None]] = []
    for original, copy in zip(files, copies):
        ds = _read(copy)
        output = written.get(keyed_uid(key, str(ds.SOPInstanceUID))) if ds is not None and copy.resolve() in used else None
        pairs.append((original, output))
    return summary, pairs


def _medsynth(files: list[Path], work: Path) -> list[tuple[Path, Path | None]]:
    return ingest_corpus(files, work)[1]


def _per_file(anonymize: Callable[[Path, Path], None]) -> Callable[[list[Path], Path], list[tuple[Path, Path | None]]]:
    def tool(files: list[Path], work: Path) -> list[tuple[Path, Path | None]]:
        pairs = []
        for index, path in enumerate(files):
            target = work / f"{index:04d}.dcm"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    anonymize(path, target)
            except Exception:
                target = None  # the tool failed on this file
            pairs.append((path, target if target is not None and target.is_file() else None))
        return pairs

    return tool


def _dicognito(source: Path, target: Path) -> None:
    from dicognito.anonymizer import Anonymizer

    ds = pydicom.dcmread(source)
    Anonymizer().anonymize(ds)
    ds.save_as(target)


def _deid(source: Path, target: Path) -> None:
    import logging

    from deid.dicom import replace_identifiers

    logging.getLogger("deid").setLevel(logging.ERROR)  # it warns once per file that it uses its default recipe
    folder = target.parent / (target.stem + "_deid")
    folder.mkdir(parents=True, exist_ok=True)
    written = replace_identifiers([str(source)], save=True, output_folder=str(folder), overwrite=True)
    shutil.move(str(written[0]), target)


def _dicom_anonymizer(source: Path, target: Path) -> None:
    from dicomanonymizer.anonymizer import anonymize_dicom_file

    anonymize_dicom_file(str(source), str(target))


_TOOLS: dict[str, Callable[[list[Path], Path], list[tuple[Path, Path | None]]]] = {
    "medsynth": _medsynth,
    "dicognito": _per_file(_dicognito),
    "deid": _per_file(_deid),
    "dicom-anonymizer": _per_file(_dicom_anonymizer),
}


def run_tool(tool: str, corpus: str, work: Path) -> Score:
    """Run ``tool`` over ``corpus`` in ``work`` and score its outputs."""
    files = dicom_files(corpus_folder(corpus))
    work.mkdir(parents=True, exist_ok=True)
    return score_pairs(_TOOLS[tool](files, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", nargs="+", default=list(CORPORA), choices=CORPORA)
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--details", action="store_true", help="List the wrong actions per tool.")
    args = parser.parse_args(argv)
    print("| corpus | tool | DICOM files | written | elements scored | actions right | action score | leaked values |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    details = []
    for corpus in args.corpus:
        for tool in args.tools:
            with tempfile.TemporaryDirectory(prefix=f"conformance-{tool}-") as work:
                try:
                    score = run_tool(tool, corpus, Path(work))
                except ImportError as exc:
                    print(f"| {corpus} | {tool} | not installed ({exc.name}; pip install -e '.[bench]') | | | | | |")
                    continue
            print(
                f"| {corpus} | {tool} | {score.files} | {score.written} | {score.elements} | {score.right} | "
                f"{score.action_score:.4f} | {score.leaks} |"
            )
            details.append((corpus, tool, score))
    if args.details:
        for corpus, tool, score in details:
            wrong = ", ".join(f"{keyword} ({code}) {count}" for (keyword, code), count in score.wrong.most_common(10))
            leaked = ", ".join(f"{keyword} {count}" for keyword, count in score.leaked.most_common(10))
            print(f"{corpus} / {tool}: wrong: {wrong or 'none'}; leaked from: {leaked or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
