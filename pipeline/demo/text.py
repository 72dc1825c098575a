"""Burned-in text painted into pixels: the phantom cohort's burned-in subject and the OCR test set.

Devices burn names, IDs and dates into the pixels of ultrasound frames, secondary captures and screen
saves, in their own fonts, sizes and grey levels, usually in a corner. :func:`paint_text` renders one
line of text into any 2D (grayscale) or 3D (``rows x columns x 3`` colour) array, in one of
:data:`FONTS` (OpenCV's Hershey stroke fonts and the DejaVu/STIX/Computer Modern TrueType fonts that
ship inside matplotlib, so nothing depends on the fonts of the machine), and returns a
:class:`TextBox`: where the ink is, pixel by pixel, so a test can check that every glyph pixel was
blanked. :func:`text_test_set` draws the benchmark's images; :func:`burn_in_identity` is what the
cohort uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "FONTS",
    "LEGIBLE_CAP_HEIGHT",
    "TextBox",
    "TextImage",
    "paint_text",
    "burn_in_identity",
    "text_test_set",
    "text_free_test_set",
]

# Hershey stroke fonts (OpenCV) and TrueType fonts (files inside matplotlib's package data).
_HERSHEY = {
    "hershey-simplex": cv2.FONT_HERSHEY_SIMPLEX,
    "hershey-plain": cv2.FONT_HERSHEY_PLAIN,
    "hershey-duplex": cv2.FONT_HERSHEY_DUPLEX,
    "hershey-complex": cv2.FONT_HERSHEY_COMPLEX,
    "hershey-triplex": cv2.FONT_HERSHEY_TRIPLEX,
    "hershey-complex-small": cv2.FONT_HERSHEY_COMPLEX_SMALL,
    "hershey-simplex-italic": cv2.FONT_HERSHEY_SIMPLEX | cv2.FONT_ITALIC,
}
_TRUETYPE = {
    "dejavu-sans": "DejaVuSans.ttf",
    "dejavu-sans-bold": "DejaVuSans-Bold.ttf",
    "dejavu-sans-mono": "DejaVuSansMono.ttf",
    "dejavu-serif": "DejaVuSerif.ttf",
    "dejavu-serif-italic": "DejaVuSerif-Italic.ttf",
    "stix": "STIXGeneral.ttf",
    "cm-typewriter": "cmtt10.ttf",
}
FONTS: tuple[str, ...] = (*_HERSHEY, *_TRUETYPE)
# A pixel counts as ink when the glyph covers at least this share of it (anti-aliased edges below
# that are a fraction of the text contrast, not a readable stroke).
_INK = 0.5
# The smallest cap height at which every letter and digit has a shape of its own: the 5 x 7 dot
# matrix, the smallest classic font of device displays, draws capitals 7 px tall. The test set also
# paints 6 px lines (4-5 px of ink in the stroke fonts), which a reader recognises as text but
# cannot read letter by letter; they are drawn and reported, and held to a lower bar.
LEGIBLE_CAP_HEIGHT = 7


@dataclass(frozen=True)
class TextBox:
    """One painted line: its ink bounding box ``[x0, y0, x1, y1)`` and its ink mask inside the box."""

    x0: int
    y0: int
    x1: int
    y1: int
    ink: np.ndarray  # bool, (y1 - y0) x (x1 - x0)
    font: str
    height: int  # requested cap height in pixels
    contrast: float  # |text - background| as a share of the image's value range

    @property
    def legible(self) -> bool:
        """True when the line is drawn at a readable size (:data:`LEGIBLE_CAP_HEIGHT` or more)."""
        return self.height >= LEGIBLE_CAP_HEIGHT

    def covered(self, blanked: np.ndarray) -> bool:
        """True when every ink pixel lies inside ``blanked`` (a bool mask of the whole image)."""
        return bool(np.all(blanked[self.y0 : self.y1, self.x0 : self.x1][self.ink]))


@dataclass
class TextImage:
    """An image of the test set: pixels (stored values), photometric interpretation and its text boxes."""

    pixels: np.ndarray  # rows x columns (grayscale) or rows x columns x 3 (RGB), integer
    photometric: str  # MONOCHROME1, MONOCHROME2 or RGB
    boxes: list[TextBox]
    kind: str  # what it imitates, for the benchmark's table


@lru_cache(maxsize=None)
def _font_file(name: str) -> str:
    import matplotlib  # only for the path of the TrueType files it ships

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / _TRUETYPE[name])


def _coverage(text: str, font: str, height: int) -> np.ndarray:
    """Anti-aliased glyph coverage in [0, 1] of one line, cropped to its ink."""
    if font in _HERSHEY:
        face = _HERSHEY[font]
        (_, unit_h), _ = cv2.getTextSize("H", face, 1.0, 1)
        scale = height / max(unit_h, 1)
        thickness = max(1, round(height / 12))
        (width, text_h), baseline = cv2.getTextSize(text, face, scale, thickness)
        pad = thickness + 2
        canvas = np.zeros((text_h + baseline + 2 * pad, width + 2 * pad), np.uint8)
        cv2.putText(canvas, text, (pad, pad + text_h), face, scale, 255, thickness, cv2.LINE_AA)
    elif font in _TRUETYPE:
        from PIL import Image, ImageDraw, ImageFont

        # Cap height is ~0.73 of the em size in these faces.
        face = ImageFont.truetype(_font_file(font), size=max(4, round(height / 0.73)))
        left, top, right, bottom = face.getbbox(text)
        image = Image.new("L", (right - left + 4, bottom - top + 4), 0)
        ImageDraw.Draw(image).text((2 - left, 2 - top), text, fill=255, font=face)
        canvas = np.asarray(image)
    else:
        raise ValueError(f"font {font!r} is not one of {', '.join(FONTS)}")
    alpha = canvas.astype(np.float32) / 255.0
    rows, cols = np.nonzero(alpha >= _INK)
    if rows.size == 0:
        raise ValueError(f"text at {height} px in {font} leaves no ink")
    return alpha[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def paint_text(
    pixels: np.ndarray,
    text: str,
    x: int,
    y: int,
    font: str,
    height: int,
    value: float | tuple[float, float, float],
    contrast: float = 1.0,
) -> TextBox:
    """Paint ``text`` into ``pixels`` in place with its top-left ink corner at column ``x``, row ``y``.

    Args:
        pixels: rows x columns (grayscale) or rows x columns x 3 (colour), any integer type.
        text: the line to paint.
        x: first column of the ink.
        y: first row of the ink.
        font: one of :data:`FONTS`.
        height: cap height in pixels.
        value: the text's stored value (grey level, or an RGB triple).
        contrast: recorded in the box for the benchmark's tables (the caller chose ``value``).

    Returns:
        The :class:`TextBox` of the painted ink.

    Raises:
        ValueError: unknown font, or text that does not fit inside the image at ``(x, y)``.
    """
    alpha = _coverage(text, font, height)
    h, w = alpha.shape
    if x < 0 or y < 0 or y + h > pixels.shape[0] or x + w > pixels.shape[1]:
        raise ValueError(f"a {w} x {h} px line does not fit at ({x}, {y}) in a {pixels.shape[1]} x {pixels.shape[0]} image")
    region = pixels[y : y + h, x : x + w].astype(np.float64)
    target = np.asarray(value, dtype=np.float64)
    weight = alpha[..., None] if region.ndim == 3 else alpha
    painted = region * (1.0 - weight) + target * weight
    info = np.iinfo(pixels.dtype) if np.issubdtype(pixels.dtype, np.integer) else None
    if info is not None:
        painted = np.clip(np.rint(painted), info.min, info.max)
    pixels[y : y + h, x : x + w] = painted.astype(pixels.dtype)
    return TextBox(x, y, x + w, y + h, alpha >= _INK, font, height, contrast)


def text_size(text: str, font: str, height: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of the ink of one line."""
    alpha = _coverage(text, font, height)
    return alpha.shape[1], alpha.shape[0]


def burn_in_identity(stored: np.ndarray, lines: list[str], slice_index: int, background: int, bright: int) -> list[TextBox]:
    """Burn identity lines into a phantom CT slice (stored values) as a scanner's overlay would.

    Each slice uses a different font, height, grey level and corner, so the cohort's burned-in
    subject covers the variety the OCR must handle: bright and dim text on air, text over the body.

    Args:
        stored: rows x columns stored values, modified in place.
        lines: the text (name, ID, dates): PHI, painted and never returned.
        slice_index: picks the font, size, grey level and corners of this slice.
        background: the stored value of air (the text contrast is measured against it).
        bright: the brightest stored value the scanner writes.

    Returns:
        One :class:`TextBox` per painted line.
    """
    rows, columns = stored.shape
    font = FONTS[slice_index % len(FONTS)]
    height = (7, 9, 11)[slice_index % 3]
    # Grey levels: full-scale, half and a tenth of the range above air (dim text a window hides).
    share = (1.0, 0.5, 0.1)[(slice_index // 3) % 3]
    value = int(background + share * (bright - background))
    boxes: list[TextBox] = []
    top, bottom = 2, rows - 2
    for number, text in enumerate(lines):
        width, h = text_size(text, font, height)
        while width > columns - 4 and len(text) > 4:  # a long name: the device truncates it
            text = text[:-1]
            width, h = text_size(text, font, height)
        right_side = (number + slice_index) % 2 == 1
        x = columns - 2 - width if right_side else 2
        if number % 2 == 0:
            y, top = top, top + h + 3
        else:
            y, bottom = bottom - h, bottom - h - 3
        boxes.append(paint_text(stored, text, max(x, 0), y, font, height, value, share))
    return boxes


def _background(rng: np.random.Generator, rows: int, columns: int, kind: str, high: int) -> np.ndarray:
    """A text-free image of the given kind in [0, high]: speckle fan, smooth anatomy, or a photo-like field."""
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float64)
    if kind == "ultrasound":
        cx, cy = columns / 2, -rows * 0.1
        radius = np.hypot(xx - cx, yy - cy)
        angle = np.arctan2(xx - cx, yy - cy)
        fan = (np.abs(angle) < 0.6) & (radius > rows * 0.2) & (radius < rows * 0.95)
        # Speckle has a grain of a few pixels (the resolution cell), not independent pixels.
        grain = cv2.GaussianBlur(rng.rayleigh(0.25, (rows, columns)), (0, 0), 1.2) * 1.6
        speckle = grain * (1.0 - radius / (rows * 1.2))
        image = np.where(fan, np.clip(speckle, 0, 1), 0.0)
    elif kind == "anatomy":
        image = np.zeros((rows, columns))
        for _ in range(6):
            cx, cy = rng.uniform(0.3, 0.7) * columns, rng.uniform(0.3, 0.7) * rows
            ax, ay = rng.uniform(0.1, 0.35) * columns, rng.uniform(0.1, 0.35) * rows
            image[((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1] = rng.uniform(0.2, 0.6)
        image = cv2.GaussianBlur(image, (0, 0), 2.0) + rng.normal(0, 0.02, (rows, columns))
    else:  # photo: smooth colour-like gradients
        image = 0.3 + 0.2 * np.sin(xx / columns * 3 + rng.uniform(0, 6)) * np.cos(yy / rows * 2 + rng.uniform(0, 6))
        image += cv2.GaussianBlur(rng.normal(0, 0.05, (rows, columns)), (0, 0), 3.0)
    return np.clip(image * high, 0, high)


_WORDS = ("DOE^JANE", "MRN 48213977", "DOB 1961-04-17", "ACC 552019843", "03/11/2022 14:22:07",
          "SMITH, JOHN A", "ID:0093318271", "St Mary Infirmary", "Dr. Kowalski", "19750923",
          "HARTLEY^MAUD^E", "2021.08.30", "PID 7730-1182", "Study 118832", "Mueller-Lindqvist K")


_SHAPES = ((128, 128), (256, 256), (480, 640), (768, 1024), (512, 512))


def text_test_set(seed: int = 0, images: int = 24, shapes: tuple[tuple[int, int], ...] = _SHAPES) -> list[TextImage]:
    """Images with planted text lines in varied fonts, sizes, contrasts, positions and pixel formats.

    Formats cycle through 8-bit MONOCHROME2, 16-bit MONOCHROME2 (12 bits stored), 16-bit
    MONOCHROME1 and 8-bit RGB; sizes from 128 x 128 to 1024 x 768; each image has 2-4 lines,
    cap heights 6-24 px, contrasts from full scale down to 0.15 of the range, never rotated.

    Args:
        seed: seed of every choice.
        images: number of images.
        shapes: ``(rows, columns)`` sizes to cycle through (a quick test uses only the small ones).

    Returns:
        The images, each with its :class:`TextBox` list.
    """
    rng = np.random.default_rng(seed)
    formats = ("MONOCHROME2-8", "MONOCHROME2-16", "MONOCHROME1-16", "RGB")
    kinds = ("ultrasound", "anatomy", "photo")
    out: list[TextImage] = []
    font_cycle = 0
    for index in range(images):
        rows, columns = shapes[index % len(shapes)]
        fmt = formats[index % len(formats)]
        kind = kinds[index % len(kinds)]
        high = 255 if fmt in ("MONOCHROME2-8", "RGB") else 4095
        base = _background(rng, rows, columns, kind, high)
        if fmt == "RGB":
            tint = rng.uniform(0.6, 1.0, 3)
            pixels = np.clip(base[..., None] * tint, 0, 255).astype(np.uint8)
        else:
            pixels = base.astype(np.uint8 if high == 255 else np.uint16)
        boxes: list[TextBox] = []
        taken = np.zeros((rows, columns), bool)
        for _ in range(int(rng.integers(2, 5))):
            font = FONTS[font_cycle % len(FONTS)]
            font_cycle += 1
            height = int(rng.choice((6, 7, 8, 10, 12, 16, 24))) if rows > 128 else int(rng.choice((6, 7, 8, 10)))
            text = str(rng.choice(_WORDS))
            width, h = text_size(text, font, height)
            while width > columns - 4:
                text = text[:-1]
                width, h = text_size(text, font, height)
            for _attempt in range(40):
                x = int(rng.integers(1, columns - width - 1))
                y = int(rng.integers(1, rows - h - 1))
                if not taken[max(0, y - 3) : y + h + 3, max(0, x - 3) : x + width + 3].any():
                    break
            else:
                continue
            contrast = float(rng.choice((1.0, 0.6, 0.3, 0.15)))
            local = pixels[y : y + h, x : x + width].astype(np.float64)
            under = float(np.median(local))
            up = under + contrast * high <= high or under - contrast * high < 0
            level = under + contrast * high if up else under - contrast * high
            if fmt == "RGB":
                colour = tuple(float(np.clip(level * c, 0, 255)) for c in rng.uniform(0.7, 1.0, 3))
                box = paint_text(pixels, text, x, y, font, height, colour, contrast)  # type: ignore[arg-type]
            else:
                box = paint_text(pixels, text, x, y, font, height, float(np.clip(level, 0, high)), contrast)
            taken[y : y + h, x : x + width] = True
            boxes.append(box)
        photometric = "RGB" if fmt == "RGB" else fmt.split("-")[0]
        if photometric == "MONOCHROME1":
            pixels = (high - pixels.astype(np.int64)).astype(pixels.dtype)  # stored inverted: same display
        out.append(TextImage(pixels, photometric, boxes, kind))
    return out


def text_free_test_set(seed: int = 1, images: int = 12) -> list[TextImage]:
    """Images of the same kinds and formats as :func:`text_test_set` without any text."""
    rng = np.random.default_rng(seed)
    out: list[TextImage] = []
    for index in range(images):
        rows, columns = ((256, 256), (480, 640), (512, 512))[index % 3]
        kind = ("ultrasound", "anatomy", "photo")[index % 3]
        high = 255 if index % 2 == 0 else 4095
        base = _background(rng, rows, columns, kind, high)
        out.append(TextImage(base.astype(np.uint8 if high == 255 else np.uint16), "MONOCHROME2", [], kind))
    return out
