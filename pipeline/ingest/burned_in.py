"""Burned-in text: find it with an offline text detector and blank it (PS3.15 E.3.1, Clean Pixel Data).

The detector is the text-detection network of RapidOCR (PP-OCR's DB detector run by onnxruntime);
its model files ship inside the ``rapidocr`` wheel and are opened by path (:func:`detector_model_path`,
:func:`recognizer_model_path`), so nothing is ever downloaded. A region is blanked because it holds
text, whatever the text says; the recognition network only decides whether a box too large to be a
line of text is text after all (a large heading) or a shape the detector mistook for one.

Each frame is looked at in several 8-bit views, because no single rendering shows every kind of
burned-in text (:data:`VIEWS`): a robust percentile stretch (dim text on a dark background), CLAHE
(text at a fraction of the local contrast) and a local-contrast view (thin text over speckle or a
textured photograph). The stretch view is enlarged up to three times and the others twice, so
that 6-7 px device fonts reach the detector's working size (:class:`DetectorSettings`). A cine
loop is looked at through four images rather than frame by frame (:func:`frames_to_scan`). The
union of the line-shaped boxes found in any frame and view, each grown to cover the whole ink, is blanked in
every frame.

The engines are created lazily, once per process (ingest workers are processes), and never for an
image that ingest does not select for screening, so text-free CT pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

__all__ = [
    "DetectorSettings",
    "DEFAULT_SETTINGS",
    "VIEWS",
    "Region",
    "TextScan",
    "detector_model_path",
    "recognizer_model_path",
    "render_views",
    "detect_text",
    "read_text_score",
    "frames_to_scan",
    "find_text_regions",
    "blank_regions",
    "blank_fill",
    "luminance_view",
]

Region = tuple[int, int, int, int]  # x0, y0, x1, y1 (column, row; end exclusive)
_DET_FILE = "PP-OCRv6_det_small.onnx"
_REC_FILE = "PP-OCRv6_rec_small.onnx"  # its character list is stored inside the ONNX file
VIEWS: tuple[str, ...] = ("stretch", "clahe", "local")


@dataclass(frozen=True)
class DetectorSettings:
    """Detector thresholds, the views it looks at and the working size of each.

    Attributes:
        pixel_threshold: DB probability above which a pixel is text.
        box_threshold: mean probability a candidate box needs to count as text.
        unclip_ratio: how far DB grows a text kernel back to the whole line (PP-OCR: 1.5-2.0).
        max_side: an enlarged view's longer side never exceeds this (time and memory); larger
            images are looked at as they are, or shrunk.
        wide_side: a view enlarged more than twice is enlarged only until its longer side reaches
            this (and at least twice): the extra enlargement helps small images, whose 6-8 px
            lines are small next to the detector's field of view, and the detector's time grows
            with the area.
        threads: onnxruntime threads per process (ingest parallelises over processes).
        max_line_height: a box taller than this share of the image's shorter side (and than 32 px)
            and not ``line_aspect`` times wider than tall is not a line of text but a blob: the
            detector also fires on large glyph-like shapes (an ultrasound fan, a vertebra).
        line_aspect: width / height from which a tall box is still a line (a large font).
        blob_text_score: a blob is blanked as text when the recognizer reads it with at least
            this confidence; otherwise it is a shape and is left as it is (the lines it may
            overlap are found in the other views).
        grow: each box is grown above and below by this share of its height (ascenders, descenders) ...
        grow_along: ... and left and right by this share of its height (about one glyph), so that the
            first and last glyphs of a dim line the detector drew too tight are covered.
        views: which of :data:`VIEWS` to look at, each with the factor it is enlarged by (within
            ``max_side``) so that 6-7 px device fonts reach the detector's working size: the
            stretch view, which finds most text, the most; the others, which find what it misses
            (dim text, thin text over speckle), less, because the detector's time grows with the area.
        all_frames_up_to: a multi-frame image with at most this many frames is looked at frame by
            frame; a longer one through its first frame and its temporal median, maximum and
            minimum (:func:`frames_to_scan`).
    """

    pixel_threshold: float = 0.2
    box_threshold: float = 0.3
    unclip_ratio: float = 1.8
    max_side: int = 2048
    wide_side: int = 1024
    threads: int = 1
    max_line_height: float = 0.2
    line_aspect: float = 2.5
    blob_text_score: float = 0.8
    grow: float = 0.35
    grow_along: float = 0.75
    views: tuple[tuple[str, float], ...] = (("stretch", 3.0), ("clahe", 2.0), ("local", 2.0))
    all_frames_up_to: int = 4


@dataclass
class TextScan:
    """What the detector found in one image.

    Attributes:
        regions: text boxes ``(x0, y0, x1, y1)``, grown and with the margin, to blank.
        unsure: blobs read as text that cover more than half the image: blanking them would leave
            nothing of the image, so it is quarantined instead.
        blobs: boxes too large to be a line that the recognizer did not read as text (left as they are).
    """

    regions: list[Region] = field(default_factory=list)
    unsure: int = 0
    blobs: int = 0


DEFAULT_SETTINGS = DetectorSettings()
_ENGINES: dict[tuple[str, DetectorSettings], Any] = {}


def _packaged_model(name: str) -> Path:
    import rapidocr

    path = Path(rapidocr.__file__).resolve().parent / "models" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: a text model is missing from the installed rapidocr package. "
            "Fix: reinstall medsynth's dependencies (pip install -e .), which pins a rapidocr that ships it."
        )
    return path


def detector_model_path() -> Path:
    """The detection model inside the installed ``rapidocr`` package (no download, ever).

    Raises:
        FileNotFoundError: the installed rapidocr does not ship the model file.
    """
    return _packaged_model(_DET_FILE)


def recognizer_model_path() -> Path:
    """The recognition model (with its character list) inside the installed ``rapidocr`` package.

    Raises:
        FileNotFoundError: the installed rapidocr does not ship the model file.
    """
    return _packaged_model(_REC_FILE)


def _engine(kind: str, settings: DetectorSettings) -> Any:
    """The process's detector (``kind="det"``) or recognizer (``"rec"``) for ``settings``."""
    engine = _ENGINES.get((kind, settings))
    if engine is None:
        from rapidocr import RapidOCR

        params: dict[str, Any] = {
            "Global.use_cls": False,
            "Global.use_det": kind == "det",
            "Global.use_rec": kind == "rec",
            "Global.log_level": "critical",
            # The caller scales the image; the engine must not resize it again.
            "Global.use_preprocess_img": False,
            "Global.use_vertical_padding": False,
            # Both paths are given, so the engine never looks for (or fetches) a default model.
            "Det.model_path": str(detector_model_path()),
            "Rec.model_path": str(recognizer_model_path()),
            "Det.limit_type": "max",
            "Det.limit_side_len": max(settings.max_side, 32),
            "Det.thresh": settings.pixel_threshold,
            "Det.box_thresh": settings.box_threshold,
            "Det.unclip_ratio": settings.unclip_ratio,
            "EngineConfig.onnxruntime.intra_op_num_threads": settings.threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        engine = RapidOCR(params=params)
        _ENGINES[(kind, settings)] = engine
    return engine


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _stretch(frame: np.ndarray, photometric: str) -> np.ndarray:
    """The frame as a viewer shows it: 8 bits, MONOCHROME1 inverted, 0.5-99.5th percentile stretched.

    The percentile stretch saturates the extremes instead of the text: in a deep image, text a few
    percent of the stored range above a dark background vanishes in a full-range stretch.
    """
    values = frame.astype(np.float32)
    if frame.ndim == 2 and photometric.strip().upper() == "MONOCHROME1":
        values = np.float32(values.max()) + np.float32(values.min()) - values
    if frame.ndim == 3 and frame.dtype == np.uint8:
        return np.ascontiguousarray(frame)
    low, high = (float(v) for v in np.percentile(values, (0.5, 99.5)))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return _to_uint8(values, low, high)


def render_views(frame: np.ndarray, photometric: str, views: tuple[str, ...] = VIEWS) -> list[np.ndarray]:
    """The 8-bit ``rows x columns x 3`` views of one frame the detector looks at (see :data:`VIEWS`).

    Args:
        frame: stored values of one frame, ``rows x columns`` or ``rows x columns x 3`` (RGB).
        photometric: PhotometricInterpretation of ``frame`` (colour: any, it is already RGB).
        views: which views to render.

    Returns:
        One image per view, in the order of ``views``.
    """
    import cv2

    base = _stretch(frame, photometric)
    gray = cv2.cvtColor(base, cv2.COLOR_RGB2GRAY) if base.ndim == 3 else base
    out: list[np.ndarray] = []
    for view in views:
        if view == "stretch":
            image = base
        elif view == "clahe":
            image = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8)).apply(gray)
        elif view == "local":
            # Distance from the local mean in local standard deviations, dark where it is large:
            # thin strokes over speckle or texture stand out whatever their absolute level. The
            # spread is at least 2 of 255 levels, so that compression noise of a level or two on a
            # flat field does not turn into strokes.
            values = gray.astype(np.float32)
            mean = cv2.GaussianBlur(values, (0, 0), 6)
            spread = np.sqrt(np.maximum(cv2.GaussianBlur((values - mean) ** 2, (0, 0), 6), 4.0))
            image = np.clip(255.0 - 60.0 * np.abs(values - mean) / spread, 0, 255).astype(np.uint8)
        else:
            raise ValueError(f"unknown detector view {view!r}; one of {', '.join(VIEWS)}")
        out.append(np.ascontiguousarray(image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)))
    return out


def detect_text(image: np.ndarray, settings: DetectorSettings = DEFAULT_SETTINGS, scale: float = 2.0) -> list[Region]:
    """Axis-aligned boxes of the text lines the detector finds in one 8-bit ``H x W x 3`` image
    enlarged ``scale`` times (less where that would pass ``settings.wide_side`` or ``max_side``)."""
    import cv2

    rows, columns = image.shape[:2]
    if scale > 2.0:
        scale = max(2.0, min(scale, settings.wide_side / max(rows, columns)))
    scale = min(scale, settings.max_side / max(rows, columns))  # huge images are shrunk to max_side
    work = image
    if scale != 1.0:
        size = (max(32, round(columns * scale)), max(32, round(rows * scale)))
        work = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
    result = _engine("det", settings)(work, use_det=True, use_cls=False, use_rec=False)
    boxes = getattr(result, "boxes", None)
    if boxes is None or len(boxes) == 0:
        return []
    sy, sx = work.shape[0] / rows, work.shape[1] / columns
    regions: list[Region] = []
    for quad in np.asarray(boxes, dtype=np.float64):
        x0, y0 = np.floor(quad.min(axis=0) / (sx, sy))
        x1, y1 = np.ceil(quad.max(axis=0) / (sx, sy))
        regions.append((int(max(0, x0)), int(max(0, y0)), int(min(columns, x1 + 1)), int(min(rows, y1 + 1))))
    return regions


def read_text_score(crop: np.ndarray, settings: DetectorSettings = DEFAULT_SETTINGS) -> float:
    """The recognizer's confidence that an 8-bit ``H x W x 3`` crop is a line of text (0: nothing read).

    Only letters and digits count: a shape is often read as a lone punctuation mark.
    """
    result = _engine("rec", settings)(np.ascontiguousarray(crop), use_det=False, use_cls=False, use_rec=True)
    texts = getattr(result, "txts", None) or ()
    scores = list(getattr(result, "scores", None) or ())
    best = 0.0
    for text, score in zip(texts, scores):
        if sum(ch.isalnum() for ch in str(text)) >= 2:
            best = max(best, float(score))
    return best


def _is_line(box: Region, tallest: float, settings: DetectorSettings) -> bool:
    width, height = box[2] - box[0], box[3] - box[1]
    return height <= tallest or width >= settings.line_aspect * height


def frames_to_scan(
    stack: np.ndarray, all_frames_up_to: int = DEFAULT_SETTINGS.all_frames_up_to
) -> list[np.ndarray]:
    """The images of a ``frames x rows x columns [x 3]`` stack that the detector looks at.

    A short stack: every frame. A cine loop (ultrasound, endoscopy video) can hold hundreds of
    frames and the detector costs about the same per frame, so a longer stack is looked at through
    four images: its first frame; its per-pixel temporal median (of up to 31 evenly spaced frames),
    where an overlay drawn at the same place in every frame stays sharp whatever moves beneath it;
    and its maximum and minimum, where a line drawn in only some frames (a running clock) shows,
    bright or dark, wherever the background under it holds still, as it does in the border where
    devices write. The risk left: text drawn in only a few frames over moving content.

    Args:
        stack: the frames.
        all_frames_up_to: a stack of at most this many frames is returned whole.
    """
    if len(stack) <= max(all_frames_up_to, 1):
        return list(stack)
    sample = stack[np.linspace(0, len(stack) - 1, num=min(len(stack), 31)).round().astype(int)]
    median = np.empty(stack.shape[1:], dtype=stack.dtype)
    for row in range(0, stack.shape[1], 64):  # row bands: np.median works in float64, a band at a time
        median[row : row + 64] = np.median(sample[:, row : row + 64], axis=0).astype(stack.dtype)
    return [stack[0], median, stack.max(axis=0), stack.min(axis=0)]


def find_text_regions(
    pixels: np.ndarray,
    photometric: str,
    frames: int,
    margin: int,
    settings: DetectorSettings = DEFAULT_SETTINGS,
) -> TextScan:
    """Every text region of an image (its frames as :func:`frames_to_scan` picks them, every view),
    grown to the ink and by ``margin`` pixels.

    Args:
        pixels: stored values as pydicom returns them (colour as RGB).
        photometric: PhotometricInterpretation of ``pixels``.
        frames: NumberOfFrames.
        margin: pixels added on every side of a (grown) box, clipped to the image.
        settings: detector settings.

    Returns:
        A :class:`TextScan`: distinct regions (sorted), blobs left alone, blobs too large to blank.
    """
    stack = pixels if frames > 1 else pixels[np.newaxis]
    rows, columns = int(stack.shape[1]), int(stack.shape[2])
    tallest = max(32.0, settings.max_line_height * min(rows, columns))
    found: set[Region] = set()
    blobs: dict[Region, np.ndarray] = {}
    for frame in frames_to_scan(stack, settings.all_frames_up_to):
        names = tuple(name for name, _ in settings.views)
        for image, (_, scale) in zip(render_views(frame, photometric, names), settings.views):
            for box in detect_text(image, settings, scale):
                if _is_line(box, tallest, settings):
                    found.add(box)
                else:
                    blobs.setdefault(box, image)
    unsure = shapes = 0
    for (x0, y0, x1, y1), image in blobs.items():
        if read_text_score(image[y0:y1, x0:x1], settings) >= settings.blob_text_score:
            if (x1 - x0) * (y1 - y0) > 0.5 * rows * columns:
                unsure += 1
            else:
                found.add((x0, y0, x1, y1))
        else:
            shapes += 1
    regions: set[Region] = set()
    for x0, y0, x1, y1 in found:
        across = margin + int(np.ceil(settings.grow * (y1 - y0)))
        along = margin + int(np.ceil(settings.grow_along * (y1 - y0)))
        regions.add((max(0, x0 - along), max(0, y0 - across), min(columns, x1 + along), min(rows, y1 + across)))
    return TextScan(sorted(regions), unsure, shapes)


def blank_fill(pixels: np.ndarray, photometric: str) -> Any:
    """The value a blanked region gets: black as displayed (the darkest stored value, or the
    brightest stored value for MONOCHROME1; zero for colour)."""
    if pixels.ndim >= 3 and photometric.strip().upper() not in ("MONOCHROME1", "MONOCHROME2") and pixels.shape[-1] == 3:
        return 0
    return pixels.max() if photometric.strip().upper() == "MONOCHROME1" else pixels.min()


def blank_regions(pixels: np.ndarray, regions: list[Region], photometric: str, frames: int) -> np.ndarray:
    """A copy of ``pixels`` with every region blanked in every frame (colour: every sample)."""
    out = pixels.copy()
    fill = blank_fill(pixels, photometric)
    colour = (pixels.ndim == 4) or (pixels.ndim == 3 and frames == 1)
    for x0, y0, x1, y1 in regions:
        if colour:
            out[..., y0:y1, x0:x1, :] = fill
        else:
            out[..., y0:y1, x0:x1] = fill
    return out


def luminance_view(ds: Dataset) -> Dataset:
    """``ds`` itself for a grayscale image; for a colour image, a grayscale copy for the volume.

    The dataset's NIfTI volume is grayscale, so a colour image (a secondary capture, an ultrasound
    frame) enters it as its luminance (ITU-R BT.601 Y); its DICOM output keeps the colour. The copy
    shares every element but the pixel description, so ``ds`` is untouched.
    """
    if int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        return ds
    rgb = ds.pixel_array.astype(np.float32)  # pydicom converts YBR to RGB
    weights = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    luma = np.rint(rgb @ weights)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    dtype = np.uint8 if bits <= 8 else np.uint16
    view = Dataset(dict(ds._dict))
    # Setting an attribute the copy shares with ds would change the shared element, and so ds:
    # the pixel description is dropped from the copy first and set anew.
    for keyword in ("SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "PixelData"):
        if keyword in view:
            del view[keyword]
    view.file_meta = FileMetaDataset()  # a new one: FileMetaDataset(ds.file_meta) would share its elements
    view.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    view.SamplesPerPixel = 1
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsAllocated = 8 if dtype == np.uint8 else 16
    view.BitsStored = view.BitsAllocated
    view.HighBit = view.BitsAllocated - 1
    view.PixelRepresentation = 0
    view.PixelData = np.clip(luma, 0, np.iinfo(dtype).max).astype(dtype).tobytes()
    view["PixelData"].VR = "OB" if dtype == np.uint8 else "OW"
    view["PixelData"].is_undefined_length = False
    return view
