"""Preprocessing guards: measure what the preprocessing does to the real images before training on them.

Three guards, each on the fingerprint's sample of training images (:func:`run_guards`):

- **clipping:** the share of foreground voxels the intensity mapping saturates at either end
  (a window that misses the data's range maps organs and lesions to one flat value);
- **foreground on the canvas:** the foreground's box on the model grid against the canvas (a
  spacing too coarse shrinks the body into a few pixels) and the share of the foreground the crop
  cuts off (a grid too small for the field of view);
- **class signal:** a quick probe, a logistic regression on downsampled images and intensity
  quantiles with subject-grouped cross-validation, that separates the classes on the source images
  but no longer on the preprocessed ones.

A failed guard names the measured figure, the limit and the config key that fixes it. The stage
(``pipeline.planning.stage``) decides whether that stops training (``model.guards``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import zoom

from pipeline.imaging.preprocess import Preprocessor
from pipeline.planning.fingerprint import LoadedImage, foreground_mask, to_ras

__all__ = [
    "MAX_CLIPPED",
    "MIN_CANVAS_SHARE",
    "MIN_FOREGROUND_PIXELS",
    "MAX_CUT",
    "MIN_SOURCE_ACCURACY",
    "MAX_SIGNAL_DROP",
    "MIN_PROBE_SUBJECTS",
    "Guard",
    "GuardReport",
    "ProbeImages",
    "run_guards",
]

# Share of the foreground saturated at one end of the intensity range above which the mapping
# destroys it (a soft-tissue CT window saturates bone, a few percent of a body).
MAX_CLIPPED = 0.25
# The foreground box's larger side must cover this share of the canvas, and this many pixels.
MIN_CANVAS_SHARE = 0.4
MIN_FOREGROUND_PIXELS = 16
# Share of the foreground (area in mm^2 / volume in mm^3) the crop may cut off.
MAX_CUT = 0.15
# Class-signal probe: it must separate the source images at least this well (balanced accuracy)
# for its verdict to mean anything, and the preprocessed images may lose at most this much.
MIN_SOURCE_ACCURACY = 0.75
MAX_SIGNAL_DROP = 0.2
MIN_PROBE_SUBJECTS = 4
_PROBE_SIDE = 16
_PROBE_SLICES = 4
_QUANTILES = np.linspace(0.02, 0.98, 13)


@dataclass
class Guard:
    """One guard's verdict.

    Attributes:
        name: ``clipping``, ``canvas``, ``cut_off`` or ``class_signal``.
        status: ``pass``, ``fail`` or ``not_run``.
        value: the measured figure (None when not run).
        limit: the limit it is compared with.
        message: what was measured and, for a failure, the fix.
    """

    name: str
    status: str
    value: float | None
    limit: float
    message: str


@dataclass
class ProbeImages:
    """Preprocessed real images of the sample, per class, for the grid users look at."""

    images: list[np.ndarray] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


@dataclass
class GuardReport:
    """Every guard's verdict, plus the probe's figures and the preprocessed sample."""

    guards: list[Guard]
    probe: dict[str, Any]
    preview: ProbeImages

    @property
    def failed(self) -> list[Guard]:
        """The guards that fired."""
        return [guard for guard in self.guards if guard.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        """plan.json's ``guards``."""
        return {"guards": [asdict(guard) for guard in self.guards], "probe": self.probe}

    def lines(self) -> list[str]:
        """One line per guard."""
        words = {"pass": "ok", "fail": "FAIL", "not_run": "not run"}
        return ["Preprocessing guards:"] + [
            f"  {guard.name:<13} {words[guard.status]:<8} {guard.message}" for guard in self.guards
        ]


@dataclass
class _Measured:
    """Per-image measurements of the guards."""

    clipped_low: list[float] = field(default_factory=list)
    clipped_high: list[float] = field(default_factory=list)
    canvas_share: list[float] = field(default_factory=list)
    pixels: list[float] = field(default_factory=list)
    extent_mm: list[float] = field(default_factory=list)
    cut: list[float] = field(default_factory=list)
    source_features: list[np.ndarray] = field(default_factory=list)
    grid_features: list[np.ndarray] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)


def _features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Probe features of one 2D image: its pixels downsampled, and quantiles of its foreground values."""
    factors = (_PROBE_SIDE / image.shape[0], _PROBE_SIDE / image.shape[1])
    small = zoom(image, factors, order=1)[:_PROBE_SIDE, :_PROBE_SIDE]
    values = image[mask] if mask.any() else image.ravel()
    return np.concatenate([small.ravel(), np.quantile(values, _QUANTILES)]).astype(np.float64)


def _slice_indices(mask: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` evenly spaced slice indices (last axis) that hold foreground."""
    holding = np.flatnonzero(mask.reshape(-1, mask.shape[2]).mean(axis=0) > 0.05)
    if holding.size == 0:
        holding = np.arange(mask.shape[2])
    picks = np.linspace(0, holding.size - 1, min(count, holding.size)).round().astype(int)
    return sorted({int(holding[pick]) for pick in picks})


def _measure(
    image: LoadedImage,
    modality: str,
    pre: Preprocessor,
    source_range: tuple[float, float],
    out: _Measured,
    preview: ProbeImages,
) -> None:
    """Measure one image: clipping, foreground on the grid, probe features and a preview slice."""
    data, affine = image.data, image.affine
    mask = foreground_mask(data, modality)
    scaled = pre.scale(data)
    if mask.any():
        out.clipped_low.append(float((scaled[mask] <= -1.0 + 1e-6).mean()))
        out.clipped_high.append(float((scaled[mask] >= 1.0 - 1e-6).mean()))
    grid = pre.resample(scaled, affine)
    grid_mask = pre.resample(mask.astype(np.float32) * 2.0 - 1.0, affine) > 0.0
    if grid.ndim == 2:
        grid, grid_mask = grid[:, :, None], grid_mask[:, :, None]

    _ras_data, native = to_ras(data, affine)
    dims = pre.spatial_dims
    grid_spacing = list(pre.spacing) + ([native[2]] if dims == 2 else [])
    source_amount = float(mask.sum()) * float(np.prod(native))
    kept_amount = float(grid_mask.sum()) * float(np.prod(grid_spacing))
    if source_amount > 0:
        out.cut.append(max(0.0, 1.0 - kept_amount / source_amount))
    if grid_mask.any():
        coords = np.nonzero(grid_mask)
        axes = range(3) if dims == 3 else range(2)
        extents = [float(coords[axis].max() - coords[axis].min() + 1) for axis in axes]
        shares = [extent / grid_mask.shape[axis] for axis, extent in zip(axes, extents)]
        largest = int(np.argmax(shares))
        out.canvas_share.append(shares[largest])
        out.pixels.append(extents[largest])
        out.extent_mm.append(extents[largest] * grid_spacing[largest])
    else:
        out.canvas_share.append(0.0)
        out.pixels.append(0.0)
        out.extent_mm.append(0.0)

    # Probe: the same slices before (source units, one linear map for the dataset) and after.
    ras, _ = to_ras(data, affine)
    ras_mask = foreground_mask(ras, modality)
    low, high = source_range
    label, group = str(image.row["label"]), str(image.row["subject_id"])
    if dims == 2:
        pairs = [(ras[:, :, k], ras_mask[:, :, k], grid[:, :, k], grid_mask[:, :, k]) for k in _slice_indices(ras_mask, _PROBE_SLICES)]
    else:
        source_k = _slice_indices(ras_mask, 3)
        grid_k = _slice_indices(grid_mask, 3)
        pairs = [
            (ras[:, :, s], ras_mask[:, :, s], grid[:, :, g], grid_mask[:, :, g]) for s, g in zip(source_k, grid_k)
        ]
    for source_slice, source_mask, grid_slice, slice_mask in pairs:
        out.source_features.append(_features((source_slice - low) / max(high - low, 1e-6), source_mask))
        out.grid_features.append(_features(grid_slice, slice_mask))
        out.labels.append(label)
        out.groups.append(group)
    middle = pairs[len(pairs) // 2][2]
    preview.images.append(np.asarray(middle, dtype=np.float32))
    preview.labels.append(label)


def _probe(features: list[np.ndarray], labels: list[str], groups: list[str], seed: int) -> float:
    """Out-of-fold balanced accuracy of a logistic regression, folds grouped by subject."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.nan_to_num(np.asarray(features))
    y = np.asarray(labels)
    group_array = np.asarray(groups)
    folds = min(5, len(set(groups)))
    predicted = np.empty_like(y)
    for train, test in GroupKFold(n_splits=folds).split(x, y, group_array):
        if len(set(y[train])) < 2:
            predicted[test] = y[train][0]
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant features (a saturated image) warn in the scaler
            model.fit(x[train], y[train])
        predicted[test] = model.predict(x[test])
    return float(balanced_accuracy_score(y, predicted))


def _clipping_guard(measured: _Measured, spec: dict[str, Any], intensity_p: dict[str, float], modality: str) -> Guard:
    if not measured.clipped_high:
        return Guard("clipping", "not_run", None, MAX_CLIPPED, "no foreground found in the sample")
    low, high = float(np.mean(measured.clipped_low)), float(np.mean(measured.clipped_high))
    worst = max(low, high)
    if spec["intensity"] == "ct":
        mapping = f"the window {spec['window'][0]:g}..{spec['window'][1]:g}"
        if modality != "CT":
            fix = "the images are not in HU: set model.intensity: mr (or auto) to scale each image by its percentiles"
        else:
            fix = (
                f"set model.window to cover the foreground (its [0.5, 99.5] HU percentiles are "
                f"{intensity_p['p0.5']:.4g}..{intensity_p['p99.5']:.4g}), or model.window: auto"
            )
    else:
        mapping = f"the per-image percentiles {spec['percentiles'][0]:g}..{spec['percentiles'][1]:g}"
        fix = "widen model.percentiles (e.g. [0.5, 99.5]), or model.percentiles: auto"
    measured_text = f"{mapping} saturates {low:.0%} of the foreground at the bottom and {high:.0%} at the top"
    if worst > MAX_CLIPPED:
        return Guard(
            "clipping", "fail", round(worst, 4), MAX_CLIPPED,
            f"{measured_text} (limit {MAX_CLIPPED:.0%}): organs and lesions become one flat value. Fix: {fix}.",
        )
    return Guard("clipping", "pass", round(worst, 4), MAX_CLIPPED, f"{measured_text} (limit {MAX_CLIPPED:.0%} at either end)")


def _canvas_guards(measured: _Measured, spec: dict[str, Any]) -> list[Guard]:
    share = float(np.median(measured.canvas_share))
    pixels = float(np.median(measured.pixels))
    extent = float(np.max(measured.extent_mm)) if measured.extent_mm else 0.0
    size = spec["image_size"]
    spacing = spec["spacing"]
    grid_text = f"{'x'.join(str(v) for v in size)} grid of {'x'.join(f'{v:g}' for v in spacing)} mm"
    measured_text = f"the foreground spans {share:.0%} of the {grid_text} ({pixels:.0f} pixels along its larger side)"
    if share < MIN_CANVAS_SHARE or pixels < MIN_FOREGROUND_PIXELS:
        finer = extent / max(size) if extent > 0 else None
        hint = f" (about {finer:.2g} mm fills the grid)" if finer else ""
        canvas = Guard(
            "canvas", "fail", round(share, 4), MIN_CANVAS_SHARE,
            f"{measured_text}; limits {MIN_CANVAS_SHARE:.0%} and {MIN_FOREGROUND_PIXELS} pixels: the anatomy shrinks to "
            f"a few pixels. Fix: a finer model.spacing{hint}, or model.spacing: auto and model.image_size: auto.",
        )
    else:
        canvas = Guard("canvas", "pass", round(share, 4), MIN_CANVAS_SHARE, measured_text)
    cut = float(np.mean(measured.cut)) if measured.cut else 0.0
    cut_text = f"the crop to the {grid_text} cuts off {cut:.0%} of the foreground"
    if cut > MAX_CUT:
        cut_guard = Guard(
            "cut_off", "fail", round(cut, 4), MAX_CUT,
            f"{cut_text} (limit {MAX_CUT:.0%}). Fix: a larger model.image_size or a coarser model.spacing "
            "(or both auto: the plan fits the field of view).",
        )
    else:
        cut_guard = Guard("cut_off", "pass", round(cut, 4), MAX_CUT, f"{cut_text} (limit {MAX_CUT:.0%})")
    return [canvas, cut_guard]


def _signal_guard(measured: _Measured, seed: int) -> tuple[Guard, dict[str, Any]]:
    per_class: dict[str, set[str]] = {}
    for label, group in zip(measured.labels, measured.groups):
        per_class.setdefault(label, set()).add(group)
    fewest = min((len(groups) for groups in per_class.values()), default=0)
    if len(per_class) < 2 or fewest < MIN_PROBE_SUBJECTS:
        return (
            Guard("class_signal", "not_run", None, MAX_SIGNAL_DROP,
                  f"needs 2 classes with at least {MIN_PROBE_SUBJECTS} sampled subjects each (fewest: {fewest})"),
            {"source": None, "preprocessed": None, "images": len(measured.labels)},
        )
    source = _probe(measured.source_features, measured.labels, measured.groups, seed)
    grid = _probe(measured.grid_features, measured.labels, measured.groups, seed)
    probe = {"source": round(source, 4), "preprocessed": round(grid, 4), "images": len(measured.labels)}
    text = (
        f"a logistic-regression probe (subject-grouped folds, {len(measured.labels)} images) reads the classes at "
        f"balanced accuracy {source:.2f} on the source images and {grid:.2f} after preprocessing"
    )
    drop = source - grid
    if source < MIN_SOURCE_ACCURACY:
        return Guard("class_signal", "pass", round(drop, 4), MAX_SIGNAL_DROP,
                     f"{text}; the probe does not separate the source images, so it cannot judge"), probe
    if drop > MAX_SIGNAL_DROP:
        return (
            Guard("class_signal", "fail", round(drop, 4), MAX_SIGNAL_DROP,
                  f"{text} (a drop above {MAX_SIGNAL_DROP:g}): the preprocessing removes what tells the classes apart. "
                  "Fix: check model.intensity/window/percentiles and model.spacing against the data (auto plans them)."),
            probe,
        )
    return Guard("class_signal", "pass", round(drop, 4), MAX_SIGNAL_DROP, text), probe


def run_guards(
    sample: list[LoadedImage], spec: dict[str, Any], modality: str, intensity_p: dict[str, float], seed: int = 0
) -> GuardReport:
    """Measure the preprocessing ``spec`` on ``sample`` and judge it.

    Args:
        sample: training images read by :func:`pipeline.planning.fingerprint.load_sample`.
        spec: the resolved preprocessing spec (:func:`pipeline.imaging.preprocess.build_spec`).
        modality: the fingerprint's modality (decides what foreground is).
        intensity_p: the fingerprint's pooled foreground percentiles (for the fix's figures).
        seed: seed of the probe.
    """
    pre = Preprocessor(spec)
    pooled = np.concatenate([image.data.ravel()[:: max(1, image.data.size // 20000)] for image in sample])
    source_range = (float(np.percentile(pooled, 0.5)), float(np.percentile(pooled, 99.5)))
    measured, preview = _Measured(), ProbeImages()
    for image in sample:
        _measure(image, modality, pre, source_range, measured, preview)
    guards = [_clipping_guard(measured, spec, intensity_p, modality), *_canvas_guards(measured, spec)]
    signal, probe = _signal_guard(measured, seed)
    guards.append(signal)
    return GuardReport(guards, probe, preview)
