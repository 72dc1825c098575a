"""Matplotlib figures for report.html, returned as base64 PNG data URIs (one self-contained file).

3D images are shown by their middle axial slice. Every figure uses the Agg backend (no display).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

__all__ = ["class_grids", "closest_pairs", "dcr_histograms", "prdc_bars", "ms_ssim_histograms"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _data_uri(figure: Any) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plane(image: np.ndarray) -> np.ndarray:
    """A 2D view: the image itself, or the middle axial slice of a volume; transposed so rows run A-P."""
    plane = image if image.ndim == 2 else image[:, :, image.shape[2] // 2]
    return plane.T[::-1]


def _show(axis: Any, image: np.ndarray | None, title: str = "") -> None:
    axis.axis("off")
    if image is not None:
        axis.imshow(_plane(image), cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
    if title:
        axis.set_title(title, fontsize=7)


def class_grids(grids: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
    """One figure per class: a row of real training images above a row of synthetic ones."""
    plt = _pyplot()
    figures = {}
    for label, sets in grids.items():
        columns = max(1, max(len(images) for images in sets.values()))
        figure, axes = plt.subplots(2, columns, figsize=(1.1 * columns + 0.6, 2.6), squeeze=False)
        for row, name in enumerate(("real", "synthetic")):
            images = sets.get(name, np.zeros((0,)))
            for column in range(columns):
                _show(axes[row, column], images[column] if column < len(images) else None)
            axes[row, 0].text(-0.15, 0.5, name, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
        figure.suptitle(f"class {label}: real training images (top) vs synthetic (bottom)", fontsize=9)
        figures[label] = _data_uri(figure)
    return figures


def closest_pairs(pairs: list[dict[str, Any]], baseline: dict[str, Any] | None) -> str | None:
    """Synthetic image | its nearest training image | |difference|, closest first; baseline row last."""
    rows = list(pairs) + ([baseline] if baseline is not None else [])
    if not rows:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(len(rows), 3, figsize=(4.6, 1.55 * len(rows)), squeeze=False)
    for row, pair in enumerate(rows):
        is_baseline = baseline is not None and row == len(rows) - 1
        left = "held-out real" if is_baseline else "synthetic"
        _show(axes[row, 0], pair["synthetic"], f"{left} {pair['synthetic_id']}")
        _show(axes[row, 1], pair["train"], f"nearest train {pair['train_id']}")
        difference = np.abs(pair["synthetic"] - pair["train"]) - 1.0  # map |diff| in [0, 2] to the [-1, 1] colour range
        _show(axes[row, 2], difference, f"|difference|, RMS {pair['distance']:.3f}")
    figure.suptitle("closest synthetic-training pairs (last row: closest held-out-training pair, the baseline)", fontsize=8)
    return _data_uri(figure)


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
