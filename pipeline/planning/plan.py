"""The training plan: every ``auto`` key of the ``model:`` section, derived from the fingerprint.

Each planned value carries its reason (a sentence naming the measured figure it comes from);
explicit config values win and are recorded as such. The rules (docs/models.md, "Planning"):

- **2D vs 3D:** 2D for single-frame images, anisotropic or thin volumes, and whenever the compute
  budget is a CPU (a 3D GAN at the field of view does not train in minutes there); 3D only for
  near-isotropic volumes of at least :data:`MIN_3D_SLICES` slices with a GPU.
- **Spacing and size:** the field of view is the largest sampled foreground box plus
  :data:`FOV_MARGIN`; the spacing is the native one, coarsened until the field of view fits the
  budget's longest side; the size is the field of view at that spacing, rounded up to what the
  networks' 2x levels need (:func:`pipeline.imaging.levels.network_levels`).
- **Intensity:** CT keeps HU, windowed to the foreground's central 90% of HU plus a margin
  (:func:`ct_window`, never past the [0.5, 99.5] percentiles nnU-Net clips CT to); every other
  modality is scaled per image by its own percentiles.
- **Batch, augmentation, budget:** a batch of 32 (64 on a GPU) capped at a quarter of the training
  images; no brightness/contrast jitter on HU; ``max_steps`` stays ``auto`` (the train stage stops
  on convergence of its validation criterion) and ``max_minutes`` is the time budget, a multiple of
  the expected time of :data:`EPOCHS` passes; with a step count set, ``max_minutes`` is a safety cap.

This module computes only: it takes the config section as a plain pydantic model (the planning
layer sits below the stages) and returns a resolved copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.imaging.levels import network_levels
from pipeline.planning.fingerprint import Fingerprint

__all__ = [
    "AUTO",
    "FOV_MARGIN",
    "EPOCHS",
    "MIN_STEPS",
    "MAX_STEPS",
    "MIN_3D_SLICES",
    "CT_WINDOW_MARGIN",
    "Budget",
    "Planned",
    "Plan",
    "compute_budget",
    "ct_window",
    "make_plan",
    "network_size",
]

AUTO = "auto"
# The field of view is the largest foreground box plus this share: room for translation
# augmentation and for a subject a little larger than the sampled ones.
FOV_MARGIN = 0.10
# Passes over the (2D: slice) training images; the demo's tuned 1,200 steps are ~50 passes.
EPOCHS = 50
MIN_STEPS = 600
MAX_STEPS = 4000
MIN_3D_SLICES = 32
# The CT window's margin beyond the foreground's central 90% of HU, as a share of that range's width.
CT_WINDOW_MARGIN = 0.25
# Seconds per step per unit of step work (images x voxels x widest network) measured for the demo
# recipe on one CPU thread, and the multiple of the expected time the safety cap allows.
_SECONDS_PER_WORK = 0.06 / (32 * 64 * 48 * 8)
_TIME_CAP_FACTOR = 6.0
_MIN_MINUTES = 10.0
# With convergence as the step budget, max_minutes is the budget itself: this multiple of the
# expected time of EPOCHS passes, within these bounds (minutes).
_BUDGET_FACTOR = 3.0
_MIN_BUDGET = 5.0
_MAX_BUDGET = 30.0


@dataclass(frozen=True)
class Budget:
    """What the machine allows: the device and the longest side of the network grid."""

    device: str
    max_side: int
    max_side_3d: int

    def describe(self) -> str:
        """One phrase for the reasons."""
        return f"{self.device.upper()} budget: longest side {self.max_side} pixels"


def compute_budget(device_setting: str) -> Budget:
    """The budget for ``model.device`` (``auto`` means CUDA when present)."""
    cuda = False
    if device_setting != "cpu":
        import torch  # noqa: PLC0415 - only to ask whether a GPU is present

        cuda = bool(torch.cuda.is_available())
    return Budget("cuda", 128, 64) if cuda else Budget("cpu", 64, 32)


@dataclass(frozen=True)
class Planned:
    """One planned key: its value, why, and whether the plan or the config decided it."""

    value: Any
    reason: str
    source: str = "plan"


@dataclass
class Plan:
    """The plan of one training run: a value and a reason per planned key, and the fingerprint."""

    values: dict[str, Planned]
    fingerprint: Fingerprint
    budget: Budget
    notes: list[str] = field(default_factory=list)

    def updates(self) -> dict[str, Any]:
        """The keys the plan decided (``auto`` in the config) and their values."""
        return {key: item.value for key, item in self.values.items() if item.source == "plan"}

    def to_dict(self) -> dict[str, Any]:
        """plan.json's ``plan`` and ``fingerprint`` (JSON-ready)."""
        return {
            "budget": {"device": self.budget.device, "max_side": self.budget.max_side},
            "plan": {
                key: {"value": item.value, "source": item.source, "reason": item.reason} for key, item in self.values.items()
            },
            "notes": list(self.notes),
            "fingerprint": self.fingerprint.to_dict(),
        }

    def lines(self) -> list[str]:
        """One line per key: ``key = value  (source: reason)``."""
        lines = ["Plan (auto keys from the fingerprint; explicit config values win):"]
        for key, item in self.values.items():
            value = _show(item.value)
            lines.append(f"  {key:<13} {value:<16} {'[config] ' if item.source == 'config' else ''}{item.reason}")
        lines += [f"  note: {note}" for note in self.notes]
        return lines


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return "null" if value is None else str(value)


def network_size(fov_mm: list[float], spacing: list[float], minimum: int = 16) -> list[int]:
    """Voxels covering ``fov_mm`` at ``spacing``, each side rounded up to the networks' 2x levels."""
    size = [max(minimum, math.ceil(fov / step - 1e-6)) for fov, step in zip(fov_mm, spacing)]
    for _ in range(4):  # rounding up can add a level; a few passes settle it
        multiple = 2 ** network_levels(size)
        rounded = [math.ceil(side / multiple) * multiple for side in size]
        if rounded == size:
            break
        size = rounded
    return size


def _nice_spacing(value: float) -> float:
    """Round a spacing up to a readable step (0.05 mm above 1 mm, 0.01 mm below)."""
    step = 0.05 if value >= 1.0 else 0.01
    return round(math.ceil(value / step - 1e-9) * step, 4)


def _spatial_dims(fp: Fingerprint, budget: Budget) -> Planned:
    in_plane = max(fp.spacing[0]["median"], fp.spacing[1]["median"])
    slices, through = fp.shape[2]["median"], fp.spacing[2]["median"]
    if fp.single_frame >= 0.5:
        return Planned(2, f"{fp.single_frame:.0%} of the images are single-frame 2D images")
    if budget.device == "cpu":
        return Planned(2, "2D slices: a 3D GAN at this field of view does not train in minutes on a CPU")
    if slices < MIN_3D_SLICES:
        return Planned(2, f"volumes of {slices:g} slices (3D needs at least {MIN_3D_SLICES})")
    if through > 2.0 * in_plane:
        return Planned(2, f"anisotropic volumes: {through:g} mm slices vs {in_plane:g} mm in-plane")
    return Planned(3, f"near-isotropic volumes of {slices:g} slices and a GPU")


def _geometry(fp: Fingerprint, config: Any, dims: int, budget: Budget) -> tuple[Planned, Planned]:
    """Spacing and image size: the foreground field of view at the coarsest spacing the budget needs."""
    fov = [axis["max"] * (1.0 + FOV_MARGIN) for axis in fp.foreground_extent_mm[:dims]]
    fov = [value if value > 0 else fp.shape[axis]["median"] * fp.spacing[axis]["median"] for axis, value in enumerate(fov)]
    native = [axis["median"] for axis in fp.spacing[:dims]]
    max_side = budget.max_side if dims == 2 else budget.max_side_3d
    fov_text = "x".join(f"{value:.0f}" for value in fov)
    explicit_size = isinstance(config.image_size, list) and len(config.image_size) == dims
    if config.spacing is None:
        spacing_value = [round(v, 4) for v in native]
        spacing = Planned(None, "null in the config: the median native spacing", "config")
    elif config.spacing != AUTO:
        spacing_value = [float(v) for v in config.spacing]
        spacing = Planned(spacing_value, "set in the config", "config")
    elif explicit_size:
        # A given grid: the spacing that fits the field of view into it (the same in-plane).
        ratio = max(f / s for f, s in zip(fov[:2], config.image_size[:2]))
        spacing_value = [_nice_spacing(max(ratio, min(native[:2])))] * 2
        if dims == 3:
            spacing_value.append(_nice_spacing(max(fov[2] / config.image_size[2], native[2])))
        spacing = Planned(spacing_value, f"fits the {fov_text} mm foreground field of view into the configured grid")
    else:
        base = min(native[:2])
        value = _nice_spacing(max(base, max(fov[:2]) / max_side))
        spacing_value = [value, value]
        if dims == 3:
            spacing_value.append(_nice_spacing(max(native[2], fov[2] / max_side)))
        reason = (
            f"native {base:.3g} mm: the field of view fits {max_side} pixels ({budget.describe()})"
            if value <= base + 1e-6
            else f"coarsened from the native {base:.3g} mm so the {fov_text} mm field of view fits {max_side} pixels "
            f"({budget.describe()})"
        )
        spacing = Planned(spacing_value, reason)
    if explicit_size:
        size = Planned(list(config.image_size), "set in the config", "config")
    else:
        size_value = network_size(fov, spacing_value)
        reason = (
            f"the foreground field of view {fov_text} mm (largest box + {FOV_MARGIN:.0%}) at "
            f"{'x'.join(f'{v:g}' for v in spacing_value)} mm, rounded up to a multiple of "
            f"{2 ** network_levels(size_value)} for the networks' {network_levels(size_value)} 2x levels"
        )
        size = Planned(size_value, reason)
    return spacing, size


def ct_window(percentiles: dict[str, float]) -> list[float]:
    """The planned CT window from the foreground's pooled HU percentiles.

    The bulk of the foreground (its central 90%) fills the window, with a margin of
    :data:`CT_WINDOW_MARGIN` of that width on each side; the window never reaches past the [0.5, 99.5]
    percentiles that nnU-Net clips CT to. The outer tails (gas, bone, contrast agent: a few percent of
    a body) saturate, which keeps the contrast between the tissues that make up most of the image (a
    liver lesion 70 HU below the liver) at two to three times what the full [0.5, 99.5] range gives
    it; the clipping guard checks that saturation on the sample.
    """
    bulk_low, bulk_high = percentiles["p5"], percentiles["p95"]
    margin = CT_WINDOW_MARGIN * max(bulk_high - bulk_low, 0.0)
    low = math.floor(max(percentiles["p0.5"], bulk_low - margin) / 10.0) * 10.0
    high = math.ceil(min(percentiles["p99.5"], bulk_high + margin) / 10.0) * 10.0
    return [low, high if high > low else low + 10.0]


def _intensity(fp: Fingerprint, config: Any) -> tuple[Planned, Planned, Planned]:
    p = fp.intensity
    if config.intensity != AUTO:
        intensity = Planned(config.intensity, "set in the config", "config")
    elif fp.is_ct:
        intensity = Planned("ct", f"CT (from {fp.modality_source}): HU are absolute, one window for every image")
    else:
        what = fp.modality or "no recorded modality and no HU air"
        intensity = Planned("mr", f"{what}: no absolute intensity scale, so each image is scaled by its own percentiles")
    if config.window != AUTO:
        window = Planned(list(config.window), "set in the config", "config")
    elif intensity.value == "ct":
        window = Planned(ct_window(p), (
            f"the foreground's central 90% of HU ({p['p5']:.0f}..{p['p95']:.0f}) widened by "
            f"{CT_WINDOW_MARGIN:.0%} of that width on each side, within its [0.5, 99.5] percentiles "
            f"({p['p0.5']:.0f}..{p['p99.5']:.0f}), rounded out to 10 HU"
        ))
    else:
        window = Planned([-160.0, 240.0], "unused: intensity is per-image percentiles")
    if config.percentiles != AUTO:
        percentiles = Planned(list(config.percentiles), "set in the config", "config")
    elif intensity.value == "mr":
        percentiles = Planned([0.5, 99.5], "per image; the brightest 0.5% (a small bright lesion) stays inside the range")
    else:
        percentiles = Planned([1.0, 99.0], "unused: intensity is a CT window")
    return intensity, window, percentiles


def _training_images(fp: Fingerprint, dims: int) -> int:
    """Expected number of training images: 2D takes every slice that holds foreground."""
    if dims == 3:
        return fp.n_images
    slices = fp.shape[2]["median"] * fp.n_images * max(fp.slices_with_foreground, 1.0 / max(fp.shape[2]["median"], 1))
    return max(1, int(round(slices)))


def make_plan(fp: Fingerprint, config: Any, budget: Budget) -> Plan:
    """Plan every ``auto`` key of ``config`` (a ModelConfig) from the fingerprint ``fp``.

    Returns:
        The plan; :meth:`Plan.updates` gives the values to put into the config.
    """
    values: dict[str, Planned] = {}
    dims_item = (
        Planned(config.spatial_dims, "set in the config", "config")
        if config.spatial_dims != AUTO
        else _spatial_dims(fp, budget)
    )
    dims = int(dims_item.value)
    values["spatial_dims"] = dims_item
    spacing, size = _geometry(fp, config, dims, budget)
    values["spacing"], values["image_size"] = spacing, size
    values["intensity"], values["window"], values["percentiles"] = _intensity(fp, config)

    n_images = _training_images(fp, dims)
    if config.batch_size != AUTO:
        values["batch_size"] = Planned(config.batch_size, "set in the config", "config")
    else:
        base = 64 if budget.device == "cuda" else 32
        cap = max(4, 2 ** int(math.log2(max(4, n_images // 4))))
        batch = min(base, cap)
        reason = f"{base} on a {budget.device.upper()}" + (
            f", capped at {batch} so an epoch of ~{n_images} images has at least 4 batches" if batch < base else ""
        )
        values["batch_size"] = Planned(batch, reason)
    batch = int(values["batch_size"].value)

    if config.augment != AUTO:
        values["augment"] = Planned(
            list(config.augment) if isinstance(config.augment, list) else config.augment, "set in the config", "config"
        )
    elif values["intensity"].value == "ct":
        values["augment"] = Planned(
            ["translation", "cutout"], "HU are absolute: no brightness/contrast jitter that would teach wrong densities"
        )
    else:
        values["augment"] = Planned(
            ["translation", "cutout", "brightness", "contrast"],
            "per-image intensity scaling has no absolute units, so brightness/contrast jitter is plausible",
        )

    passes = EPOCHS * n_images / batch
    expected_steps = int(min(MAX_STEPS, max(MIN_STEPS, round(passes / 100.0) * 100)))
    if config.max_steps != AUTO:
        values["max_steps"] = Planned(config.max_steps, "set in the config", "config")
    else:
        # Convergence is the step budget (the train stage stops on a validation plateau, model.patience).
        values["max_steps"] = Planned(
            AUTO,
            f"convergence: training stops when the validation criterion stops improving, within max_minutes "
            f"({EPOCHS} passes over ~{n_images} training images at batch {batch} would be ~{expected_steps} steps)",
        )
    if config.max_minutes != AUTO:
        values["max_minutes"] = Planned(config.max_minutes, "set in the config", "config")
    else:
        voxels = math.prod(size.value)
        work = batch * voxels * max(int(config.g_width), int(config.d_width))
        steps_value = values["max_steps"].value
        counted = isinstance(steps_value, int)
        expected = (steps_value if counted else expected_steps) * work * _SECONDS_PER_WORK / 60.0
        if counted:
            minutes = float(max(_MIN_MINUTES, math.ceil(_TIME_CAP_FACTOR * expected)))
            reason = (
                f"safety cap: {_TIME_CAP_FACTOR:g}x the ~{expected:.1f} min the planned steps take on one CPU thread "
                f"(at least {_MIN_MINUTES:g})"
            )
        else:
            minutes = float(min(_MAX_BUDGET, max(_MIN_BUDGET, math.ceil(_BUDGET_FACTOR * expected))))
            reason = (
                f"the time budget: {_BUDGET_FACTOR:g}x the ~{expected:.1f} min {EPOCHS} passes take on one CPU thread, "
                f"within [{_MIN_BUDGET:g}, {_MAX_BUDGET:g}]"
            )
        values["max_minutes"] = Planned(minutes, reason)
    notes = []
    if fp.single_frame >= 0.5 and dims == 3:
        notes.append("single-frame images with spatial_dims 3: each image is a one-slice volume")
    return Plan(values, fp, budget, notes)
