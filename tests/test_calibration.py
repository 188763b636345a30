"""Calibrated probabilities: the temperature is fitted on validation data, stored with the model, and
applied wherever probabilities leave cnnlab (evaluation, `cnnlab evaluate`, the Predictor and so the
bundle and the server); the report shows the reliability before and after."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest

from cnnlab.cli import main
from cnnlab.evaluate.calibration import fit_temperature
from cnnlab.evaluate.metrics import reliability
from cnnlab.evaluate.predict import Predictor


def _sampled(true_t: float, n: int, k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / true_t): true_t is the right temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, k))
    p = np.exp(logits / true_t - (logits / true_t).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    targets = np.array([rng.choice(k, p=row) for row in p])
    return logits, targets


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with(true_t):
    logits, targets = _sampled(true_t, 4000)
    assert fit_temperature(logits, targets)[0] == pytest.approx(true_t, rel=0.08)


def test_a_fitted_temperature_lowers_the_error_on_new_images():
    fit_logits, fit_targets = _sampled(2.0, 3000, seed=1)
    logits, targets = _sampled(2.0, 3000, seed=2)  # other images from the same (overconfident) model
    t, _ = fit_temperature(fit_logits, fit_targets)

    def ece(temp):  # 15 equal-width bins, written out here
        z = logits / temp
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        conf, right = p.max(1), p.argmax(1) == targets
        total = 0.0
        for lo in np.arange(15) / 15:
            sel = (conf > lo) & (conf <= lo + 1 / 15)
            total += sel.sum() / len(conf) * abs(right[sel].mean() - conf[sel].mean()) if sel.any() else 0.0
        return total

    assert ece(1.0) > 0.05 and ece(t) < 0.02


def test_nothing_to_fit_on_leaves_the_model_as_it_was():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))[0] == 1.0
    # a validation split without mistakes says nothing of how sure a wrong answer is: no fit, and why
    logits, targets = _sampled(0.3, 200)
    right = logits.argmax(1) == targets
    for keep in (right, right | (np.cumsum(~right) <= 4)):  # no wrong answer, then 4 wrong ones
        t, why = fit_temperature(logits[keep], targets[keep])
        assert t == 1.0 and why.startswith(f"not fitted: {keep.sum()} validation images with "
                                           f"{(~right[keep]).sum()} wrong")
    assert fit_temperature(logits, targets)[0] < 0.5  # all of them, with their mistakes: fitted


def test_reliability_bins_count_accuracy_and_confidence():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.4, 0.6], [0.45, 0.55]])
    targets = np.array([0, 1, 1, 1])
    bins = reliability(targets, probs, bins=10)
    assert bins["count"].tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 1, 1]
    assert bins["accuracy"][5] == 1.0 and bins["accuracy"][8] == 0.0 and bins["accuracy"][9] == 1.0
    assert bins["confidence"][5] == pytest.approx(0.575)
    assert np.isnan(bins["accuracy"][0])


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_run_stores_its_temperature_and_reports_both_calibrations(trained):
    summary = json.loads((trained / "summary.json").read_text())
    meta = json.loads((trained / "model.json").read_text())
    cal = summary["calibration"]
    assert cal["temperature"] == meta["temperature"] and cal["temperature"] > 0
    n_val = sum(r["split"] == "val" for r in _rows(trained / "split.csv"))
    assert cal["fitted_on"] == f"{n_val} validation images (NLL)"
    # the NLL after scaling is the loss of the probabilities predictions.csv holds, recomputed here
    rows, classes = _rows(trained / "predictions.csv"), summary["classes"]
    nll = -sum(math.log(max(float(r[f"prob_{r['target']}"]), 1e-12)) for r in rows) / len(rows)
    assert cal["test"]["nll_after"] == pytest.approx(nll, abs=1e-6)
    assert summary["test"]["loss"] == pytest.approx(nll, abs=1e-6)
    assert cal["test"]["nll_after"] <= cal["test"]["nll_before"] + 0.02  # fitted on val, measured on test
    accuracy = sum(r["target"] == r["prediction"] for r in rows) / len(rows)
    assert summary["test"]["accuracy"] == pytest.approx(accuracy)
    assert all(max(classes, key=lambda c: float(r[f"prob_{c}"])) == r["prediction"] for r in rows)
    assert (trained / "reliability.png").stat().st_size > 5000
    report = (trained / "report.md").read_text()
    assert "reliability.png" in report and f"temperature {cal['temperature']:.3f}" in report


def test_evaluate_applies_the_stored_temperature(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("bundle", "evaluations"))
    assert main(["evaluate", str(run)]) == 0
    (folder,) = (run / "evaluations").iterdir()
    metrics = json.loads((folder / "metrics.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert metrics["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-6)  # the test split, the same T


def test_the_predictor_divides_the_logits_by_the_models_temperature(trained, tmp_path, cifar_root):
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("bundle", "evaluations"))
    image = cifar_root / _rows(trained / "predictions.csv")[0]["path"]
    meta = json.loads((run / "model.json").read_text())
    t1 = meta["temperature"]
    p1 = Predictor.load(run).predict_proba([image])[0]
    (run / "model.json").write_text(json.dumps({**meta, "temperature": 3 * t1}))
    p3 = Predictor.load(run).predict_proba([image])[0]
    # softmax(z / 3T) from softmax(z / T): log-probabilities are z / T up to a constant
    z = np.log(p1) / 3
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert np.abs(p3 - expected).max() < 1e-5
    assert p3.max() < p1.max()
