"""The three phantom families: the default is the original cohort, each family ingests without leaking its
planted PHI and with the expected counts, and each class signal is a local finding, not a brightness shift."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import scan_for_markers
from pipeline.cli import main
from pipeline.contracts.dataset import read_dataset
from pipeline.demo import FAMILIES, make_cohort
from pipeline.demo.mr_brain import brain_volume
from pipeline.demo.xray_chest import radiograph

# sha256 over (relative path, file sha256) of `make_cohort(out, subjects=7, seed=5)`: pinned, so that no
# refactoring of the family generators changes a byte of the default cohort (the README's figures come from it).
_ORIGINAL_COHORT_DIGEST = "825ffc138c98f2c2459c4d278266ab396cd809b93d35a145e22924724e3b598e"


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def test_default_family_is_the_original_cohort_byte_for_byte(tmp_path: Path) -> None:
    make_cohort(tmp_path / "default", subjects=7, seed=5)
    make_cohort(tmp_path / "named", subjects=7, seed=5, family="ct-abdomen")
    assert _tree_digest(tmp_path / "default") == _tree_digest(tmp_path / "named") == _ORIGINAL_COHORT_DIGEST


@pytest.mark.parametrize("family", ["mr-brain", "xray-chest"])
def test_new_families_are_deterministic_and_draw_their_own_people(tmp_path: Path, family: str) -> None:
    first = make_cohort(tmp_path / "a", subjects=5, seed=2, family=family)
    make_cohort(tmp_path / "b", subjects=5, seed=2, family=family)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    ct = make_cohort(tmp_path / "ct", subjects=5, seed=2)
    # Same seed, another family: other names, IDs and UIDs (two cohorts in one archive never collide).
    def ids(markers: list[str]) -> set[str]:
        return {marker for marker in markers if marker.startswith(("MRN", "OID", "ACC"))}

    assert ids(first.planted_phi) and not ids(first.planted_phi) & ids(ct.planted_phi)
    assert first.family == family and first.lines()[0].startswith(f"Phantom cohort ({family})")


def test_unknown_family_is_refused_with_the_choices(tmp_path: Path) -> None:
    from pipeline.core.errors import InputError

    with pytest.raises(InputError, match="mr-brain"):
        make_cohort(tmp_path, subjects=4, family="pet-heart")


@pytest.mark.parametrize(
    ("make", "labels"),
    [(radiograph, ("normal", "nodule")), (brain_volume, ("normal", "tumour"))],
    ids=["xray-chest", "mr-brain"],
)
def test_the_finding_is_local_not_a_brightness_shift(make, labels: tuple[str, str]) -> None:
    # The finding draws from its own stream, so one seed gives the same patient with and without it:
    # the difference is the finding alone.
    for seed in range(3):
        normal, _ = make(np.random.default_rng(seed), labels[0])
        finding, _ = make(np.random.default_rng(seed), labels[1])
        difference = np.abs(finding.astype(np.float64) - normal)
        assert 0.003 < (difference > 0).mean() < 0.12  # a lesion-sized region, nothing else changes
        assert difference.max() > 0.25 * np.percentile(normal, 99)  # visible against the anatomy
        assert abs(finding.mean() - normal.mean()) < 0.05 * normal.mean()
    # Between patients the overall brightness varies far more than the finding moves it (MR gain,
    # X-ray exposure), so brightness alone does not tell the classes apart.
    means = [make(np.random.default_rng(100 + seed), labels[seed % 2])[0].mean() for seed in range(8)]
    assert max(means) / min(means) > 1.2


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out + captured.err


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_ingests_with_expected_counts_and_no_planted_phi(
    tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str], family: str
) -> None:
    raw = tmp_path / "raw"
    code, console = _cli(["demo-data", str(raw), "--subjects", "8", "--seed", "4", "--family", family], capsys)
    assert code == 0, console
    cohort = make_cohort(raw, subjects=8, seed=4, family=family)  # the same bytes again: its summary
    out = tmp_path / "ingested"
    code, console = _cli(
        ["ingest", "--source", str(raw / "dicom"), "--source", str(raw / "nifti"), "--labels", str(raw / "labels.csv"),
         "--out", str(out), "--private", str(tmp_path / "private")],
        capsys,
    )
    assert code == 0, console

    markers = sorted({item for marker in cohort.planted_phi for item in (marker, marker.upper())})
    assert scan_for_markers(out, markers) == []
    assert scan_for_markers(mlflow_store, markers) == []
    assert not [marker for marker in markers if marker.lower() in console.lower()]

    manifest = read_dataset(out).manifest
    assert len(manifest) == cohort.subjects  # the burned-in subject is kept: its text is blanked, not quarantined
    assert sorted(set(manifest["label"])) == sorted(cohort.labels)
    with open(tmp_path / "private" / "quarantine.csv", newline="") as handle:
        reasons = Counter(row["reason"] for row in csv.DictReader(handle))
    assert reasons["no pixel data: non-image object or stripped image (Basic Text SR Storage)"] == 1
    assert sum(count for reason, count in reasons.items() if reason.startswith("undecodable pixel data")) == 1
    assert sum(reasons.values()) == 2
    with open(out / "audit.jsonl") as handle:
        blanked = [rule for series in map(json.loads, handle) for rule in series.get("rules", [])
                   if rule.get("action") == "blank"]
    assert blanked and all("region" in row and "text" not in row for row in blanked)

    planes = "2" if family == "xray-chest" else "3"
    assert set(manifest["spatial_dims"]) == {planes}
    if family == "xray-chest":
        dicom_rows = manifest[manifest["source_format"] == "dicom"]
        assert set(dicom_rows["modality"]) == {"CR", "DX"}  # MONOCHROME1 CR and MONOCHROME2 DX
        for _, row in manifest.iterrows():
            image = nib.load(out / row["path"])
            assert image.shape == (256, 256, 1)
            assert 1.3 < float(row["spacing"].split("x")[0]) < 1.8
            data = np.asarray(image.dataobj)[:, :, 0].astype(np.float64)
            # One polarity for every image, whatever its photometric interpretation: the spine and
            # mediastinum (centre) are brighter than the air beside the body (outer columns).
            centre, edges = data[118:138, 100:200].mean(), np.concatenate([data[:6, 100:200], data[-6:, 100:200]]).mean()
            assert centre > edges + 500, row["modality"]
    else:
        shape = {"ct-abdomen": (128, 128, 16), "mr-brain": (112, 112, 12)}[family]
        assert {tuple(nib.load(out / path).shape) for path in manifest["path"]} == {shape}
