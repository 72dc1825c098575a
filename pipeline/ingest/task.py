"""The per-series task: a pure function of (files, key, config) that a pool worker runs.

``process_series(task, key, config)`` reads one DICOM series (or one NIfTI file), decides what
must be quarantined, anonymizes, writes the NIfTI volume and the anonymized DICOM files into the
dataset, and returns a :class:`SeriesResult`. It touches nothing but its own output paths and its
own state record, so any number of tasks can run at once, on this machine or on a cluster.

Resumability: the task's state record (``PRIVATE/state/<sample_id>.json``) is written last,
atomically, and names the input hash (file contents + label + settings + key fingerprint) and
the sha256 of every output. A task whose record matches and whose outputs are intact is skipped.

Permanent versus transient: only what the files themselves decide (corrupt, not an image,
burned-in text, an unusable volume) is quarantined and remembered in the state record. A failure
of the machine (disk full, I/O error, permission, memory; see :mod:`pipeline.core.faults`) leaves
no state record and no output of the series, and sets :attr:`SeriesResult.failure` instead: the
stage then fails, and a re-run retries the series. An unexpected error is quarantined but not
remembered either, so a re-run (or a fixed medsynth) tries the series again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian

from pipeline.core.faults import environment_cause, environment_fix
from pipeline.core.files import PRIVATE_MODE, atomic_write_json, sha256_file, write_nifti
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.audit import header_tokens
from pipeline.ingest.burned_in import Region, blank_regions, find_text_regions, luminance_view
from pipeline.ingest.deid import DeidContext, anonymize, identifier_candidates, tag_text
from pipeline.ingest.dicomio import SharedElements, element_value, encode_file, read_file
from pipeline.ingest.discover import SourceFile
from pipeline.ingest.pool import quiet_readers
from pipeline.ingest.keys import date_offset_days, keyed_hex, sample_pseudonym, subject_pseudonym
from pipeline.ingest.profile import CID7050, TABLE_EDITION, Profile, profile_for
from pipeline.ingest.volume import Frame, SeriesProblem, Volume, build_volume, frames_of, image_problem

__all__ = [
    "STATE_DIR",
    "SeriesTask",
    "SeriesResult",
    "process_series",
    "settings_digest",
    "burned_in_decision",
    "NON_SCAN_MODALITIES",
]

STATE_DIR = "state"
NON_SCAN_MODALITIES = frozenset(
    {"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "KO", "SR", "REG", "FID", "ECG", "HD", "AU", "RWV", "PLAN"}
)
# SOP classes that commonly carry burned-in text: secondary capture, ultrasound, visible light.
_BURNED_IN_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (incl. multi-frame variants .7.1-.7.4)
    "1.2.840.10008.5.1.4.1.1.6.",  # Ultrasound
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame
    "1.2.840.10008.5.1.4.1.1.77.1",  # Visible light (endoscopy, photography, video)
)
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_TOOL = "medsynth"


@dataclass(frozen=True)
class SeriesTask:
    """One unit of work. Holds source paths and the PatientID-derived keys (PHI): memory only."""

    kind: str  # "dicom" or "nifti"
    series_key: str
    subject_key: str
    label: str
    files: tuple[SourceFile, ...]
    out: str  # dataset folder
    private: str  # private folder


@dataclass
class SeriesResult:
    """What a task did. ``identifiers``/``kept_text`` are PHI for the leak audit: memory only."""

    sample_id: str
    subject_id: str
    label: str
    kind: str
    row: dict[str, str] | None = None  # manifest row without 'split'; None when quarantined
    outputs: dict[str, str] = field(default_factory=dict)  # relative output path -> sha256
    quarantined: list[tuple[SourceFile, str]] = field(default_factory=list)
    used: list[SourceFile] = field(default_factory=list)
    audit: list[dict[str, object]] = field(default_factory=list)
    identifiers: dict[bytes, str] = field(default_factory=dict)  # value -> kind
    kept_text: set[bytes] = field(default_factory=set)
    structure: list[tuple[str, str, str]] = field(default_factory=list)  # (output, place, kind) problems
    tokens: set[bytes] = field(default_factory=set)  # search tokens of the DICOM outputs' headers
    resumed: bool = False
    # Set when the machine failed the task ("no space left on device while writing the dataset"): no
    # output, no quarantine, no state record. Never a path or header value.
    failure: str = ""
    failure_fix: str = ""


def settings_digest(config: IngestConfig, key: bytes) -> str:
    """What besides the input files decides a task's output: options, edition, key fingerprint."""
    payload = {
        "deid": config.deid.model_dump(mode="json"),
        "burned_in": config.burned_in.model_dump(mode="json"),
        "write_dicom": config.write_dicom,
        "edition": TABLE_EDITION,
        "key": keyed_hex(key, "fingerprint", "medsynth"),
        "version": 2,  # 2: MONOCHROME1 mirrored, 2D NIfTI inputs written as (x, y, 1), the spatial_dims column
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def process_series(task: SeriesTask, key: bytes, config: IngestConfig) -> SeriesResult:
    """Run one task (see the module docstring).

    Never raises for bad input (it quarantines) nor for a failure of the machine (it returns a
    result whose ``failure`` says what failed).
    """
    with quiet_readers():
        return _process_series(task, key, config)


class _Failed(Exception):
    """The machine failed the task; ``doing`` says at what (no path, no header value)."""

    def __init__(self, cause: BaseException, doing: str) -> None:
        super().__init__(doing)
        self.cause = cause
        self.doing = doing


def _reraise_environment(exc: BaseException, doing: str) -> None:
    """Stop the task when the machine, not the file, failed: that must not become a quarantine reason."""
    if environment_cause(exc) is not None:
        raise _Failed(exc, doing) from exc


def _process_series(task: SeriesTask, key: bytes, config: IngestConfig) -> SeriesResult:
    subject_id = subject_pseudonym(key, task.subject_key)
    sample_id = sample_pseudonym(key, task.series_key)
    result = SeriesResult(sample_id=sample_id, subject_id=subject_id, label=task.label, kind=task.kind)
    try:
        _run_task(task, key, config, result)
    except _Failed as failed:
        _fail(task, result, failed.cause, failed.doing)
    except Exception as exc:  # noqa: BLE001 - sorted below: the machine's failures stop the stage
        if environment_cause(exc) is not None:
            _fail(task, result, exc, f"writing the dataset {task.out} or its private folder")
        else:
            raise
    return result


def _fail(task: SeriesTask, result: SeriesResult, exc: BaseException, doing: str) -> None:
    """Turn ``result`` into a failed one: no outputs, no quarantine, no state record."""
    _discard_outputs(task, result)
    result.row, result.used, result.quarantined = None, [], []
    result.failure = f"{environment_cause(exc)} while {doing}"
    result.failure_fix = environment_fix(exc)


def _run_task(task: SeriesTask, key: bytes, config: IngestConfig, result: SeriesResult) -> None:
    contents: list[bytes] = []
    digest = hashlib.sha256()
    digest.update(f"{task.kind}\x00{task.label}\x00{settings_digest(config, key)}".encode())
    for file in task.files:
        try:
            with open(file.path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            if environment_cause(exc) is not None:  # EIO, EACCES: the file may be fine, the access is not
                raise _Failed(exc, "reading a source file") from exc
            data = b""  # gone since the walk, or not a regular file: quarantined as unreadable
        contents.append(data)
        digest.update(hashlib.sha256(data).digest())
    input_hash = digest.hexdigest()
    state_path = Path(task.private) / STATE_DIR / f"{result.sample_id}.json"
    if _resume(state_path, input_hash, task, result) is not None:
        return
    try:
        if task.kind == "nifti":
            _nifti(task, contents[0], result)
        else:
            _dicom(task, contents, key, config, result)
    except _Failed:
        raise
    except Exception as exc:  # last line of defence: a task never takes the run down
        if environment_cause(exc) is not None:
            raise _Failed(exc, f"writing the dataset {task.out}") from exc
        _discard_outputs(task, result)
        reason = f"unexpected error while processing ({type(exc).__name__})"
        result.quarantined = [(file, reason) for file in task.files]
        result.used, result.row = [], None
        return  # not remembered: a re-run, or a fixed medsynth, tries the series again
    try:
        _save_state(state_path, input_hash, task, result)
    except OSError as exc:
        if environment_cause(exc) is not None:
            raise _Failed(exc, f"writing the private folder {task.private}") from exc
        raise


# ------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------


def _resume(state_path: Path, input_hash: str, task: SeriesTask, result: SeriesResult) -> SeriesResult | None:
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if state.get("input_hash") != input_hash:
        return None
    out = Path(task.out)
    for rel, sha in state.get("outputs", {}).items():
        target = out / rel
        if not target.is_file() or sha256_file(target) != sha:
            return None
    files = {(file.source, file.rel): file for file in task.files}
    result.row = state.get("row")
    result.outputs = dict(state.get("outputs", {}))
    result.quarantined = [(files[(source, rel)], reason) for source, rel, reason in state.get("quarantined", []) if (source, rel) in files]
    result.used = [files[(source, rel)] for source, rel in state.get("used", []) if (source, rel) in files]
    result.audit = list(state.get("audit", []))
    result.identifiers = {bytes.fromhex(item): kind for item, kind in state.get("identifiers", [])}
    result.kept_text = {bytes.fromhex(item) for item in state.get("kept_text", [])}
    result.structure = [tuple(item) for item in state.get("structure", [])]  # type: ignore[misc]
    result.tokens = {bytes.fromhex(item) for item in state.get("tokens", [])}
    result.resumed = True
    return result


def _save_state(state_path: Path, input_hash: str, task: SeriesTask, result: SeriesResult) -> None:
    # The private folder is the one place allowed to link pseudonyms to sources; identifiers are
    # kept there (hex) so a resumed run can still audit its whole output.
    atomic_write_json(
        state_path,
        {
            "input_hash": input_hash,
            "sample_id": result.sample_id,
            "row": result.row,
            "outputs": result.outputs,
            "quarantined": [[file.source, file.rel, reason] for file, reason in result.quarantined],
            "used": [[file.source, file.rel] for file in result.used],
            "audit": result.audit,
            "identifiers": sorted([item.hex(), kind] for item, kind in result.identifiers.items()),
            "kept_text": sorted(item.hex() for item in result.kept_text),
            "structure": [list(item) for item in result.structure],
            "tokens": sorted(item.hex() for item in result.tokens),
        },
        PRIVATE_MODE,
    )


def _discard_outputs(task: SeriesTask, result: SeriesResult) -> None:
    out = Path(task.out)
    for rel in result.outputs:
        try:
            (out / rel).unlink()
        except OSError:
            pass
    result.outputs = {}


# ------------------------------------------------------------------------------------------
# NIfTI
# ------------------------------------------------------------------------------------------


def _nifti(task: SeriesTask, content: bytes, result: SeriesResult) -> None:
    file = task.files[0]
    try:
        image = nib.load(file.path)
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError("not NIfTI")
        data = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:
        _reraise_environment(exc, "reading a source file")
        result.quarantined.append((file, f"unreadable NIfTI file ({type(exc).__name__})"))
        return
    if data.size == 0 or not np.all(np.isfinite(affine)) or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        result.quarantined.append((file, "NIfTI without voxels or with an invalid affine"))
        return
    while data.ndim > 3 and data.shape[-1] == 1:  # (x, y, z, 1): a 3D volume written by a 4D-minded tool
        data = data[..., 0]
    if data.dtype == np.float64:
        with np.errstate(over="ignore"):  # an overflow becomes inf, which image_problem reports
            data = data.astype(np.float32)
    problem = image_problem(data)
    if problem is not None:
        result.quarantined.append((file, problem))
        return
    header = image.header
    for name in ("descrip", "aux_file", "db_name", "intent_name"):
        if name in header:
            value = bytes(np.asarray(header[name]).tobytes()).strip(b" \x00")
            for candidate in identifier_candidates(value, "LT"):
                result.identifiers.setdefault(candidate, "NIfTI header text")
            result.audit.append({"field": name, "action": "X" if value else "K", "rule": "nifti"})
    for extension in getattr(header, "extensions", []):
        raw = extension.get_content() if hasattr(extension, "get_content") else b""
        if isinstance(raw, (bytes, bytearray)):
            for candidate in identifier_candidates(bytes(raw).replace(b"\x00", b" "), "LT"):
                result.identifiers.setdefault(candidate, "NIfTI extension text")
        result.audit.append({"field": f"extension(code {int(extension.get_code())})", "action": "X", "rule": "nifti"})
    zooms = tuple(header.get_zooms()[:3])
    if data.ndim == 2:  # a 2D image (e.g. a radiograph): one plane, as ingest writes a single-frame DICOM
        data = data[:, :, np.newaxis]
        zooms = (*zooms, float(np.linalg.norm(affine[:3, 2])) or 1.0)
    rel = f"images/{result.subject_id}/{result.sample_id}.nii.gz"
    target = Path(task.out) / rel
    write_nifti(target, data, affine, descrip="")
    result.outputs[rel] = sha256_file(target)
    result.used.append(file)
    result.row = _row(result, rel, "nifti", "", data, tuple(float(z) for z in zooms), "patient", 0)


# ------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------


def burned_in_decision(ds: Dataset, config: IngestConfig) -> tuple[str, list[Region]]:
    """``(decision, regions)`` for one image (PS3.15 E.3.1: pixel data).

    ``"ok"``: no burned-in text expected (BurnedInAnnotation=NO, or a modality and SOP class that do
    not carry it); ``"blank"``: blank the configured device rectangles ``regions``; ``"detect"``:
    find the text with the detector and blank it (``burned_in.action: blank``); ``"quarantine"``.
    """
    flag = str(element_value(ds, "BurnedInAnnotation", "") or "").strip().upper()
    if flag == "NO":
        return "ok", []
    modality = str(element_value(ds, "Modality", "") or "").strip().upper()
    sop_class = str(element_value(ds, "SOPClassUID", "") or "")
    image_type = element_value(ds, "ImageType") or []
    image_types = [str(item).upper() for item in ([image_type] if isinstance(image_type, str) else image_type)]
    risky = (
        flag == "YES"
        or modality in {item.upper() for item in config.burned_in.modalities}
        or sop_class.startswith(_BURNED_IN_CLASS_PREFIXES)
        or "SCREEN SAVE" in image_types
    )
    if not risky:
        return "ok", []
    manufacturer = str(ds.get("Manufacturer", "") or "").strip().upper()
    model = str(ds.get("ManufacturerModelName", "") or "").strip().upper()
    rows, columns = ds.get("Rows"), ds.get("Columns")
    for device in config.burned_in.blank:
        if device.manufacturer.strip().upper() != manufacturer:
            continue
        if device.model is not None and device.model.strip().upper() != model:
            continue
        if (device.rows is not None and device.rows != rows) or (device.columns is not None and device.columns != columns):
            continue
        return "blank", list(device.regions)
    return ("detect" if config.burned_in.action == "blank" else "quarantine"), []


def _read(content: bytes) -> Dataset:
    ds = read_file(content)  # pydicom's elements, parsed faster; None for the unusual files
    if ds is not None:
        return ds
    has_preamble = len(content) >= 132 and content[128:132] == b"DICM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(content), force=not has_preamble)


def _uid_name(uid: str, unknown: str) -> str:
    """The standard name of a UID, or ``unknown``: quarantine.csv never quotes a header value."""
    from pydicom.uid import UID_dictionary

    entry = UID_dictionary.get(str(uid).strip(" \x00"))
    return entry[0] if entry else unknown


def _ts_name(ds: Dataset) -> str:
    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return _uid_name(str(uid), "private or unknown transfer syntax") if uid else "no transfer syntax"


def _screen(ds: Dataset, config: IngestConfig) -> tuple[str, str, list[Region]]:
    """``("", decision, regions)`` for a usable image (see :func:`burned_in_decision`), else ``(reason, "", [])``."""
    sop_class = str(element_value(ds, "SOPClassUID", "") or "")
    if not any(tag in ds._dict for tag in _PIXEL_TAGS):
        name = _uid_name(sop_class, "private or unknown SOP class") if sop_class else "no SOPClassUID"
        return f"no pixel data: non-image object or stripped image ({name})", "", []
    modality = str(element_value(ds, "Modality", "") or "").strip().upper()
    if modality in NON_SCAN_MODALITIES:
        name = _uid_name(sop_class, modality) if sop_class else modality
        return f"not a scan ({name})", "", []
    if not sop_class:
        return "image without SOPClassUID (not a valid DICOM image object)", "", []
    decision, regions = burned_in_decision(ds, config)
    if decision == "quarantine":
        return "possible burned-in PHI", "", []
    return "", decision, regions


_DETECTOR_RULE = "burned-in text (detector)"
_DEVICE_RULE = "burned-in text (device regions)"


def _blank(ds: Dataset, decision: str, regions: list[Region], config: IngestConfig) -> tuple[str, list[Region]]:
    """Blank burned-in text in ``ds`` (every frame, in place) as ``decision`` says.

    Returns ``(quarantine reason or "", regions blanked)``. The pixels are rewritten uncompressed
    (colour as RGB) only when a region was blanked; an image without text keeps its bytes.
    """
    if decision not in ("blank", "detect"):
        return "", []
    pixels = ds.pixel_array  # colour comes back as RGB, whatever the stored photometric interpretation
    colour = int(element_value(ds, "SamplesPerPixel", 1) or 1) > 1
    photometric = "RGB" if colour else str(element_value(ds, "PhotometricInterpretation", "") or "").strip().upper()
    frames = int(element_value(ds, "NumberOfFrames", 1) or 1)
    if decision == "detect":
        try:
            scan = find_text_regions(pixels, photometric, frames, config.burned_in.margin)
        except Exception as exc:  # a missing or broken detector must not read as a decoding problem
            return f"possible burned-in PHI (the text detector failed: {type(exc).__name__})", []
        if scan.unsure:
            return "possible burned-in PHI (text covers more than half of the image)", []
        regions = scan.regions
        flag = str(element_value(ds, "BurnedInAnnotation", "") or "").strip().upper()
        if not regions and flag == "YES":
            return "possible burned-in PHI (BurnedInAnnotation=YES, but the text detector found no text)", []
    if not regions:
        return "", []
    cleaned = blank_regions(pixels, regions, photometric, frames)
    ds.PixelData = cleaned.tobytes()
    element = ds["PixelData"]
    element.VR = "OW" if cleaned.dtype.itemsize > 1 else "OB"
    element.is_undefined_length = False  # no longer encapsulated
    if colour:
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return "", regions


def _dicom(task: SeriesTask, contents: list[bytes], key: bytes, config: IngestConfig, result: SeriesResult) -> None:
    profile = profile_for(config)
    patient = task.subject_key.split("\x00", 1)[-1]
    ctx = DeidContext(
        profile=profile,
        key=key,
        subject_id=result.subject_id,
        date_offset=date_offset_days(key, patient) if config.deid.modified_dates else None,
        safe_private=tuple(config.deid.safe_private),
    )
    datasets: dict[int, Dataset] = {}
    blanked: dict[int, tuple[str, list[Region]]] = {}  # file index -> (rule, regions blanked)
    to_clean: dict[int, tuple[str, list[Region]]] = {}  # file index -> (burned-in decision, device regions)
    frames: dict[int, list[Frame]] = {}
    for index, (file, content) in enumerate(zip(task.files, contents)):
        if not content:
            result.quarantined.append((file, "unreadable file (empty, permission or I/O error)"))
            continue
        try:
            ds = _read(content)
        except Exception as exc:
            _reraise_environment(exc, "decoding a series")
            result.quarantined.append((file, f"unreadable DICOM (truncated or corrupt; {type(exc).__name__})"))
            continue
        raw_elements = dict(ds._dict)
        try:
            reason, decision, regions = _screen(ds, config)
        except Exception as exc:
            _reraise_environment(exc, "decoding a series")
            reason, decision, regions = f"unreadable DICOM header ({type(exc).__name__})", "", []
        if reason:
            result.quarantined.append((file, reason))
            continue
        try:
            # Decode and place the image first: a file or series the volume cannot use is
            # quarantined before the (slow) text detector ever looks at it.
            frames[index] = frames_of(luminance_view(ds), index)
        except SeriesProblem as exc:
            result.quarantined.append((file, str(exc)))
            continue
        except Exception as exc:
            _reraise_environment(exc, "decoding a series")
            result.quarantined.append((file, f"undecodable pixel data ({_ts_name(ds)}; {type(exc).__name__})"))
            continue
        ds._pixel_array = None  # the decoded copy is no longer needed: keep one series in memory, not two
        # Reading attributes converted some raw elements; put the raw ones back (values unchanged)
        # so that the writer copies their bytes instead of re-encoding them. Blanking, later,
        # replaces the pixel elements it rewrites.
        for tag, raw in raw_elements.items():
            if tag in ds._dict:
                ds._dict[tag] = raw
        contents[index] = b""
        datasets[index] = ds
        if decision in ("blank", "detect"):
            to_clean[index] = (decision, regions)
    if not datasets:
        return
    volume = _series_volume(task, frames, datasets, result)
    if volume is None:
        return
    if to_clean:
        dropped = False
        for index, (decision, regions) in sorted(to_clean.items()):
            ds = datasets[index]
            try:
                reason, regions = _blank(ds, decision, regions, config)
                if not reason and regions:
                    frames[index] = frames_of(luminance_view(ds), index)
            except Exception as exc:
                _reraise_environment(exc, "decoding a series")
                reason = f"undecodable pixel data ({_ts_name(ds)}; {type(exc).__name__})"
            ds._pixel_array = None
            if reason:
                result.quarantined.append((task.files[index], reason))
                del datasets[index], frames[index]
                dropped = True
            elif regions:
                blanked[index] = (_DETECTOR_RULE if decision == "detect" else _DEVICE_RULE, regions)
        if not datasets:
            return
        if blanked or dropped:  # the volume holds the blanked pixels, and only the files kept
            volume = _series_volume(task, frames, datasets, result)
            if volume is None:
                return
    problem = image_problem(volume.data)
    if problem is not None:
        result.quarantined.extend((task.files[index], problem) for index in sorted(datasets))
        return
    order = list(dict.fromkeys(volume.order))  # files in z order (a multi-frame file appears once)
    out = Path(task.out)
    modality = str(datasets[order[0]].get("Modality", "") or "").strip().upper()
    if config.write_dicom:
        folder = out / "dicom" / result.subject_id / result.sample_id
        folder.mkdir(parents=True, exist_ok=True)
        identity = _identity_elements(ctx, result, profile, blanked=False)
        identity_blanked = _identity_elements(ctx, result, profile, blanked=True) if blanked else identity
        written: set[str] = set()
        shared = SharedElements(identity, identity_blanked)  # the identity sequences, encoded once
        for position, index in enumerate(order, start=1):
            ds = datasets[index]
            anonymize(ds, ctx)
            ds._dict.update(identity_blanked if index in blanked else identity)
            rel = f"dicom/{result.subject_id}/{result.sample_id}/{position:04d}.dcm"
            result.structure.extend(
                (rel, where, kind) for where, kind in structure_problems(ds, profile)
            )
            result.outputs[rel] = _write_dicom(ds, out / rel, result.tokens, shared)
            written.add(Path(rel).name)
            datasets[index] = None  # type: ignore[assignment]  # free memory as we go
        ctx.audit[("", 0x00100020, "D", "pseudonym")] += len(order)
        ctx.audit[("", 0x00100010, "D", "pseudonym")] += len(order)
        _remove_stale(folder, written)
    else:
        for index in order:
            anonymize(datasets[index], ctx)
    for index in sorted(set(datasets) - set(order)):  # never reached: every decoded file is in the volume
        result.quarantined.append((task.files[index], "slice not used in the volume"))
    rel = f"images/{result.subject_id}/{result.sample_id}.nii.gz"
    write_nifti(out / rel, volume.data, volume.affine, descrip="")
    result.outputs[rel] = sha256_file(out / rel)
    result.used = [task.files[index] for index in order]
    result.identifiers = dict(ctx.identifiers)
    result.kept_text = ctx.kept_text
    result.audit = _audit_rows(ctx.audit) + _region_rows(order, blanked)
    result.row = _row(result, rel, "dicom", modality, volume.data, volume.spacing, volume.geometry, len(order))


def _series_volume(
    task: SeriesTask, frames: dict[int, list[Frame]], datasets: dict[int, Dataset], result: SeriesResult
) -> Volume | None:
    """The series' volume from its files' frames in z order; None (every file quarantined) if they do not form one."""
    try:
        return build_volume([frame for index in sorted(frames) for frame in frames[index]])
    except SeriesProblem as exc:
        for index in sorted(datasets):
            result.quarantined.append((task.files[index], f"inconsistent series: {exc}"))
        return None


def _identity_elements(ctx: DeidContext, result: SeriesResult, profile: Profile, blanked: bool) -> dict[int, DataElement]:
    """Top-level attributes every anonymized file of the series carries (PS3.15 E.1.1, CID 7050)."""
    codes = list(profile.codes)
    methods = [f"{_TOOL}: PS3.15 E.1-1 {TABLE_EDITION} basic profile"]
    methods += [f"{_TOOL}: option {name}" for name in profile.options]
    if blanked:
        codes.append(CID7050["clean_pixel_data"])
        methods.append(f"{_TOOL}: option clean_pixel_data")
    items = []
    for code, meaning in codes:
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    values = [
        (0x00100010, "PN", result.subject_id),
        (0x00100020, "LO", result.subject_id),
        (0x00120062, "CS", "YES"),
        (0x00120063, "LO", methods),
        (0x00120064, "SQ", Sequence(items)),
        (0x00280303, "CS", "MODIFIED" if ctx.date_offset is not None else "REMOVED"),
    ]
    if blanked:
        values.append((0x00280301, "CS", "NO"))
    # Keys must be BaseTag: they go straight into Dataset._dict.
    return {BaseTag(tag): DataElement(tag, vr, value) for tag, vr, value in values}


def structure_problems(ds: Dataset, profile: Profile) -> list[tuple[str, str]]:
    """(place, kind) of what must not be in an anonymized file; same rules as the audit's."""
    from pipeline.ingest.audit import structure_findings

    return [(finding.where, finding.kind) for finding in structure_findings(ds, "", profile)]


def _write_dicom(ds: Dataset, target: Path, tokens: set[bytes], shared: SharedElements) -> str:
    """Write ``ds`` as a valid DICOM file (new file meta); returns the file's sha256.

    The search tokens of the written header go into ``tokens``: the leak audit checks them
    against every identifier of the run without reading the file again.
    """
    old_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    source_ts = old_meta.get("TransferSyntaxUID")
    transfer_syntax = UID(str(source_ts)) if source_ts else ExplicitVRLittleEndian
    big_endian = ds.original_encoding[1] is False if ds.original_encoding else False
    if (
        not transfer_syntax.is_transfer_syntax
        or transfer_syntax.is_deflated
        or not transfer_syntax.is_little_endian
        or transfer_syntax.is_private
        or big_endian
    ):
        transfer_syntax = ExplicitVRLittleEndian
    if big_endian:
        _to_little_endian(ds)
    data = encode_file(ds, transfer_syntax, shared)
    tokens |= header_tokens(data)
    # Atomic: a temp file beside the target, then rename (cheaper than mkstemp per slice).
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a disk-full write must not leave a partial file behind
        raise
    return hashlib.sha256(data).hexdigest()


def _to_little_endian(ds: Dataset) -> None:
    """Byte-swap the binary values of a big-endian dataset (pydicom converts the rest on write)."""
    for elem in ds.iterall():
        width = _SWAP_WIDTH.get(str(elem.VR))
        if width and isinstance(elem.value, (bytes, bytearray)) and len(elem.value) % width == 0:
            elem.value = np.frombuffer(elem.value, dtype=f">u{width}").astype(f"<u{width}").tobytes()


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Remove files of an earlier run of this series that this run did not write."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and path.name not in keep:
            path.unlink()


def _audit_rows(counter: Counter) -> list[dict[str, object]]:
    """Audit-log rows: tag path, keyword, action, rule, element count (never a value)."""
    rows = []
    for (path, tag, action, rule), count in sorted(counter.items(), key=lambda item: (item[0][0], item[0][1], item[0][2], item[0][3])):
        if rule == "private":
            where, keyword = f"{path}({tag >> 16:04X},private)", ""
        else:
            where, keyword = path + tag_text(tag), keyword_for_tag(tag) or ""
        rows.append({"tag": where, "keyword": keyword, "action": action, "rule": rule, "count": count})
    return rows


def _region_rows(order: list[int], blanked: dict[int, tuple[str, list[Region]]]) -> list[dict[str, object]]:
    """Audit-log rows of blanked pixel regions: output image (z order), rectangle, rule; never the text."""
    rows: list[dict[str, object]] = []
    for position, index in enumerate(order, start=1):
        rule, regions = blanked.get(index, ("", []))
        for x0, y0, x1, y1 in regions:
            rows.append(
                {"tag": "(7FE0,0010)", "keyword": "PixelData", "action": "blank", "rule": rule,
                 "image": f"{position:04d}", "region": [x0, y0, x1, y1], "count": 1}
            )
    return rows


def _row(
    result: SeriesResult,
    rel: str,
    source_format: str,
    modality: str,
    data: np.ndarray,
    spacing: tuple[float, ...],
    geometry: str,
    n_dicom: int,
) -> dict[str, str]:
    return {
        "sample_id": result.sample_id,
        "subject_id": result.subject_id,
        "label": result.label,
        "path": rel,
        "origin": "real",
        "sha256": result.outputs[rel],
        "modality": modality,
        "source_format": source_format,
        "shape": "x".join(str(int(size)) for size in data.shape),
        "spacing": "x".join(f"{float(value):.6g}" for value in spacing),
        "dtype": str(data.dtype),
        "geometry": geometry,
        "dicom_files": str(n_dicom),
        # 2: one plane (a radiograph, a single-frame image): it can only train a 2D model.
        "spatial_dims": "2" if data.ndim < 3 or data.shape[2] == 1 else "3",
    }
