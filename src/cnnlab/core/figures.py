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
    """PNG bytes of `fig`, written atomically; figures lay themselves out (tight_layout), so no second
    draw pass for bbox_inches="tight"."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
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
    ax.figure.tight_layout()
    return ax.figure


def plot_image_grid(images: list[np.ndarray], titles: list[str], ncols: int = 8, title: str = "",
                    colors: list[str] | None = None):
    """A grid of HxWx3 uint8 images with a short title each, drawn in one axes (one per image costs
    about a second more to draw for a 32-image grid, on every run)."""
    plt = pyplot()
    n = max(1, len(images))
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, ax = plt.subplots(figsize=(1.6 * ncols, 1.75 * nrows + (0.4 if title else 0)))
    gap, head = 0.1, 0.3  # between images, and above each for its title (in image widths)
    for k, image in enumerate(images):
        row, col = divmod(k, ncols)
        x, y = col * (1 + gap), row * (1 + head + gap) + head
        ax.imshow(image, extent=(x, x + 1, y + 1, y), interpolation="nearest")
        ax.text(x + 0.5, y - 0.03, titles[k], ha="center", va="bottom", fontsize=7,
                color=colors[k] if colors else "black")
    ax.set_xlim(-gap / 2, ncols * (1 + gap) - gap / 2)
    ax.set_ylim(nrows * (1 + head + gap), 0)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
