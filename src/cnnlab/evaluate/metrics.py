"""Metrics from targets and probabilities: plain functions returning numbers (no drawing).

Precision, recall, F1 and the confusion matrix come from scikit-learn; the loss is the mean
cross-entropy of the given probabilities; calibration error is computed here.
"""

from __future__ import annotations

import numpy as np


def reliability(targets: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict:
    """Per equal-width (lo, hi] bin of top-1 confidence: mean confidence, accuracy and image count
    (NaN for an empty bin); the reliability diagram's numbers and the ECE's."""
    conf, correct = probs.max(1), probs.argmax(1) == targets
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        confidence = np.bincount(which, conf, bins) / count
        accuracy = np.bincount(which, correct.astype(float), bins) / count
    return {"edges": np.linspace(0, 1, bins + 1), "confidence": confidence, "accuracy": accuracy, "count": count}


def expected_calibration_error(targets: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Weighted mean |accuracy - confidence| over equal-width confidence bins."""
    r = reliability(targets, probs, bins)
    seen = r["count"] > 0
    return float((r["count"][seen] * np.abs(r["accuracy"][seen] - r["confidence"][seen])).sum() / max(1, len(targets)))


def cross_entropy(targets: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0)
    return float(-np.log(p).mean())


def compute_metrics(targets: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """All test metrics for `summary.json` from integer targets and an (N, K) probability array."""
    from sklearn import metrics as skm  # here, not at import: a second and a half every command would pay

    k = len(classes)
    labels = list(range(k))
    pred = probs.argmax(1)
    out = {"n": int(len(targets)), "loss": cross_entropy(targets, probs),
           "accuracy": float(skm.accuracy_score(targets, pred))}
    if k > 5:
        out["top5_accuracy"] = float(skm.top_k_accuracy_score(targets, probs, k=5, labels=labels))
    present = sorted(set(targets.tolist()))  # a class absent from these images has no recall to average in
    out["classes_present"] = len(present)
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(targets, pred, labels=present, average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    p, r, f, s = skm.precision_recall_fscore_support(targets, pred, labels=labels, average=None, zero_division=0)
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, c in enumerate(classes)}
    cm = skm.confusion_matrix(targets, pred, labels=labels)
    out["confusion_matrix"] = cm.tolist()
    out["ece"] = expected_calibration_error(targets, probs)
    return out
