"""Figures for report.html as base64 PNG data URIs (one self-contained file).

Images are encoded one by one (the HTML lays them out with their sample ids as text); plots use
Matplotlib's Agg backend. 3D images are shown by their middle axial slice.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Evidence",
    "image_uri",
    "class_grids",
    "closest_pairs",
    "reid_pairs",
    "dcr_histograms",
    "prdc_bars",
    "ms_ssim_histograms",
    "learning_curve_plot",
]


@dataclass
class Evidence:
    """Arrays behind report.html's figures (not written to report.json)."""

    grids: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    closest_pairs: list[dict[str, Any]] = field(default_factory=list)
    baseline_pair: dict[str, Any] | None = None
    dcr: dict[str, dict[str, Any]] = field(default_factory=dict)
    prdc: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    ms_ssim: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # Re-identification attack's closest matches: dicts with "synthetic", "train" (2D/3D arrays in
    # [-1, 1]), "synthetic_id", "train_id", "score" (higher = more confidently the same patient).
    reid_pairs: list[dict[str, Any]] = field(default_factory=list)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _data_uri(figure: Any) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plane(image: np.ndarray) -> np.ndarray:
    """A 2D view: the image itself, or the middle axial slice of a volume; transposed so rows run A-P."""
    plane = image if image.ndim == 2 else image[:, :, image.shape[2] // 2]
    return plane.T[::-1]


def image_uri(image: np.ndarray) -> str:
    """One image (2D, or a volume's middle axial slice) as a grey PNG data URI, [-1, 1] -> black..white.

    Written with ``matplotlib.image.imsave`` (no figure, no axes): fast enough for dozens of images.
    """
    from matplotlib import image as mpimg

    buffer = io.BytesIO()
    mpimg.imsave(buffer, _plane(image), cmap="gray", vmin=-1.0, vmax=1.0, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def class_grids(grids: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, list[str]]]:
    """Per class: data URIs of the real training images and of the synthetic images shown."""
    return {
        label: {name: [image_uri(image) for image in sets.get(name, [])] for name in ("real", "synthetic")}
        for label, sets in grids.items()
    }


def closest_pairs(pairs: list[dict[str, Any]], baseline: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows of (synthetic, nearest training image, |difference|) as data URIs with ids and distance.

    The last row (``baseline: True``) is the closest held-out-training pair: how close two
    different real subjects come.
    """
    rows = []
    for pair, is_baseline in [(pair, False) for pair in pairs] + ([(baseline, True)] if baseline is not None else []):
        difference = np.abs(pair["synthetic"] - pair["train"]) - 1.0  # |diff| in [0, 2] onto the [-1, 1] grey scale
        rows.append(
            {
                "baseline": is_baseline,
                "query_id": pair["synthetic_id"],
                "train_id": pair["train_id"],
                "distance": pair["distance"],
                "query": image_uri(pair["synthetic"]),
                "train": image_uri(pair["train"]),
                "difference": image_uri(difference),
            }
        )
    return rows


def reid_pairs(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The re-identification attack's closest matches: (synthetic, matched training image) data URIs with ids and score."""
    return [
        {
            "query_id": pair["synthetic_id"],
            "train_id": pair["train_id"],
            "score": pair.get("score"),
            "query": image_uri(pair["synthetic"]),
            "train": image_uri(pair["train"]),
        }
        for pair in pairs
    ]


def dcr_histograms(dcr: dict[str, dict[str, Any]]) -> str | None:
    """Per space: distances synthetic->train beside held-out->train, with the memorization threshold."""
    if not dcr:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(dcr), figsize=(4.4 * len(dcr), 3.0), squeeze=False)
    for axis, (name, entry) in zip(axes[0], dcr.items()):
        synthetic, holdout = entry["synthetic"], entry["holdout"]
        high = float(np.percentile(np.concatenate([synthetic, holdout]), 99.5)) or 1.0
        bins = np.linspace(0.0, high * 1.02, 40)
        axis.hist(synthetic, bins=bins, alpha=0.6, density=True, label=f"synthetic -> train (n={synthetic.size})")
        axis.hist(holdout, bins=bins, alpha=0.6, density=True, label=f"held-out real -> train (n={holdout.size})")
        axis.axvline(entry["threshold"], color="k", linestyle="--", linewidth=1, label="memorization threshold")
        axis.set_title(entry.get("title", name), fontsize=9)
        axis.set_xlabel("distance to closest training image", fontsize=8)
        axis.legend(fontsize=7)
    return _data_uri(figure)


def prdc_bars(prdc: dict[str, dict[str, dict[str, float | None]]]) -> str | None:
    """Precision/recall/density/coverage of synthetic vs the held-out reference, per feature space."""
    if not prdc:
        return None
    plt = _pyplot()
    keys = ("precision", "recall", "density", "coverage")
    figure, axes = plt.subplots(1, len(prdc), figsize=(4.2 * len(prdc), 2.9), squeeze=False)
    for axis, (space, groups) in zip(axes[0], prdc.items()):
        width = 0.8 / max(1, len(groups))
        for offset, (group, values) in enumerate(groups.items()):
            heights = [values.get(key) if values.get(key) is not None else 0.0 for key in keys]
            axis.bar(np.arange(len(keys)) + offset * width, heights, width=width, label=group)
        axis.set_xticks(np.arange(len(keys)) + width * (len(groups) - 1) / 2)
        axis.set_xticklabels(keys, fontsize=8)
        axis.axhline(1.0, color="grey", linewidth=0.6)
        axis.set_title(f"feature space {space}", fontsize=9)
        axis.legend(fontsize=7)
    return _data_uri(figure)


def ms_ssim_histograms(values: dict[str, dict[str, np.ndarray]]) -> str | None:
    """Per class: MS-SSIM of synthetic pairs beside real pairs (mass near 1 = near-duplicates)."""
    classes = [label for label, entry in values.items() if entry["synthetic"].size or entry["real"].size]
    if not classes:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(classes), figsize=(3.6 * len(classes), 2.6), squeeze=False)
    bins = np.linspace(0.0, 1.0, 26)
    for axis, label in zip(axes[0], classes):
        axis.hist(values[label]["synthetic"], bins=bins, alpha=0.6, density=True, label="synthetic pairs")
        axis.hist(values[label]["real"], bins=bins, alpha=0.6, density=True, label="real pairs")
        axis.set_title(f"class {label}", fontsize=9)
        axis.set_xlabel("MS-SSIM", fontsize=8)
        axis.legend(fontsize=7)
    return _data_uri(figure)


def learning_curve_plot(curve: Mapping[str, Any] | None) -> str | None:
    """Balanced accuracy of both arms against real subjects per class, and the gain, with 95% intervals.

    Drawn from ``utility.learning_curve`` as written to report.json (no evidence arrays needed).
    """
    points = list((curve or {}).get("points") or [])
    if not points:
        return None
    plt = _pyplot()
    sizes = np.array([point["per_class"] for point in points], dtype=float)
    figure, (left, right) = plt.subplots(1, 2, figsize=(8.8, 3.0))
    for offset, (key, name) in enumerate((("real_only", "real only"), ("real_plus_synthetic", "real + synthetic"))):
        values = np.array([point[key]["balanced_accuracy"] for point in points], dtype=float)
        low, high = _bounds(points, values, lambda point: (point[key].get("ci_low"), point[key].get("ci_high")))
        shifted = sizes * (1.0 + 0.04 * (offset - 0.5))  # side by side, so the intervals do not hide each other
        left.errorbar(shifted, values, yerr=[values - low, high - values], marker="o", capsize=3, label=name)
    left.set_xscale("log", base=2)
    left.set_xticks(sizes, [f"{size:g}" for size in sizes])
    left.set_xlabel("real training subjects per class", fontsize=8)
    left.set_ylabel("balanced accuracy (test)", fontsize=8)
    left.legend(fontsize=7)
    gains = np.array([point["gain"] for point in points], dtype=float)
    low, high = _bounds(points, gains, lambda point: (point.get("gain_ci_low"), point.get("gain_ci_high")))
    right.errorbar(sizes, gains, yerr=[gains - low, high - gains], marker="o", capsize=3, color="C2")
    right.axhline(0.0, color="grey", linewidth=0.8)
    right.set_xscale("log", base=2)
    right.set_xticks(sizes, [f"{size:g}" for size in sizes])
    right.set_xlabel("real training subjects per class", fontsize=8)
    right.set_ylabel("gain (real + synthetic - real only)", fontsize=8)
    return _data_uri(figure)


def _bounds(
    points: list[Mapping[str, Any]], values: np.ndarray, pick: Callable[[Mapping[str, Any]], tuple[Any, Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """Interval ends per point; a missing end collapses onto the value (no bar rather than a wrong one)."""
    ends = [pick(point) for point in points]
    low = np.array([v if lo is None else lo for v, (lo, _) in zip(values, ends)], dtype=float)
    high = np.array([v if hi is None else hi for v, (_, hi) in zip(values, ends)], dtype=float)
    return low, high
