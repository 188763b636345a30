"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnnlab.evaluate.metrics import compute_metrics, expected_calibration_error


def test_small_case_by_hand():
    # 3 classes, 6 samples. targets: 0 0 1 1 2 2 ; predictions: 0 1 1 1 2 0
    targets = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1],
                      [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]])
    m = compute_metrics(targets, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class a: tp 1, fp 1 (sample 5), fn 1 -> P 0.5 R 0.5; b: tp 2 fp 1 fn 0 -> P 2/3 R 1; c: tp 1 fp 0 fn 1 -> P 1 R .5
    pa, pb, pc = 0.5, 2 / 3, 1.0
    ra, rb, rc = 0.5, 1.0, 0.5
    f = [2 * p * r / (p + r) for p, r in ((pa, ra), (pb, rb), (pc, rc))]
    assert m["precision_macro"] == pytest.approx((pa + pb + pc) / 3)
    assert m["recall_macro"] == pytest.approx((ra + rb + rc) / 3)
    assert m["f1_macro"] == pytest.approx(sum(f) / 3)
    assert m["f1_weighted"] == pytest.approx(sum(f) / 3)  # equal supports
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    loss = -np.mean(np.log([0.7, 0.3, 0.8, 0.5, 0.8, 0.4]))  # p of the true class
    assert m["loss"] == pytest.approx(loss)
    assert m["per_class"]["b"] == {"precision": pytest.approx(pb), "recall": 1.0, "f1": pytest.approx(f[1]), "support": 2}
    assert "top5_accuracy" not in m


def test_ece_by_hand():
    # two bins used: confidences 0.9 (both right) and 0.6 (one of two right)
    targets = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    expected = 0.5 * abs(1.0 - 0.9) + 0.5 * abs(0.5 - 0.6)
    assert expected_calibration_error(targets, probs) == pytest.approx(expected)


def test_top5_with_many_classes():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=50)
    targets = rng.integers(0, 10, 50)
    m = compute_metrics(targets, probs, [str(i) for i in range(10)])
    ranks = (-probs).argsort(1)[:, :5]
    assert m["top5_accuracy"] == pytest.approx(np.mean([t in r for t, r in zip(targets, ranks)]))
    assert math.isfinite(m["ece"])


def test_loss_curves_mark_whole_epochs_only():
    from cnnlab.evaluate.plots import plot_curves

    history = [{"epoch": e, "train_loss": 2 / e, "val_loss": 2.1 / e, "train_accuracy": 0.3 * e,
                "val_accuracy": 0.25 * e, "phase": "scratch"} for e in (1, 2)]
    fig = plot_curves(history)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
