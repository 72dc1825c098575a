"""Single-frame 2D radiographs (DX, CR) go through ingest -> train (smoke) -> generate as 2D samples."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.cli import main
from pipeline.contracts.dataset import read_dataset
from pipeline.demo import make_cohort

# Explicit model keys: this test is about 2D inputs, not about the plan (tiny grid, a few steps).
_CONFIG = """\
name: xray-smoke
model: {spatial_dims: 2, image_size: [32, 32], spacing: [13.0, 13.0], intensity: mr, percentiles: [1.0, 99.0],
        window: [0.0, 4095.0], latent_dim: 16, embed_dim: 4, g_width: 8, d_width: 8, batch_size: 4, augment: [translation],
        max_steps: 2, max_minutes: 5.0, checkpoint_every: 1, sample_every: 0, log_model: false, num_threads: 1}
generate: {per_class: 2}
"""


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out + captured.err


def test_radiographs_are_single_frame_2d_dicom(tmp_path: Path) -> None:
    make_cohort(tmp_path, subjects=6, seed=0, family="xray-chest")
    images = []
    for path in sorted((tmp_path / "dicom").rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
            ds.pixel_array  # noqa: B018 - the truncated file fails here
        except Exception:
            continue
        if "PixelData" in ds:
            images.append(ds)
    assert images and all(int(ds.get("NumberOfFrames", 1)) == 1 for ds in images)
    for ds in images:
        assert ds.Modality in {"DX", "CR"} and (ds.Rows, ds.Columns) == (256, 256)
        assert ds.PhotometricInterpretation == ("MONOCHROME1" if ds.Modality == "CR" else "MONOCHROME2")
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11) and ds.pixel_array.max() <= 4095
        assert "ImagePositionPatient" not in ds and list(ds.PatientOrientation) == ["L", "F"]
        assert 1.3 < float(ds.PixelSpacing[0]) == float(ds.ImagerPixelSpacing[0]) < 1.8
    nifti = sorted((tmp_path / "nifti").glob("*.nii.gz"))
    assert nifti and all(nib.load(path).shape == (256, 256) for path in nifti)  # 2D NIfTI inputs too


def test_xray_cohort_ingests_trains_and_generates_in_2d(
    tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "raw"
    make_cohort(raw, subjects=10, seed=3, family="xray-chest")
    data = tmp_path / "ingested"
    code, console = _cli(
        ["ingest", "--source", str(raw / "dicom"), "--source", str(raw / "nifti"), "--labels", str(raw / "labels.csv"),
         "--out", str(data), "--private", str(tmp_path / "private")],
        capsys,
    )
    assert code == 0, console
    manifest = read_dataset(data).manifest
    assert set(manifest["spatial_dims"]) == {"2"} and set(manifest["shape"]) == {"256x256x1"}
    for _, row in manifest.iterrows():
        affine = nib.load(data / row["path"]).affine
        spacing = [float(value) for value in row["spacing"].split("x")]
        np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0))[:2], spacing[:2], rtol=1e-4)

    config = tmp_path / "xray.yaml"
    config.write_text(_CONFIG)
    model = tmp_path / "model"
    code, console = _cli(["train", "--data", str(data), "--out", str(model), "-c", str(config)], capsys)
    assert code == 0, console
    assert "Trained 2 steps" in console

    synthetic = tmp_path / "synthetic"
    code, console = _cli(["generate", "--model", str(model), "--out", str(synthetic), "-c", str(config)], capsys)
    assert code == 0, console
    generated = read_dataset(synthetic).manifest
    assert len(generated) == 4 and sorted(set(generated["label"])) == ["nodule", "normal"]
    image = nib.load(synthetic / generated.iloc[0]["path"])
    assert image.shape == (32, 32, 1)
    np.testing.assert_allclose(np.sqrt((image.affine[:3, :3] ** 2).sum(0))[:2], [13.0, 13.0])

    # A 3D model cannot learn from single planes: refused up front with the fix, exit 2.
    config_3d = tmp_path / "xray3d.yaml"
    config_3d.write_text(
        _CONFIG.replace("spatial_dims: 2, image_size: [32, 32], spacing: [13.0, 13.0]",
                        "spatial_dims: 3, image_size: [32, 32, 8], spacing: [13.0, 13.0, 4.0]")
    )
    code, console = _cli(["train", "--data", str(data), "--out", str(tmp_path / "m3"), "-c", str(config_3d)], capsys)
    assert code == 2 and "spatial_dims: 2" in console and "Traceback" not in console
