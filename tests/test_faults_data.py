"""Training data a GAN cannot learn from is refused before training: exit 2 naming the class or sample."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.contracts.dataset import read_dataset, write_manifest
from pipeline.core.errors import InputError
from pipeline.core.files import sha256_file, write_nifti
from pipeline.models import train
from test_models import make_phantom_dataset, tiny_config


def _poison(root: Path, sample_ids: list[str]) -> None:
    """Make these samples all-NaN (as a broken scaling would) and keep the manifest's checksums true."""
    manifest = read_dataset(root).manifest.copy()
    for index, row in manifest.iterrows():
        if row["sample_id"] in sample_ids:
            path = root / row["path"]
            image = nib.load(path)
            write_nifti(path, np.full(image.shape, np.nan, dtype=np.float32), image.affine)
            manifest.loc[index, "sha256"] = sha256_file(path)
    write_manifest(root, pd.DataFrame(manifest))


@pytest.mark.parametrize("dims", [2, 3])
def test_a_class_without_a_usable_image_is_refused_by_name(tmp_path: Path, dims: int) -> None:
    root = make_phantom_dataset(tmp_path / "real")
    lesions = read_dataset(root).subset(split="train", origin="real")
    _poison(root, lesions[lesions["label"] == "lesion"]["sample_id"].tolist())
    config = tiny_config() if dims == 2 else tiny_config(spatial_dims=3, image_size=[16, 16, 8], spacing=[20.0, 20.0, 4.0])
    with pytest.raises(InputError, match="class 'lesion' has no usable image in split 'train'") as refused:
        train.run(root, tmp_path / "model", config, seed=0)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "model" / "checkpoint.pt").exists()


def test_one_non_finite_volume_is_refused_naming_the_sample(tmp_path: Path) -> None:
    root = make_phantom_dataset(tmp_path / "real")
    rows = read_dataset(root).subset(split="train", origin="real")
    lesion = rows[rows["label"] == "lesion"]["sample_id"].tolist()[0]
    _poison(root, [lesion])
    config = tiny_config(spatial_dims=3, image_size=[16, 16, 8], spacing=[20.0, 20.0, 4.0])
    with pytest.raises(InputError, match=f"sample {lesion} holds NaN or infinite values"):
        train.run(root, tmp_path / "model", config, seed=0)
