"""Per-class sample grids (PNG, one row per class, radiological display orientation) and the loss plot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.core.files import atomic_path

__all__ = ["save_sample_grid", "save_loss_plot", "display_slice"]


def display_slice(image: np.ndarray) -> np.ndarray:
    """A 2D image (or the middle axial slice of a 3D one) indexed [x, y] in RAS, as rows x columns for display.

    Radiological convention: the patient's right on the image's left, anterior at the top.
    """
    if image.ndim == 3:
        image = image[:, :, image.shape[2] // 2]
    return image.T[::-1, ::-1]


def save_sample_grid(
    images: torch.Tensor | np.ndarray,
    labels: list[str],
    path: str | os.PathLike[str],
    per_class: int,
    scale: int = 2,
) -> Path:
    """Write ``images`` ((len(labels) * per_class, 1, *spatial) in [-1, 1], class-major) as one PNG.

    Each row is one class, labelled on the left.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    array = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    tiles = [display_slice(array[i, 0]) for i in range(len(array))]
    height, width = tiles[0].shape
    pad = 2
    canvas = np.full((len(labels) * (height + pad) + pad, per_class * (width + pad) + pad), -1.0, dtype=np.float32)
    for index, tile in enumerate(tiles):
        row, col = divmod(index, per_class)
        top, left = pad + row * (height + pad), pad + col * (width + pad)
        canvas[top : top + height, left : left + width] = tile
    dpi = 100
    figure = plt.figure(figsize=(canvas.shape[1] * scale / dpi + 0.9, canvas.shape[0] * scale / dpi), dpi=dpi)
    axes = figure.add_axes((0.9 / (canvas.shape[1] * scale / dpi + 0.9), 0, 1 - 0.9 / (canvas.shape[1] * scale / dpi + 0.9), 1))
    axes.imshow(canvas, cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([pad + row * (height + pad) + height / 2 for row in range(len(labels))])
    axes.set_yticklabels(labels, fontsize=8)
    for spine in axes.spines.values():
        spine.set_visible(False)
    target = Path(path)
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    plt.close(figure)
    return target


def save_loss_plot(losses: dict[str, list[float]], path: str | os.PathLike[str]) -> Path | None:
    """Write the discriminator's and generator's loss per step (``losses.csv`` columns) as one PNG.

    Args:
        losses: ``step`` and one list per statistic, as :func:`pipeline.contracts.model.read_losses` gives.
        path: the PNG to write.

    Returns:
        The path, or None when there is no step to plot.
    """
    steps = losses.get("step") or []
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.0, 2.8), dpi=100)
    for name in ("loss_d", "loss_g"):
        if name in losses:
            axes.plot(steps, losses[name], linewidth=0.8, label=name)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return target
