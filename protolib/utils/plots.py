"""Small report figures shared by the entry points."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protolib.utils.io import atomic_savefig


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: str | Path, title: str) -> Path:
    """Row-normalised confusion matrix (true class per row) with counts, saved as an image."""
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if len(class_names) <= 30:
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=90)
        ax.set_yticks(ticks, class_names)
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                color = "white" if rates[row, col] > 0.5 else "black"
                ax.text(col, row, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    try:
        return atomic_savefig(path, fig, dpi=120)
    finally:
        plt.close(fig)
