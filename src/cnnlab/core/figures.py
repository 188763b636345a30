"""Figures shared by the audit and the run report: class-count bars and image grids.

Drawing only: callers pass numbers and pixels. matplotlib is imported lazily (and headless), so
nothing pays for it unless a figure is drawn; files are written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cnnlab.core.runs import atomic_write


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return atomic_write(path, buf.getvalue())


def plot_class_counts(counts: dict[str, dict[str, int]], ax=None, title: str = "Images per class and split"):
    """Grouped bars: `counts[class][split]` -> number of images."""
    plt = pyplot()
    classes = list(counts)
    splits = [s for s in ("train", "val", "test", "all") if any(counts[c].get(s, 0) for c in classes)]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.7 * len(classes) + 2), 4))
    width = 0.8 / max(1, len(splits))
    xs = np.arange(len(classes))
    for k, s in enumerate(splits):
        ax.bar(xs + (k - (len(splits) - 1) / 2) * width, [counts[c].get(s, 0) for c in classes], width, label=s)
    ax.set_xticks(xs, classes, rotation=45 if len(classes) > 6 else 0, ha="right" if len(classes) > 6 else "center")
    ax.set_ylabel("images")
    ax.set_title(title)
    if len(splits) > 1:
        ax.legend()
    return ax.figure


def plot_image_grid(images: list[np.ndarray], titles: list[str], ncols: int = 8, title: str = "",
                    colors: list[str] | None = None):
    """A grid of HxWx3 uint8 images with a short title each."""
    plt = pyplot()
    n = max(1, len(images))
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.75 * nrows + (0.4 if title else 0)), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k], interpolation="nearest")
            ax.set_title(titles[k], fontsize=7, color=(colors[k] if colors else "black"))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
