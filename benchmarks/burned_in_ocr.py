"""Burned-in text detection: recall on planted text boxes, false-blank area on text-free images, images/s.

Three image sets, all drawn or shipped offline:

* ``planted``: :func:`pipeline.demo.text.text_test_set`, drawn twice: a TUNING set (seed 0, the one
  the detector settings in ``pipeline/ingest/burned_in.py`` were chosen on) and a TEST set (seed 1000,
  never looked at while tuning), each 8/16-bit MONOCHROME1/2 and RGB images of
  128-1024 px (ultrasound-like fans, smooth anatomy, photo-like fields) with 2-4 lines each of names,
  IDs and dates in 14 fonts (Hershey stroke fonts, DejaVu/STIX/Computer Modern TrueType), cap
  heights 6-24 px, contrasts from full scale down to 0.15 of the range, anywhere in the image.
  A box counts as found when every ink pixel lies inside a blanked region.
* ``demo``: the phantom cohort's burned-in subject (16 CT slices, 4 lines each).
* ``text-free``: :func:`pipeline.demo.text.text_free_test_set` and the seven ``deid-data`` cookie
  photographs (secondary captures without text): the blanked share of their area, and how many
  the detector left unsure (quarantined).

Usage::

    python benchmarks/burned_in_ocr.py [--images 24] [--margin 3] [--no-cookies] [--sets tuning,test,demo] [--small]

Prints recall per set and per condition (legible or not, font, cap height, contrast, background,
pixel format), the blanked share of text-free images, how many images would be quarantined, images/s
and CPU seconds per image (one onnxruntime thread: the wall time per image on an idle core).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo.text import _SHAPES, TextImage, text_free_test_set, text_test_set  # noqa: E402
from pipeline.ingest.burned_in import find_text_regions  # noqa: E402


def _mask(shape: tuple[int, ...], regions: list[tuple[int, int, int, int]]) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    for x0, y0, x1, y1 in regions:
        mask[y0:y1, x0:x1] = True
    return mask


def _demo_images() -> list[TextImage]:
    """The burned-in subject of the phantom cohort, rebuilt slice by slice as pipeline/demo.py writes it."""
    from pipeline import demo
    from pipeline.demo.text import burn_in_identity

    hu, _ = demo.phantom_volume(np.random.default_rng(3), "lesion")
    who = demo._identity(np.random.default_rng(5), set())
    images = []
    for k in range(hu.shape[2]):
        stored = np.clip(hu[:, :, k].T.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
        study = who.study_date
        lines = [
            f"{who.family}^{who.given}", who.patient_id,
            f"DOB {who.birth_date[:4]}-{who.birth_date[4:6]}-{who.birth_date[6:]}", f"{study[6:]}/{study[4:6]}/{study[:4]}",
        ]
        boxes = burn_in_identity(stored, lines, k, background=0, bright=4000)
        images.append(TextImage(stored, "MONOCHROME2", boxes, "phantom CT"))
    return images


def _recall(images: list[TextImage], margin: int, conditions: dict[str, dict[str, list[int]]]) -> tuple[int, int, int, float, float, list[str]]:
    """Boxes found / planted, images quarantined, seconds, CPU seconds, and one line per miss; tallies ``conditions``."""
    found = total = unsure = 0
    misses: list[str] = []
    start, cpu = time.perf_counter(), time.process_time()
    for index, image in enumerate(images):
        scan = find_text_regions(image.pixels, image.photometric, 1, margin)
        unsure += scan.unsure > 0
        mask = _mask(image.pixels.shape, scan.regions)
        for box in image.boxes:
            total += 1
            hit = box.covered(mask)
            found += hit
            fmt = f"{image.photometric}-{image.pixels.dtype.itemsize * 8}"
            for condition, value in (("legible (cap height >= 7 px)", box.legible), ("font", box.font),
                                     ("cap height px", box.height), ("contrast", box.contrast),
                                     ("background", image.kind), ("format", fmt)):
                tally = conditions.setdefault(condition, {}).setdefault(str(value), [0, 0])
                tally[0] += hit
                tally[1] += 1
            if not hit:
                share = float(mask[box.y0 : box.y1, box.x0 : box.x1][box.ink].mean())
                misses.append(
                    f"image {index} ({image.kind}, {image.photometric}, {image.pixels.shape[1]}x{image.pixels.shape[0]}): "
                    f"{box.font} {box.height}px contrast {box.contrast:g}, {share:.0%} of its ink blanked"
                )
    return found, total, unsure, time.perf_counter() - start, time.process_time() - cpu, misses


def _text_free(images: list[np.ndarray], photometrics: list[str], margin: int) -> tuple[float, int, float, float]:
    area = 0.0
    unsure = 0
    start, cpu = time.perf_counter(), time.process_time()
    for pixels, photometric in zip(images, photometrics):
        scan = find_text_regions(pixels, photometric, 1, margin)
        unsure += scan.unsure > 0
        area += float(_mask(pixels.shape, scan.regions).mean())
    return area / max(len(images), 1), unsure, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=24, help="images in the planted test set")
    parser.add_argument("--margin", type=int, default=3, help="pixels added around each detected box")
    parser.add_argument("--no-cookies", action="store_true", help="skip the seven 2048 x 1536 deid-data photographs")
    parser.add_argument("--sets", default="tuning,test,demo", help="comma-separated planted sets: tuning, test, demo")
    parser.add_argument("--small", action="store_true", help="only 128 and 256 px planted images (the slow test's set)")
    args = parser.parse_args()
    wanted = set(args.sets.split(","))

    # Load the engine once before timing (ingest does it once per worker process).
    find_text_regions(np.zeros((32, 32), np.uint8), "MONOCHROME2", 1, 0)
    print("| set | images | boxes | found | recall | unsure images | images/s | CPU s/image |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    all_misses = []
    per_set: dict[str, dict[str, dict[str, list[int]]]] = {}
    shapes = ((128, 128), (256, 256)) if args.small else _SHAPES
    sets_planted = {"tuning": lambda: text_test_set(seed=0, images=args.images, shapes=shapes),
                    "test": lambda: text_test_set(seed=1000, images=args.images, shapes=shapes), "demo": _demo_images}
    for name, draw in sets_planted.items():
        if name not in wanted:
            continue
        images = draw()
        conditions = per_set.setdefault(name, {})
        found, total, unsure, seconds, cpu, misses = _recall(images, args.margin, conditions)
        all_misses += [f"{name}: {miss}" for miss in misses]
        print(f"| {name} | {len(images)} | {total} | {found} | {found / max(total, 1):.3f} | {unsure} "
              f"| {len(images) / seconds:.2f} | {cpu / len(images):.2f} |", flush=True)
    for name, conditions in per_set.items():
        print()
        print(f"Recall per condition, {name} set:")
        for condition, tallies in conditions.items():
            cells = ", ".join(f"{value} {hit}/{count}" for value, (hit, count) in sorted(tallies.items()))
            print(f"- {condition}: {cells}")
    free = text_free_test_set()
    sets = [("text-free drawn", [image.pixels for image in free], [image.photometric for image in free])]
    if not args.no_cookies:
        import deid_data
        import pydicom

        cookies = sorted((Path(deid_data.__file__).parent / "data" / "dicom-cookies").glob("*.dcm"))
        sets.append(("deid-data cookies", [pydicom.dcmread(path).pixel_array for path in cookies], ["RGB"] * len(cookies)))
    print()
    print("| text-free set | images | blanked area (mean share) | unsure images | images/s | CPU s/image |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, pixels, photometrics in sets:
        area, unsure, seconds, cpu = _text_free(pixels, photometrics, args.margin)
        print(f"| {name} | {len(pixels)} | {area:.4f} | {unsure} | {len(pixels) / seconds:.2f} | {cpu / len(pixels):.2f} |")
    for miss in all_misses:
        print("missed:", miss)


if __name__ == "__main__":
    main()
