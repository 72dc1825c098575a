"""Assemble a DICOM series into one volume in modality units with a NIfTI (RAS) affine.

Conventions: the array is indexed ``[x, y, z]`` = (DICOM column, DICOM row, slice). The DICOM
patient frame is LPS; NIfTI (nibabel, MONAI) expects RAS, so the affine built in LPS is
premultiplied by ``diag(-1, -1, 1, 1)``. Slices are sorted along the slice normal
(row direction × column direction), never by InstanceNumber or file name.

Every inconsistency raises :class:`SeriesProblem` with a reason fit for ``quarantine.csv``:
the message names attributes and counts, never a header value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from pipeline.ingest.dicomio import element_value, fast_pixels

__all__ = ["SeriesProblem", "Frame", "Volume", "frames_of", "build_volume", "image_problem", "LPS_TO_RAS", "MIN_SIDE", "MAX_ABS_VALUE"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ORIENTATION_TOL = 1e-3
_SPACING_REL_TOL = 0.01
# The smallest in-plane side of an image ingest writes: below it no network, metric or reader can use it.
MIN_SIDE = 8
# Larger magnitudes come from a broken scaling (scl_slope 1e37, RescaleSlope overflow), never from a
# scanner; they would overflow the float32 sums (means, variances) every later stage computes.
MAX_ABS_VALUE = 1e12


class SeriesProblem(Exception):
    """A series cannot become a faithful volume; ``str(exc)`` is the quarantine reason."""


@dataclass
class Frame:
    """One 2D image (a slice file, or one frame of a multi-frame file) and its geometry."""

    pixels: np.ndarray  # rows x columns, in modality units (float64 or integer)
    position: np.ndarray | None  # ImagePositionPatient (LPS, mm) of the first transmitted pixel
    orientation: np.ndarray | None  # 6 direction cosines: row direction, column direction
    spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    thickness: float | None
    source: int  # index of the file in the series


@dataclass
class Volume:
    """A faithful volume: data ``[x, y, z]`` in modality units and its RAS affine."""

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    geometry: str  # "patient" (from DICOM geometry) or "assumed" (2D image without geometry)
    order: list[int]  # source file index of each slice, in z order


def _floats(value: object, count: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        numbers = np.asarray([float(item) for item in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if numbers.shape == (count,) and np.all(np.isfinite(numbers)) else None


def _first(ds: Dataset | None, *names: str) -> object:
    if ds is None:
        return None
    for name in names:
        value = ds.get(name)
        if value is not None and value != "":
            return value
    return None


def _group_item(item: Dataset | None, sequence: str) -> Dataset | None:
    if item is None:
        return None
    seq = item.get(sequence)
    return seq[0] if seq else None


def _rescale(pixels: np.ndarray, slope: object, intercept: object) -> np.ndarray:
    """Stored values to modality units; integers stay integers (narrowest faithful type)."""
    slope_f = float(slope) if slope not in (None, "") else 1.0
    intercept_f = float(intercept) if intercept not in (None, "") else 0.0
    if slope_f == 1.0 and intercept_f == 0.0:
        return pixels
    if slope_f == 1.0 and intercept_f.is_integer() and np.issubdtype(pixels.dtype, np.integer):
        shifted = pixels.astype(np.int32) + int(intercept_f)
        if shifted.size and np.iinfo(np.int16).min <= shifted.min() and shifted.max() <= np.iinfo(np.int16).max:
            return shifted.astype(np.int16)
        return shifted
    return pixels.astype(np.float64) * slope_f + intercept_f


def _modality_units(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        values = apply_modality_lut(pixels, ds)
    else:
        values = _rescale(pixels, element_value(ds, "RescaleSlope"), element_value(ds, "RescaleIntercept"))
    return _as_monochrome2(values, ds)


def _as_monochrome2(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """MONOCHROME1 values mirrored within the stored range, so bright means the same in every image.

    CR and some DX files store MONOCHROME1 (the lowest value displays white). A cohort mixing
    MONOCHROME1 and MONOCHROME2 images would otherwise show the model both contrasts.
    """
    photometric = str(element_value(ds, "PhotometricInterpretation", "") or "").strip().upper()
    if photometric != "MONOCHROME1":
        return values
    bits = int(element_value(ds, "BitsStored", 0) or element_value(ds, "BitsAllocated", 16) or 16)
    signed = int(element_value(ds, "PixelRepresentation", 0) or 0) == 1
    stored = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1], dtype=np.int64)
    if "ModalityLUTSequence" in ds:  # a LUT maps the stored range onto its own output range
        low, high = float(np.min(values)), float(np.max(values))
    else:
        ends = _rescale(stored, element_value(ds, "RescaleSlope"), element_value(ds, "RescaleIntercept"))
        low, high = float(np.min(ends)), float(np.max(ends))
    if np.issubdtype(values.dtype, np.integer) and low.is_integer() and high.is_integer():
        return (int(low + high) - values.astype(np.int64)).astype(np.int32)
    return (low + high) - values.astype(np.float64)


def frames_of(ds: Dataset, source: int) -> list[Frame]:
    """Decode a dataset's pixels (modality units) and attach each frame's geometry.

    Handles single-frame images, enhanced multi-frame images (per-frame functional groups) and
    classic multi-frame images with a frame-offset vector or a spacing between slices.

    Raises:
        SeriesProblem: colour images, missing geometry for a multi-frame image.
        Exception: whatever the pixel decoder raises for undecodable data (caller quarantines).
    """
    if int(element_value(ds, "SamplesPerPixel", 1) or 1) != 1:
        raise SeriesProblem("colour image (SamplesPerPixel > 1): not supported by the grayscale pipeline")
    pixels = fast_pixels(ds)
    if pixels is None:
        pixels = ds.pixel_array
    n_frames = int(element_value(ds, "NumberOfFrames", 1) or 1)
    if n_frames == 1 and pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.ndim != 3 or pixels.shape[0] != n_frames:
        raise SeriesProblem("pixel data does not match NumberOfFrames/Rows/Columns")
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else None  # type: ignore[index]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    frames: list[Frame] = []
    if per_frame is not None and len(per_frame) == n_frames:
        for index, item in enumerate(per_frame):
            position = _floats(_first(_group_item(item, "PlanePositionSequence"), "ImagePositionPatient"), 3)
            orientation = _floats(
                _first(_group_item(item, "PlaneOrientationSequence"), "ImageOrientationPatient")
                or _first(_group_item(shared_item, "PlaneOrientationSequence"), "ImageOrientationPatient"),
                6,
            )
            measures = _group_item(item, "PixelMeasuresSequence") or _group_item(shared_item, "PixelMeasuresSequence")
            spacing = _floats(_first(measures, "PixelSpacing"), 2)
            thickness = _first(measures, "SliceThickness")
            transform = _group_item(item, "PixelValueTransformationSequence") or _group_item(
                shared_item, "PixelValueTransformationSequence"
            )
            if transform is not None:
                values = _rescale(pixels[index], transform.get("RescaleSlope"), transform.get("RescaleIntercept"))
                values = _as_monochrome2(values, ds)
            else:
                values = _modality_units(pixels[index], ds)
            frames.append(
                Frame(
                    pixels=values,
                    position=position,
                    orientation=orientation,
                    spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
                    thickness=float(thickness) if thickness not in (None, "") else None,  # type: ignore[arg-type]
                    source=source,
                )
            )
        return frames
    position = _floats(element_value(ds, "ImagePositionPatient"), 3)
    orientation = _floats(element_value(ds, "ImageOrientationPatient"), 6)
    spacing = _floats(element_value(ds, "PixelSpacing") or element_value(ds, "ImagerPixelSpacing"), 2)
    thickness = element_value(ds, "SliceThickness")
    thickness_f = float(thickness) if thickness not in (None, "") else None
    values = _modality_units(pixels, ds)
    if n_frames == 1:
        return [Frame(values[0], position, orientation, _pair(spacing), thickness_f, source)]
    offsets = _floats(element_value(ds, "GridFrameOffsetVector"), n_frames)
    step = element_value(ds, "SpacingBetweenSlices")
    if position is None or orientation is None or (offsets is None and step in (None, "")):
        raise SeriesProblem("multi-frame image without per-frame positions (cine or projection frames)")
    normal = np.cross(orientation[:3], orientation[3:])
    if offsets is None:
        offsets = np.arange(n_frames, dtype=np.float64) * float(step)  # type: ignore[arg-type]
    return [
        Frame(values[k], position + offsets[k] * normal, orientation, _pair(spacing), thickness_f, source)
        for k in range(n_frames)
    ]


def _pair(spacing: np.ndarray | None) -> tuple[float, float] | None:
    return (float(spacing[0]), float(spacing[1])) if spacing is not None else None


def build_volume(frames: list[Frame]) -> Volume:
    """Sort frames along the slice normal, check consistency and stack them with their affine.

    Raises:
        SeriesProblem: different sizes, orientations or pixel spacings; duplicate positions;
            uneven slice spacing (a missing slice); several slices without geometry.
    """
    if not frames:
        raise SeriesProblem("no decodable slice in the series")
    shapes = {frame.pixels.shape for frame in frames}
    if len(shapes) > 1:
        raise SeriesProblem(f"slices differ in size ({len(shapes)} different Rows x Columns)")
    if len(frames) == 1 and (frames[0].position is None or frames[0].orientation is None):
        return _assumed_geometry(frames[0])
    if any(frame.position is None or frame.orientation is None for frame in frames):
        raise SeriesProblem("slices without ImagePositionPatient/ImageOrientationPatient: cannot order them")
    orientation = frames[0].orientation
    assert orientation is not None
    for frame in frames[1:]:
        if np.max(np.abs(frame.orientation - orientation)) > _ORIENTATION_TOL:  # type: ignore[operator]
            raise SeriesProblem("slices differ in ImageOrientationPatient (several stacks in one series)")
    spacings = {frame.spacing for frame in frames}
    if len(spacings) > 1 and not _close_pairs(spacings):
        raise SeriesProblem("slices differ in PixelSpacing")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise SeriesProblem("ImageOrientationPatient is not made of two orthogonal unit vectors")
    along = np.array([float(np.dot(frame.position, normal)) for frame in frames])  # type: ignore[arg-type]
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    along = along[order]
    spacing_rc = frames[0].spacing or (1.0, 1.0)
    if len(frames) > 1:
        gaps = np.diff(along)
        if np.min(gaps) <= 1e-3:
            raise SeriesProblem("two or more slices share one position (duplicates or several time points)")
        median = float(np.median(gaps))
        if np.max(np.abs(gaps - median)) > max(_SPACING_REL_TOL * median, 1e-3):
            raise SeriesProblem("uneven slice spacing (a missing or extra slice)")
        step = (frames[-1].position - frames[0].position) / (len(frames) - 1)  # type: ignore[operator]
        dz = float(np.linalg.norm(step))
    else:
        dz = frames[0].thickness or 1.0
        step = normal * dz
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing_rc[1]  # x: along a row, i.e. increasing column index
    lps[:3, 1] = col_dir * spacing_rc[0]  # y: down a column, i.e. increasing row index
    lps[:3, 2] = step
    lps[:3, 3] = frames[0].position  # type: ignore[assignment]
    data = _stack(frames)
    return Volume(
        data=data,
        affine=LPS_TO_RAS @ lps,
        spacing=(spacing_rc[1], spacing_rc[0], dz),
        geometry="patient",
        order=[frame.source for frame in frames],
    )


def _close_pairs(spacings: set[tuple[float, float] | None]) -> bool:
    if None in spacings:
        return False
    values = np.asarray(sorted(spacings))  # type: ignore[arg-type]
    return bool(np.all(np.abs(values - values[0]) <= 1e-4 * np.maximum(1.0, np.abs(values[0]))))


def _assumed_geometry(frame: Frame) -> Volume:
    """A 2D image without patient geometry (e.g. CR/DX): identity orientation, its pixel spacing."""
    spacing_rc = frame.spacing or (1.0, 1.0)
    thickness = frame.thickness or 1.0
    lps = np.diag([spacing_rc[1], spacing_rc[0], thickness, 1.0])
    return Volume(
        data=_stack([frame]),
        affine=LPS_TO_RAS @ lps,
        spacing=(spacing_rc[1], spacing_rc[0], thickness),
        geometry="assumed",
        order=[frame.source],
    )


def _stack(frames: list[Frame]) -> np.ndarray:
    """Stack rows x columns frames into ``[x, y, z]`` with the narrowest faithful dtype."""
    stacked = np.stack([frame.pixels for frame in frames], axis=-1)  # rows, columns, z
    stacked = np.transpose(stacked, (1, 0, 2))  # columns (x), rows (y), z
    if np.issubdtype(stacked.dtype, np.floating):
        rounded = np.round(stacked)
        if np.all(np.isfinite(stacked)) and np.array_equal(rounded, stacked):
            stacked = rounded
            low, high = float(stacked.min()), float(stacked.max())
            for dtype in (np.int16, np.int32):
                info = np.iinfo(dtype)
                if info.min <= low and high <= info.max:
                    return np.ascontiguousarray(stacked.astype(dtype))
        return np.ascontiguousarray(stacked.astype(np.float32))
    if stacked.dtype in (np.uint8, np.int8, np.int16):
        return np.ascontiguousarray(stacked)
    low, high = int(stacked.min()), int(stacked.max())
    for dtype in (np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.ascontiguousarray(stacked.astype(dtype))
    return np.ascontiguousarray(stacked.astype(np.float64))


def image_problem(data: np.ndarray) -> str | None:
    """Why ``data`` (``[x, y]`` or ``[x, y, z]``) is not a usable image, or None when it is.

    Checked before ingest writes an image, so that no later stage meets an image it cannot read:
    2D or 3D with at least two sides of :data:`MIN_SIDE` voxels (a single-frame 2D image is an
    image; a 4D series, a line or a point is not), finite voxels, and magnitudes below
    :data:`MAX_ABS_VALUE`. The reason names shapes and kinds of problem, never a value.
    """
    if data.ndim not in (2, 3):
        kind = "a 4D or higher image (time series or channels)" if data.ndim > 3 else "a 1D array, not an image"
        return f"unusable image: {kind}, {data.ndim} dimensions; ingest writes 2D and 3D images"
    if data.size == 0 or sum(int(side) >= MIN_SIDE for side in data.shape) < 2:
        shape = "x".join(str(int(side)) for side in data.shape)
        return f"unusable image: too small ({shape} voxels; at least {MIN_SIDE}x{MIN_SIDE} in-plane)"
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        return f"unusable image: voxels of type {data.dtype.name}, not numbers"
    if np.issubdtype(data.dtype, np.inexact):
        finite = np.isfinite(data)
        if not finite.all():
            share = "every voxel is" if not finite.any() else "some voxels are"
            return f"unusable image: {share} NaN or infinite (broken data or intensity scaling)"
    if data.dtype != np.bool_ and float(np.max(np.abs(data))) > MAX_ABS_VALUE:
        return f"unusable image: voxel magnitudes above {MAX_ABS_VALUE:g} (broken intensity scaling)"
    return None
