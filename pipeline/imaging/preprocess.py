"""The model's preprocessing: MONAI transforms from a JSON spec saved with the model.

Real volumes are reoriented, intensity-scaled to [-1, 1], resampled to the model's spacing and
center-cropped or padded (with the value of air, -1) to the model's grid. 2D models then use every
non-empty axial slice. The spec lives in ``model.json`` so evaluate and export apply exactly the
same transform to real images as training did.

Synthetic files written by ``generate`` are already on the model grid (RAS, model spacing, model
size) and in modality units, so the geometric steps are identities for them and the intensity
step maps them back to [-1, 1] exactly. MR has no absolute scale: real MR volumes are scaled by
their own percentiles, synthetic MR files are stored in percentile-normalised units (0..1) and
mapped back linearly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from pipeline.contracts.dataset import Dataset
from pipeline.contracts.model import read_model_meta
from pipeline.core.errors import InputError
from pipeline.core.files import read_nifti

__all__ = ["Preprocessor", "build_spec", "grid_affine", "FOREGROUND_LEVEL", "UNPLANNED"]

# A pixel counts as foreground above this level in [-1, 1] (2.5 % of the intensity range above the
# floor): for a CT soft-tissue window that is fat and denser tissue, never air.
FOREGROUND_LEVEL = -0.95
_ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# What an `auto` preprocessing key means when no plan resolved it (a spec built outside training).
UNPLANNED: dict[str, Any] = {
    "spatial_dims": 2,
    "image_size": [64, 64],
    "spacing": None,
    "intensity": "ct",
    "window": [-160.0, 240.0],
    "percentiles": [1.0, 99.0],
}


def _native_spacing(affine: np.ndarray, axcodes: str) -> list[float]:
    """Voxel size (mm) along each axis after reorienting ``affine`` to ``axcodes`` (header only)."""
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(tuple(axcodes), _ORIENTATION_LABELS)
    )
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(transform):
        spacing[int(target)] = float(zooms[axis])
    return spacing


def build_spec(config: Any, dataset: Dataset, rows: pd.DataFrame) -> dict[str, Any]:
    """Resolve the preprocessing spec of ``config`` (a ModelConfig) against the training rows.

    A null ``spacing`` becomes the median native spacing of ``rows``; 2D models also record the
    median slice spacing (the z voxel size of the synthetic NIfTI files they write). Training
    plans every ``auto`` key first (:mod:`pipeline.planning`); a config passed here unplanned gets
    the fixed fallbacks of :data:`UNPLANNED` (2D, 64 x 64, native spacing, a soft-tissue CT window).
    """

    def key(name: str) -> Any:
        value = getattr(config, name)
        return UNPLANNED[name] if isinstance(value, str) and value == "auto" else value

    axcodes = config.orientation.upper()
    native = []
    for _, row in rows.iterrows():
        path = dataset.image_path(row)
        try:
            header = nib.load(path)
        except Exception as exc:  # nibabel raises several unrelated types for corrupt files
            raise InputError(
                f"{path}: not a readable NIfTI image ({type(exc).__name__}). Fix: re-create the file or remove its row."
            ) from exc
        affine = header.affine
        if len(header.shape) not in (2, 3):  # a 2D file is a single-frame image (X-ray), one slice
            raise InputError(
                f"{dataset.root / 'manifest.csv'}: sample {row['sample_id']} is neither a 2D image nor a 3D volume "
                f"(shape {tuple(header.shape)}). Fix: store one 2D image or 3D volume per NIfTI file."
            )
        if key("spatial_dims") == 3 and (len(header.shape) == 2 or header.shape[2] == 1):
            raise InputError(
                f"{dataset.root / 'manifest.csv'}: sample {row['sample_id']} is a single-plane image (shape "
                f"{tuple(header.shape)}), which a 3D model cannot learn from. Fix: set model.spatial_dims: 2 (or auto)."
            )
        native.append(_native_spacing(affine, axcodes))
    median = np.median(np.asarray(native), axis=0).tolist()
    dims = key("spatial_dims")
    spacing = list(key("spacing")) if key("spacing") is not None else [round(v, 4) for v in median[:dims]]
    return {
        "spatial_dims": dims,
        "orientation": axcodes,
        "spacing": [float(value) for value in spacing],
        "image_size": [int(value) for value in key("image_size")],
        "slice_spacing": float(round(median[2], 4)) if dims == 2 else float(spacing[2]),
        "intensity": key("intensity"),
        "window": [float(value) for value in key("window")],
        "percentiles": [float(value) for value in key("percentiles")],
        "min_foreground": float(config.min_foreground),
    }


class Preprocessor:
    """Applies a preprocessing spec (see :func:`build_spec`) with MONAI transforms.

    Args:
        spec: the ``preprocess`` mapping of ``model.json``.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = dict(spec)
        self.spatial_dims = int(spec["spatial_dims"])
        self.image_size = [int(value) for value in spec["image_size"]]
        self.spacing = [float(value) for value in spec["spacing"]]
        self.window = [float(value) for value in spec["window"]]
        self.intensity = str(spec["intensity"])
        self._geometry = self._geometric_transforms()

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str]) -> Preprocessor:
        """The preprocessor a trained model was trained with (the ``preprocess`` spec of its ``model.json``).

        Raises:
            InputError: the folder has no readable, valid ``model.json``.
        """
        return cls(read_model_meta(model_dir).preprocess)

    def _geometric_transforms(self):
        import monai.transforms as mt

        if self.spatial_dims == 2:
            pixdim = (*self.spacing, -1.0)  # non-positive: keep the native slice spacing
            size = (*self.image_size, -1)  # non-positive: keep the number of slices
        else:
            pixdim = tuple(self.spacing)
            size = tuple(self.image_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Orientation's deprecated default for `labels`
            orientation = mt.Orientation(axcodes=self.spec["orientation"], labels=_ORIENTATION_LABELS)
        return mt.Compose(
            [
                orientation,
                mt.Spacing(pixdim=pixdim, mode="bilinear", padding_mode="border", dtype=np.float32),
                mt.ResizeWithPadOrCrop(spatial_size=size, mode="constant", value=-1.0),
            ]
        )

    # -- intensity ----------------------------------------------------------------------------

    def to_intensity(self, images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Map network images in [-1, 1] to modality units (HU for CT; 0..1 normalised units for MR)."""
        low, high = self._unit_range()
        return low + (images + 1.0) * 0.5 * (high - low)

    def from_intensity(self, values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Inverse of :meth:`to_intensity`, clipped to [-1, 1]."""
        low, high = self._unit_range()
        scaled = (values - low) / (high - low) * 2.0 - 1.0
        if isinstance(scaled, torch.Tensor):
            return scaled.clamp(-1.0, 1.0)
        return np.clip(scaled, -1.0, 1.0)

    def _unit_range(self) -> tuple[float, float]:
        return (self.window[0], self.window[1]) if self.intensity == "ct" else (0.0, 1.0)

    def _scale(self, volume: np.ndarray, origin: str) -> np.ndarray:
        if self.intensity == "mr" and origin == "real":
            low_pct, high_pct = self.spec["percentiles"]
            low, high = np.percentile(volume, [low_pct, high_pct])
            if high <= low:
                return np.full_like(volume, -1.0)
            return np.clip((volume - low) / (high - low) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
        return np.asarray(self.from_intensity(volume), dtype=np.float32)

    # -- volumes --------------------------------------------------------------------------------

    def scale(self, data: np.ndarray) -> np.ndarray:
        """The intensity step alone on a real image: modality units -> [-1, 1] (clipped)."""
        return self._scale(np.asarray(data, dtype=np.float32), "real")

    def resample(self, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """The geometric steps alone (reorient, resample, crop/pad with -1) on an image already in [-1, 1].

        Returns the array on the model grid; 2D models keep every slice, ``(x, y, z)``. The guards
        pass a foreground mask through it (as -1/1) to see what the grid keeps of the foreground.
        """
        from monai.data import MetaTensor

        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 2:
            data = data[:, :, None]
        tensor = MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(affine, dtype=torch.float64))
        return self._geometry(tensor).as_tensor().numpy()[0].astype(np.float32, copy=False)

    def volume_to_images(self, data: np.ndarray, affine: np.ndarray, origin: str = "real") -> np.ndarray:
        """Preprocess one volume.

        Args:
            data: the volume in modality units, indexed like its NIfTI file.
            affine: its NIfTI affine.
            origin: ``real`` or ``synthetic`` (synthetic MR files are not percentile-scaled, and
                a synthetic 2D file is kept even when it looks empty).

        Returns:
            float32 in [-1, 1]: 2D: ``(n_slices, *image_size)``, every non-empty axial slice;
            3D: ``(1, *image_size)``.
        """
        from monai.data import MetaTensor

        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 2:
            data = data[:, :, None]
        if data.ndim != 3:
            raise InputError(f"expected a 3D volume, got shape {data.shape}. Fix: store one 3D NIfTI per image.")
        scaled = self._scale(data, origin)
        tensor = MetaTensor(torch.from_numpy(scaled)[None], affine=torch.as_tensor(affine, dtype=torch.float64))
        out = self._geometry(tensor)
        array = out.as_tensor().numpy()[0].astype(np.float32, copy=False)  # drop the channel axis
        if self.spatial_dims == 3:
            return np.ascontiguousarray(array[None])
        slices = np.ascontiguousarray(np.moveaxis(array, -1, 0))  # (z, x, y)
        if origin == "real":
            keep = (slices > FOREGROUND_LEVEL).mean(axis=(1, 2)) > float(self.spec["min_foreground"])
            slices = slices[keep]
        return slices

    def dataset_images(
        self, dataset: Dataset, rows: pd.DataFrame | None = None
    ) -> tuple[np.ndarray, list[str], list[str]]:
        """Read and preprocess the images of ``rows`` (default: every row) of ``dataset``.

        Returns:
            ``(images (N, 1, *image_size) float32 in [-1, 1], labels, sample_ids)``; in 2D a real
            volume expands to its non-empty slices with ids ``<sample_id>#z<k>`` (k counts the
            kept slices from inferior to superior).
        """
        rows = dataset.manifest if rows is None else rows
        images: list[np.ndarray] = []
        labels: list[str] = []
        ids: list[str] = []
        for _, row in rows.iterrows():
            data, affine = read_nifti(dataset.image_path(row))
            origin = str(row.get("origin", "real"))
            stack = self.volume_to_images(data, affine, origin=origin)
            images.append(stack)
            labels.extend([str(row["label"])] * len(stack))
            if self.spatial_dims == 2 and origin == "real":
                ids.extend(f"{row['sample_id']}#z{k}" for k in range(len(stack)))
            else:
                ids.extend([str(row["sample_id"])] * len(stack))
        if not images:
            return np.zeros((0, 1, *self.image_size), dtype=np.float32), [], []
        return np.concatenate(images)[:, None].astype(np.float32, copy=False), labels, ids

    def grid_affine(self) -> np.ndarray:
        """Affine of one image on the model grid (2D: an (x, y, 1) volume), in the model's orientation.

        The grid is centred on the world origin, so reorienting, resampling and cropping it are
        identities.
        """
        spacing = [*self.spacing, float(self.spec["slice_spacing"])][:3]
        size = [*self.image_size, 1][:3]
        return grid_affine(self.spec["orientation"], spacing, size)

    def describe(self) -> Iterable[str]:
        """One line per step, for docs and logs."""
        spec = self.spec
        intensity = (
            f"CT window {spec['window'][0]:g}..{spec['window'][1]:g} HU -> [-1, 1]"
            if self.intensity == "ct"
            else f"MR percentiles {spec['percentiles'][0]:g}..{spec['percentiles'][1]:g} -> [-1, 1]"
        )
        return [
            f"orientation {spec['orientation']}",
            intensity,
            f"spacing {'x'.join(f'{v:g}' for v in self.spacing)} mm",
            f"crop/pad to {'x'.join(str(v) for v in self.image_size)}",
        ]


def grid_affine(axcodes: str, spacing: list[float], size: list[int]) -> np.ndarray:
    """Affine of a grid whose voxel axes run along ``axcodes`` (e.g. RAS), centred at the origin."""
    rows = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    affine = np.eye(4)
    for axis, code in enumerate(axcodes):
        column = np.zeros(3)
        column[rows[code]] = spacing[axis] if code in "RAS" else -spacing[axis]
        affine[:3, axis] = column
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(size, dtype=float) - 1.0) / 2.0)
    return affine
