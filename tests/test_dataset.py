"""The dataset contract: manifest round trip, checksums, digests, malformed manifests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.contracts.dataset import dataset_digest, read_dataset, verify_checksums, write_manifest
from pipeline.core.errors import InputError
from pipeline.core.files import read_nifti, sha256_file, write_nifti


def _make_dataset(root: Path, n: int = 4) -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        rel = f"images/s{i}.nii.gz"
        affine = np.diag([-2.0, -2.0, 3.0, 1.0])
        write_nifti(root / rel, rng.normal(size=(8, 8, 3)).astype(np.float32), affine)
        rows.append(
            dict(
                sample_id=f"s{i}",
                subject_id=f"sub{i // 2}",
                label="lesion" if i % 2 else "normal",
                split="train" if i < 2 else "test",
                path=rel,
                origin="real",
                sha256=sha256_file(root / rel),
                spacing="2.0,2.0,3.0",
            )
        )
    return pd.DataFrame(rows)


def test_round_trip_keeps_rows_extras_and_affine(tmp_path: Path) -> None:
    manifest = _make_dataset(tmp_path)
    write_manifest(tmp_path, manifest)
    dataset = read_dataset(tmp_path)
    assert list(dataset.manifest.columns[:7]) == ["sample_id", "subject_id", "label", "split", "path", "origin", "sha256"]
    assert dataset.manifest["spacing"].tolist() == ["2.0,2.0,3.0"] * 4
    assert dataset.labels == ["lesion", "normal"]
    assert verify_checksums(dataset) == []
    data, affine = read_nifti(dataset.image_path(dataset.manifest.iloc[0]))
    assert data.shape == (8, 8, 3)
    assert np.allclose(affine, np.diag([-2.0, -2.0, 3.0, 1.0]))


def test_digest_ignores_row_order_but_not_content(tmp_path: Path) -> None:
    manifest = _make_dataset(tmp_path)
    assert dataset_digest(manifest) == dataset_digest(manifest.iloc[::-1])
    changed = manifest.copy()
    changed.loc[0, "label"] = "normal" if changed.loc[0, "label"] == "lesion" else "lesion"
    assert dataset_digest(changed) != dataset_digest(manifest)


def test_changed_file_is_detected(tmp_path: Path) -> None:
    write_manifest(tmp_path, _make_dataset(tmp_path))
    write_nifti(tmp_path / "images/s1.nii.gz", np.zeros((8, 8, 3), np.float32), np.eye(4))
    assert verify_checksums(read_dataset(tmp_path)) == ["s1"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda m: m.drop(columns=["label"]), "missing column(s) label"),
        (lambda m: m.assign(split=["train", "training", "test", "test"]), "row 3, column 'split'"),
        (lambda m: m.assign(origin=["real", "real", "fake", "real"]), "row 4, column 'origin'"),
        (lambda m: m.assign(sha256=["abc"] * 4), "row 2, column 'sha256'"),
        (lambda m: m.assign(path=["../x.nii.gz"] * 4), "row 2, column 'path'"),
        (lambda m: m.assign(sample_id=["a", "b", "a", "c"]), "row 4, column 'sample_id'"),
        (lambda m: m.assign(label=["x", "", "x", "x"]), "row 3, column 'label'"),
        (lambda m: m.assign(split=["train", "train", "test", "val"]), "appears in more than one split"),
    ],
)
def test_malformed_manifest_names_file_row_and_column(tmp_path: Path, mutate, expected: str) -> None:
    manifest = mutate(_make_dataset(tmp_path))
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(InputError) as caught:
        read_dataset(tmp_path)
    assert expected in str(caught.value)
    assert "manifest.csv" in str(caught.value)


def test_missing_folder_manifest_and_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="dataset folder not found"):
        read_dataset(tmp_path / "nope")
    with pytest.raises(InputError, match="no manifest"):
        read_dataset(tmp_path)
    write_manifest(tmp_path, _make_dataset(tmp_path))
    (tmp_path / "images/s3.nii.gz").unlink()
    with pytest.raises(InputError, match="row 5, column 'path': file images/s3.nii.gz does not exist"):
        read_dataset(tmp_path)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    write_manifest(tmp_path, _make_dataset(tmp_path))
    leftovers = [p.name for p in tmp_path.rglob("*.tmp")]
    assert leftovers == []


def test_written_nifti_is_plain_gzip_and_reproducible(tmp_path: Path) -> None:
    """ISA-L writes standard gzip: nibabel and Python's gzip read it; the same volume gives the same bytes."""
    import gzip

    import nibabel as nib

    rng = np.random.default_rng(0)
    volume = rng.integers(-1024, 2000, size=(32, 24, 5)).astype(np.int16)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    first, second = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    write_nifti(first, volume, affine, descrip="synthetic test")
    write_nifti(second, volume, affine, descrip="synthetic test")
    assert first.read_bytes() == second.read_bytes()
    assert gzip.decompress(first.read_bytes())[:4] == (348).to_bytes(4, "little")  # a NIfTI-1 header
    image = nib.load(first)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), volume)
    np.testing.assert_allclose(image.affine, affine)
    assert image.header["descrip"].item() == b"synthetic test" and image.get_data_dtype() == np.int16
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temp file left
