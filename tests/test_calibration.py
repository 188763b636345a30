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


def test_the_temperature_fits_the_saved_model_on_the_validation_split(trained):
    # fitted on the logits the best epoch's validation computed (not predicted again after training): they must
    # be the saved weights' on the validation images, in the order of their labels. The saved model's logits are
    # T * log(p) up to a constant per image, p its calibrated probabilities; fitted again, they give T back (the
    # validation ran in the training precision, the Predictor in fp32: bf16 moves T by well under 2%)
    summary = json.loads((trained / "summary.json").read_text())
    classes, root = summary["classes"], summary["data"]["root"]
    val = [r for r in _rows(trained / "split.csv") if r["split"] == "val"]
    t = summary["calibration"]["temperature"]
    probs = Predictor.load(trained, engine="torch").predict_proba([f"{root}/{r['path']}" for r in val])
    refitted, _ = fit_temperature(t * np.log(probs), np.array([classes.index(r["class"]) for r in val]))
    assert refitted == pytest.approx(t, rel=0.02)


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


def _feature_loaders(labels: np.ndarray, signal: float = 1.0, dim: int = 256, seed: int = 0):
    """Feature loaders as the frozen phase builds them: two views per training image (the second a near
    copy, as a mirror's features are), and a validation split of the same training images (so that the
    best epoch is the one that fits the training images best: a head that saw an image answers for it).
    The features show the label with strength `signal` (0: pure noise, nothing to learn)."""
    import torch

    from cnnlab.data.loaders import Loader, Loaders, MemorySource

    g = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(labels)
    x = torch.randn(len(y), dim, generator=g)  # more dimensions than images: random labels can be memorised
    x[:, :16] += signal * torch.nn.functional.one_hot(y, 2).float().repeat_interleave(8, 1)
    views = torch.cat([x, x + 0.01 * torch.randn(x.shape, generator=g)])
    paths = [f"train/{i}.jpg" for i in range(len(y))]
    train = Loader(MemorySource(views), torch.cat([y, y]), paths + paths, 16, None, None, train=True, seed=seed)
    val = Loader(MemorySource(x), y, paths, 512, None, None)
    return Loaders(train, val, val, ("a", "b"), (0.0,), (1.0,), 32, "features")


@pytest.mark.parametrize("labels", ["learnable", "noise"])
def test_out_of_fold_answers_come_from_heads_that_never_saw_the_image(labels):
    import torch

    from cnnlab.core.config import TrainConfig
    from cnnlab.train.out_of_fold import out_of_fold_logits

    rng = np.random.default_rng(0)
    # noise: labels no head can learn, only memorise; a head that saw an image (or its mirror) gets it right
    y = rng.integers(0, 2, 100) if labels == "noise" else np.arange(100) % 2
    loaders = _feature_loaders(y, signal=0.0 if labels == "noise" else 1.0)
    cfg = TrainConfig(epochs=40, lr=0.02, batch_size=16, precision="fp32")
    logits, targets = out_of_fold_logits(torch.nn.Linear(256, 2), loaders, cfg, device=torch.device("cpu"),
                                         precision="fp32")
    assert len(targets) == 100 and np.array_equal(np.bincount(targets), np.bincount(y))  # each image once
    accuracy = (logits.argmax(1) == targets).mean()
    if labels == "noise":
        assert accuracy < 0.7, "an out-of-fold head answered for images it was trained on"
    else:  # the logits are the targets' own images: a learnable label is learnt out of fold
        assert accuracy > 0.8


def test_a_validation_split_without_mistakes_is_fitted_with_out_of_fold_answers(tmp_path):
    import torch

    from cnnlab.evaluate.evaluation import calibrated_test

    y = np.arange(40) % 2
    loaders = _feature_loaders(y)
    head = torch.nn.Linear(256, 2)
    with torch.no_grad():  # a head that gets every validation image right
        head.weight.zero_(), head.bias.zero_()
        head.weight[0, :8] = head.weight[1, 8:16] = 1.0
    assert (head(loaders.val.source.x).argmax(1).numpy() == y).all()
    over, over_targets = _sampled(3.0, 400, k=2)  # an overconfident model's answers: the right T is 3
    preds, record = calibrated_test(head, loaders.val, loaders.test, ("a", "b"), torch.device("cpu"), tmp_path,
                                    out_of_fold=lambda: (over, over_targets))
    assert record["temperature"] == pytest.approx(3.0, rel=0.25)
    assert record["fitted_on"] == "440 images: 40 validation and 400 training, predicted out of fold (NLL)"
    _, alone = calibrated_test(head, loaders.val, loaders.test, ("a", "b"), torch.device("cpu"), tmp_path)
    assert alone["temperature"] == 1.0 and alone["fitted_on"].startswith("not fitted: 40 validation images")
    _, stopped = calibrated_test(head, loaders.val, loaders.test, ("a", "b"), torch.device("cpu"), tmp_path,
                                 out_of_fold=lambda: (np.zeros((0, 0)), np.zeros(0, dtype=int)))
    assert stopped["temperature"] == 1.0 and stopped["fitted_on"].endswith("out-of-fold heads did not finish "
                                                                            "(a signal came, or one diverged)")


def test_a_validation_split_with_enough_mistakes_needs_no_out_of_fold_answers(tmp_path):
    import torch

    from cnnlab.evaluate.evaluation import calibrated_test

    y = np.arange(200) % 2
    loaders = _feature_loaders(y, signal=0.3)  # a head on weak features: right and wrong answers aplenty
    head = torch.nn.Linear(256, 2)
    with torch.no_grad():
        head.weight.zero_(), head.bias.zero_()
        head.weight[0, :8] = head.weight[1, 8:16] = 1.0
    _, record = calibrated_test(head, loaders.val, loaders.test, ("a", "b"), torch.device("cpu"), tmp_path,
                                out_of_fold=lambda: pytest.fail("validation alone could fit the temperature"))
    assert record["fitted_on"] == "200 validation images (NLL)"


def test_a_signal_during_the_out_of_fold_heads_gives_no_answers(monkeypatch):
    """The run is ending: a head stopped after one step would give answers no temperature should be fitted on."""
    import torch

    from cnnlab.core import signals
    from cnnlab.core.config import TrainConfig
    from cnnlab.train.out_of_fold import out_of_fold_logits

    monkeypatch.setitem(signals._state, "received", 15)  # SIGTERM came during the final evaluation
    with signals.deferred():
        logits, targets = out_of_fold_logits(torch.nn.Linear(256, 2), _feature_loaders(np.arange(40) % 2),
                                             TrainConfig(epochs=3, precision="fp32"), device=torch.device("cpu"),
                                             precision="fp32")
    assert len(logits) == len(targets) == 0
