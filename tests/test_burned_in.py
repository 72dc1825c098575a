"""Burned-in text: the offline detector finds it, ingest blanks it and keeps the image; text-free images
stay as they were and text-free CT never reaches the detector."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import REPO
from pipeline.demo.text import paint_text, text_free_test_set, text_test_set
from pipeline.ingest import run
from pipeline.ingest.burned_in import (
    blank_regions,
    detector_model_path,
    find_text_regions,
    frames_to_scan,
    luminance_view,
    recognizer_model_path,
)
from pipeline.ingest.config import IngestConfig

DEID_DATA = Path(__import__("deid_data").__file__).parent / "data"


def _mask(shape: tuple[int, ...], regions: list[tuple[int, int, int, int]]) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    for x0, y0, x1, y1 in regions:
        mask[y0:y1, x0:x1] = True
    return mask


def test_detector_ships_in_the_wheel_and_runs_without_network(tmp_path: Path) -> None:
    import rapidocr

    package = Path(rapidocr.__file__).resolve().parent
    for model in (detector_model_path(), recognizer_model_path()):
        assert model.is_relative_to(package) and model.stat().st_size > 1_000_000
    before = sorted(str(path.relative_to(package)) for path in package.rglob("*") if "__pycache__" not in path.parts)
    # Every way out to the network raises in the child: a download attempt would fail the detection.
    code = (
        "import socket\n"
        "def refuse(*args, **kwargs):\n"
        "    raise OSError('network disabled by the test')\n"
        "socket.socket.connect = socket.socket.connect_ex = refuse\n"
        "socket.create_connection = socket.getaddrinfo = refuse\n"
        "import numpy as np\n"
        "from pipeline.demo.text import paint_text\n"
        "from pipeline.ingest.burned_in import find_text_regions, read_text_score\n"
        "image = np.zeros((96, 160), np.uint8)\n"
        "box = paint_text(image, 'MRN 48213977', 6, 40, 'hershey-simplex', 10, 255)\n"
        "scan = find_text_regions(image, 'MONOCHROME2', 1, 2)\n"
        "mask = np.zeros(image.shape, bool)\n"
        "for x0, y0, x1, y1 in scan.regions:\n"
        "    mask[y0:y1, x0:x1] = True\n"
        "assert read_text_score(np.repeat(image[30:60, :, None], 3, axis=2)) > 0.5  # the recognizer runs too\n"
        "print('covered' if box.covered(mask) else f'missed {scan}')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("covered"), done.stdout
    after = sorted(str(path.relative_to(package)) for path in package.rglob("*") if "__pycache__" not in path.parts)
    assert after == before  # nothing was fetched into the package either
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.onnx"))


def _recall_one_by_one(images: list, strict: bool = True) -> tuple[int, int]:
    """``(boxes blanked, boxes planted)``; with ``strict`` every box must be blanked."""
    found = total = 0
    for image in images:
        scan = find_text_regions(image.pixels, image.photometric, 1, margin=2)
        blanked = blank_regions(image.pixels, scan.regions, image.photometric, 1)
        mask = _mask(image.pixels.shape, scan.regions)
        for box in image.boxes:
            total += 1
            found += box.covered(mask)
            assert box.covered(mask) or not strict, (image.kind, image.photometric, box.font, box.height, box.contrast)
        assert np.array_equal(blanked[~mask], image.pixels[~mask])  # nothing outside the regions changed
        assert scan.unsure == 0
    return found, total


_SMALL = ((128, 128), (256, 256))


def test_planted_text_in_small_images_is_blanked() -> None:
    """Three test images (not the tuning seed), one per pixel format: every line blanked.

    The set's first image is left out here: its 6 px line over saturated speckle is one of the two
    known misses that the slow test below counts.
    """
    images = text_test_set(seed=1000, images=4, shapes=_SMALL)[1:]
    assert {image.photometric for image in images} == {"MONOCHROME1", "MONOCHROME2", "RGB"}
    _recall_one_by_one(images)


@pytest.mark.slow
def test_recall_is_one_on_fifty_planted_boxes() -> None:
    """The test set (seed 1000, never tuned on): >= 50 legible lines (cap height >= 7 px), 14 fonts,
    contrast 0.15-1, all blanked; no image quarantined.

    The set also paints 6 px lines, below :data:`LEGIBLE_CAP_HEIGHT`: they are scanned and counted
    too, and at most two of them may be missed (bright speckle swallowing a 4 px tall full-contrast
    line; a 0.15-contrast line on a colour photo), so that a new miss there still fails.
    """
    images = text_test_set(seed=1000, images=24, shapes=_SMALL)
    legible = [box for image in images for box in image.boxes if box.legible]
    assert len(legible) >= 50 and len({box.font for box in legible}) == 14
    found = {True: 0, False: 0}
    total = {True: 0, False: 0}
    for image in images:
        scan = find_text_regions(image.pixels, image.photometric, 1, margin=2)
        assert scan.unsure == 0
        mask = _mask(image.pixels.shape, scan.regions)
        for box in image.boxes:
            total[box.legible] += 1
            found[box.legible] += box.covered(mask)
            assert box.covered(mask) or not box.legible, (image.kind, image.photometric, box.font, box.height, box.contrast)
    assert found[True] == total[True] >= 50
    assert total[False] - found[False] <= 2, (found, total)


def test_text_free_images_are_left_alone_and_kept() -> None:
    """Speckle fans and smooth shapes fire the detector as blobs: read as no text, nothing blanked, nothing quarantined."""
    for image in text_free_test_set(images=4)[::3]:  # an ultrasound fan at 256 px, and one at 8 bits
        scan = find_text_regions(image.pixels, image.photometric, 1, margin=3)
        assert scan.regions == [] and scan.unsure == 0, (image.kind, scan)


def test_multiframe_monochrome1_16bit_blanks_every_frame() -> None:
    frames = np.full((3, 120, 200), 3000, np.uint16)  # MONOCHROME1: high values display dark
    box = paint_text(frames[1], "DOE^JANE 1961", 10, 50, "dejavu-sans", 12, 200)
    scan = find_text_regions(frames, "MONOCHROME1", 3, margin=2)
    assert box.covered(_mask(frames.shape[1:], scan.regions))
    blanked = blank_regions(frames, scan.regions, "MONOCHROME1", 3)
    x0, y0, x1, y1 = scan.regions[0]
    assert np.all(blanked[:, y0:y1, x0:x1] == frames.max())  # black as displayed, in every frame


def test_a_cine_loop_is_scanned_through_four_images_and_every_line_is_blanked() -> None:
    """A 12-frame loop over moving speckle: a name in every frame and a clock line drawn in frames 5-7 only."""
    rng = np.random.default_rng(7)
    frames = np.zeros((12, 120, 200), np.uint8)
    frames[:, 40:, 20:180] = rng.integers(20, 120, (12, 80, 160))  # the image area changes every frame
    boxes = [paint_text(frame, "DOE^JANE 1961", 6, 8, "hershey-simplex", 10, 230) for frame in frames]
    clock = [paint_text(frame, "14:22:07", 120, 8, "dejavu-sans-mono", 8, 200) for frame in frames[5:8]]
    assert len(frames_to_scan(frames)) == 4 and len(frames_to_scan(frames[:3])) == 3
    scan = find_text_regions(frames, "MONOCHROME2", 12, margin=2)
    mask = _mask(frames.shape[1:], scan.regions)
    assert all(box.covered(mask) for box in boxes + clock), scan


def test_the_luminance_view_leaves_the_colour_dataset_as_it_is() -> None:
    """The volume's grayscale copy of a colour image must not change the image ingest writes."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    ds.SamplesPerPixel = 3  # converted elements, as ingest has them after reading attributes
    before = (ds.PhotometricInterpretation, ds.BitsAllocated, bytes(ds.PixelData), ds.pixel_array.shape)
    view = luminance_view(ds)
    assert view.pixel_array.shape == before[3][:2] and view.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated) == (3, before[0], before[1])
    assert bytes(ds.PixelData) == before[2]


def _copy(files: list[Path], target: Path) -> None:
    for number, path in enumerate(files):
        folder = target / "normal" / f"s{number}"
        folder.mkdir(parents=True)
        shutil.copy(path, folder / path.name)


def test_ingest_blanks_ultrasound_text_and_keeps_the_cookie(tmp_path: Path) -> None:
    us, cookie = DEID_DATA / "ultrasounds" / "GREYSCALE_IMAGE.dcm", DEID_DATA / "dicom-cookies" / "image1.dcm"
    _copy([us, cookie], tmp_path / "source")
    out = tmp_path / "out"
    summary = run([tmp_path / "source"], out, IngestConfig(workers=1), private=tmp_path / "private")
    assert summary.series_written == 2 and summary.quarantined == {}

    outputs = [pydicom.dcmread(path) for path in sorted((out / "dicom").rglob("*.dcm"))]
    cleaned = next(ds for ds in outputs if ds.get("Modality") == "US")
    kept = next(ds for ds in outputs if ds.get("Modality") != "US")
    source = pydicom.dcmread(us).pixel_array
    assert cleaned.BurnedInAnnotation == "NO"
    assert "113101" in {item.CodeValue for item in cleaned.DeidentificationMethodCodeSequence}
    pixels = cleaned.pixel_array
    header_band = source[:24] > 100  # the patient name, ID, birth date and institution line
    assert header_band.sum() > 500 and np.all(pixels[:24][header_band] == 0)
    assert np.array_equal(pixels[source == pixels], source[source == pixels])

    # The cookie photo holds no text: it is kept, its (colour, JPEG) pixels untouched.
    assert np.array_equal(kept.pixel_array, pydicom.dcmread(cookie).pixel_array)
    assert "BurnedInAnnotation" not in kept or kept.BurnedInAnnotation != "NO"

    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    regions = [rule for record in records for rule in record["rules"] if rule.get("action") == "blank"]
    assert len(regions) >= 10
    assert all(set(rule) == {"tag", "keyword", "action", "rule", "image", "region", "count"} for rule in regions)
    assert all(len(rule["region"]) == 4 for rule in regions)


def test_a_blanked_colour_image_is_written_in_colour(tmp_path: Path) -> None:
    """Text on an RGB secondary capture: blanked, and the output is still a consistent RGB image."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("SC_rgb.dcm"))
    pixels = ds.pixel_array.copy()
    pixels[:, :] = (40, 90, 160)
    box = paint_text(pixels, "DOE^JANE", 8, 40, "hershey-simplex", 10, (255, 255, 255))
    ds.PixelData = pixels.tobytes()
    folder = tmp_path / "source" / "normal" / "p1"
    folder.mkdir(parents=True)
    ds.save_as(folder / "sc.dcm", enforce_file_format=True)
    summary = run([tmp_path / "source"], tmp_path / "out", IngestConfig(workers=1), private=tmp_path / "private")
    assert summary.series_written == 1 and summary.quarantined == {}
    (path,) = (tmp_path / "out" / "dicom").rglob("*.dcm")
    out = pydicom.dcmread(path)
    assert (out.SamplesPerPixel, out.PhotometricInterpretation, out.BurnedInAnnotation) == (3, "RGB", "NO")
    written = out.pixel_array
    assert written.shape == pixels.shape
    assert np.all(written[box.y0 : box.y1, box.x0 : box.x1][box.ink] == 0)
    changed = np.any(written != pixels, axis=2)
    assert 0 < changed.mean() < 0.5 and np.all(written[~changed] == pixels[~changed])


def test_text_free_ct_never_reaches_the_detector(tmp_path: Path) -> None:
    """CT without text (BurnedInAnnotation NO or absent) is written byte-identical and the OCR engine never loads."""
    from pydicom.data import get_testdata_file

    source = tmp_path / "source" / "normal" / "p1"
    source.mkdir(parents=True)
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for number, flag in enumerate(("NO", None)):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID = f"2.25.{1000 + number}"
        if flag:
            ds.BurnedInAnnotation = flag
        ds.save_as(source / f"ct{number}.dcm", enforce_file_format=True)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pipeline.ingest import run\n"
        "from pipeline.ingest.config import IngestConfig\n"
        f"root = Path({str(tmp_path)!r})\n"
        "summary = run([root / 'source'], root / 'out', IngestConfig(workers=1), private=root / 'private')\n"
        "print(summary.series_written, 'rapidocr' in sys.modules, 'onnxruntime' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["2", "False", "False"]
    for path in (tmp_path / "out" / "dicom").rglob("*.dcm"):
        assert pydicom.dcmread(path).PixelData == original.PixelData
