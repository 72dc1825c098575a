"""The grid of preprocessed real images per class (``MODEL_DIR/preprocessed.png``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.core.files import atomic_path

__all__ = ["save_preprocessed_grid"]


def save_preprocessed_grid(
    images: list[np.ndarray], labels: list[str], path: str | os.PathLike[str], per_class: int = 8
) -> Path:
    """One row per class of up to ``per_class`` preprocessed images ([-1, 1] shown as black..white).

    Images are shown in radiological display (the patient's right on the left, anterior at the top),
    as the training sample grids are.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    classes = sorted(set(labels))
    columns = max(1, min(per_class, max((labels.count(label) for label in classes), default=1)))
    figure, axes = plt.subplots(
        len(classes), columns, figsize=(1.4 * columns + 0.8, 1.5 * len(classes) + 0.3), squeeze=False
    )
    for row, label in enumerate(classes):
        chosen = [image for image, name in zip(images, labels) if name == label][:columns]
        for column in range(columns):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(chosen):
                shown = np.asarray(chosen[column]).T[::-1, ::-1]
                axis.imshow(shown, cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
            else:
                axis.axis("off")
        axes[row][0].set_ylabel(label, fontsize=9)
    figure.suptitle("preprocessed real training images (network input, [-1, 1])", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
    return path
