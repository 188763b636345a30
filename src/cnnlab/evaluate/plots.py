"""Evaluation figures: training curves, the confusion matrix, reliability diagrams. Numbers in, figures out."""

from __future__ import annotations

import numpy as np

from cnnlab.core.figures import pyplot


def integer_ticks():
    """Ticks at whole epochs only (matplotlib would mark 1.5 on a two-epoch run)."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def plot_curves(history: list[dict], title: str = ""):
    """Loss and accuracy per epoch, train vs validation, side by side; phases (frozen, finetune) marked."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = list(range(1, len(history) + 1))  # epochs counted across phases
    phases = [r.get("phase", "") for r in history]
    starts = [i for i in range(len(phases)) if i == 0 or phases[i] != phases[i - 1]]
    for ax, key, label in ((a1, "loss", "loss"), (a2, "accuracy", "accuracy")):
        ax.plot(ep, [float(r[f"train_{key}"]) for r in history], "o-", ms=3, label="train")
        ax.plot(ep, [float(r[f"val_{key}"]) for r in history], "o-", ms=3, label="validation")
        if len(starts) > 1 or phases[:1] not in ([""], ["scratch"]):
            for i in starts:
                ax.axvline(i + 0.5, color="grey", lw=0.8, ls="--")
                ax.text(i + 0.6, 1.0, phases[i], transform=ax.get_xaxis_transform(), va="top", fontsize=8,
                        color="grey")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(integer_ticks())
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], normalize: bool = False, ax=None, title: str = ""):
    """Counts (or row-normalised rates) with class names; returns the figure."""
    plt = pyplot()
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    if ax is None:
        side = max(4.0, 0.55 * len(classes) + 2)
        _, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(shown, cmap="Blues", vmin=0)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix (counts)"))
    if len(classes) <= 20:
        top = shown.max() or 1
        for i in range(len(classes)):
            for j in range(len(classes)):
                text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > top / 2 else "black")
    return ax.figure


def plot_reliability(before: dict, after: dict, titles: tuple[str, str]):
    """Reliability diagrams side by side: accuracy per confidence bin (bars) against the diagonal a
    calibrated model follows; `before` and `after` are `evaluate.metrics.reliability` dicts."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, bins, title in zip(axes, (before, after), titles):
        edges = bins["edges"]
        width, seen = np.diff(edges), bins["count"] > 0
        ax.bar(edges[:-1][seen], bins["accuracy"][seen], width[seen], align="edge", color="tab:blue",
               edgecolor="white", label="accuracy")
        ax.bar(edges[:-1][seen], (bins["confidence"] - bins["accuracy"])[seen], width[seen],
               bottom=bins["accuracy"][seen], align="edge", color="tab:red", alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_confusion_pair(cm: np.ndarray, classes: list[str]):
    plt = pyplot()
    side = max(4.0, 0.55 * len(classes) + 2)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(2 * side + 1, side * 0.9))
    plot_confusion_matrix(cm, classes, False, a1)
    plot_confusion_matrix(cm, classes, True, a2)
    fig.tight_layout()
    return fig
