"""The phantom cohort's burned-in subject: every planted name, ID and date line is blanked, the subject kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.demo import make_cohort
from pipeline.demo.text import burn_in_identity
from pipeline.ingest import run
from pipeline.ingest.config import IngestConfig


def _planted_lines(ds: pydicom.Dataset) -> list[str]:
    """The lines pipeline/demo.py burns into this subject, rebuilt from its source header."""
    birth, study = str(ds.PatientBirthDate), str(ds.StudyDate)
    return [str(ds.PatientName), str(ds.PatientID), f"DOB {birth[:4]}-{birth[4:6]}-{birth[6:]}", f"{study[6:]}/{study[4:6]}/{study[:4]}"]


@pytest.mark.slow
def test_every_planted_line_of_the_demo_is_blanked(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    cohort = make_cohort(raw, subjects=5, seed=0)
    assert cohort.burned_in_subjects == 1
    sources = [pydicom.dcmread(path) for path in (raw / "dicom").rglob("*.dcm")]
    burned = sorted((ds for ds in sources if ds.get("BurnedInAnnotation") == "YES"), key=lambda ds: int(ds.InstanceNumber))
    assert len(burned) == 16

    out = tmp_path / "out"
    summary = run([raw / "dicom", raw / "nifti"], out, IngestConfig(workers=1), labels=raw / "labels.csv", private=tmp_path / "private")
    assert summary.series_written == cohort.subjects
    outputs = [pydicom.dcmread(path) for path in sorted((out / "dicom").rglob("*.dcm"))]
    cleaned = [ds for ds in outputs if "113101" in {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}]
    assert len(cleaned) == 16 and {ds.BurnedInAnnotation for ds in cleaned} == {"NO"}
    by_slice = sorted(cleaned, key=lambda ds: float(ds.ImagePositionPatient[2]))

    boxes = 0
    for k, (source, output) in enumerate(zip(burned, by_slice)):
        # Same lines, slice and function as pipeline/demo.py: the same boxes, at the same places.
        planted = burn_in_identity(source.pixel_array.copy(), _planted_lines(source), k, background=0, bright=4000)
        pixels = output.pixel_array
        fill = pixels.min()
        for box in planted:
            assert np.median(source.pixel_array[box.y0 : box.y1, box.x0 : box.x1][box.ink]) > 150  # text, not air
            assert np.all(pixels[box.y0 : box.y1, box.x0 : box.x1][box.ink] == fill), (k, box.font, box.height, box.contrast)
            boxes += 1
    assert boxes == 64

    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    images = {rule["image"] for record in records for rule in record["rules"] if rule.get("action") == "blank"}
    assert len(images) == 16
