"""Default preprocessing (no model): one grid, one intensity scale, slices, 3D volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.contracts.dataset import read_dataset, write_manifest
from pipeline.evaluate import run
from pipeline.evaluate.config import EvaluateConfig
from pipeline.imaging.images import PERCENTILES, intensity_mapping, load_image_sets
from pipeline.core.files import sha256_file, write_nifti


def _write(root: Path, rows: list[dict], images: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for row, (data, affine) in zip(rows, images):
        write_nifti(root / row["path"], data, affine)
        row["sha256"] = sha256_file(root / row["path"])
    write_manifest(root, pd.DataFrame(rows))


def _row(sample_id: str, label: str, split: str, origin: str) -> dict:
    return {
        "sample_id": sample_id,
        "subject_id": f"sub-{sample_id}",
        "label": label,
        "split": split,
        "path": f"images/{sample_id}.nii.gz",
        "origin": origin,
        "sha256": "",
    }


def test_real_volumes_are_reoriented_resampled_and_sliced_onto_the_synthetic_grid(tmp_path: Path) -> None:
    # Real: 64 x 64 x 4 at 0.5 mm, stored L-P (x and y axes flipped), a bright marker in the
    # array's first corner, and one slice that is air only.
    volume = np.full((64, 64, 4), -1000.0, dtype=np.float32)
    volume[8:56, 8:56, 1:] = 40.0
    volume[:8, :8, 1:] = 500.0
    lps = np.diag([-0.5, -0.5, 2.0, 1.0])
    rows = [_row(f"r{i}", "a" if i % 2 else "b", "train" if i < 2 else "test", "real") for i in range(3)]
    _write(tmp_path / "real", rows, [(volume, lps)] * 3)
    # Synthetic: 32 x 32 x 1 at 1 mm, RAS.
    synthetic_image = np.full((32, 32, 1), -1000.0, dtype=np.float32)
    synthetic_image[4:28, 4:28] = 40.0
    synthetic_image[28:, 28:] = 500.0
    synthetic_rows = [_row(f"s{i}", "a", "train", "synthetic") for i in range(2)]
    _write(tmp_path / "synthetic", synthetic_rows, [(synthetic_image, np.diag([1.0, 1.0, 2.0, 1.0]))] * 2)

    real, synthetic, record = load_image_sets(read_dataset(tmp_path / "real"), read_dataset(tmp_path / "synthetic"))
    assert real.images.shape == (9, 1, 32, 32)  # 3 volumes x 3 non-empty slices; the air slice is dropped
    assert list(real.sample_ids[:3]) == ["r0#z1", "r0#z2", "r0#z3"]
    assert set(real.splits) == {"train", "test"} and set(synthetic.splits) == {"synthetic"}
    assert synthetic.images.shape == (2, 1, 32, 32)
    assert record["kind"] == "default" and record["spatial_dims"] == 2 and record["image_size"] == [32, 32]
    assert record["spacing_mm"] == [1.0, 1.0] and record["intensity_percentiles"] == list(PERCENTILES)
    assert record["intensity_mode"] == "common"
    plane = real.images[0, 0]
    # The marker sat at the array start along flipped axes: in RAS it is at the far corner.
    assert plane[29:, 29:].mean() > 0.9 and plane[:4, :4].mean() < -0.9
    assert real.images.min() >= -1.0 and real.images.max() <= 1.0
    # One mapping for both sides: the same HU value lands on the same scaled value.
    assert synthetic.images[0, 0, 16, 16] == real.images[0, 0, 16, 16]


def test_intensity_mapping_clips_real_to_a_windowed_synthetic_range_and_separates_other_units() -> None:
    # Synthetic CT stored clipped to the model's window: the real side is clipped the same way.
    assert intensity_mapping((-1010.0, 300.0), (-160.0, 240.0)) == ((-160.0, 240.0), (-160.0, 240.0), "common")
    # A brightness shift keeps one mapping, so the shift stays visible.
    real, synthetic, mode = intensity_mapping((-1000.0, 200.0), (-700.0, 500.0))
    assert mode == "common" and real == synthetic == (-700.0, 200.0)
    # Scanner units vs normalised units: each side on its own range.
    assert intensity_mapping((0.0, 3000.0), (0.0, 1.0)) == ((0.0, 3000.0), (0.0, 1.0), "per-side")


def test_three_dimensional_volumes_are_evaluated_as_volumes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    real_rows, real_images = [], []
    for index in range(24):
        label = "lesion" if index % 2 else "normal"
        split = "train" if index < 12 else ("val" if index < 18 else "test")
        volume = np.full((16, 16, 8), -1000.0, dtype=np.float32)
        volume[3:13, 3:13, 1:7] = 40.0 + rng.normal(0, 10, size=(10, 10, 6))
        if label == "lesion":
            volume[6:9, 6:9, 3:5] = 200.0
        real_rows.append(_row(f"r{index:02d}", label, split, "real"))
        real_images.append((volume, affine))
    _write(tmp_path / "real", real_rows, real_images)
    synthetic_rows = [_row(f"s{i:02d}", r["label"], "train", "synthetic") for i, r in enumerate(real_rows[:12])]
    _write(tmp_path / "synthetic", synthetic_rows, real_images[:12])  # copies of the training volumes

    config = EvaluateConfig(
        classifier_steps=20,
        bootstrap=50,
        kid_subsets=5,
        ms_ssim_pairs=10,
        match_repeats=1,
        min_holdout=6,
        min_test_subjects=4,
        utility_seeds=1,
        num_threads=1,
        k_nearest=3,
    )
    report = run(tmp_path / "real", tmp_path / "synthetic", tmp_path / "report", config)
    assert report["preprocessing"]["spatial_dims"] == 3 and report["preprocessing"]["image_size"] == [16, 16, 8]
    assert report["inputs"]["real"]["images"] == 24  # one image per volume, no slicing
    assert report["privacy"]["memorization_rate"] == 1.0 and report["gates"]["privacy"] == "fail"
    assert report["fidelity"]["fid"] < 1e-6
    assert (tmp_path / "report" / "report.html").stat().st_size > 10_000
