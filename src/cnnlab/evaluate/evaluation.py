"""Write an evaluation: predictions.csv, metrics, the confusion matrix and misclassified images.

Used after training (on the test split) and by `cnnlab evaluate`; takes `Predictions`, returns
the metrics dict that goes into `summary.json`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnlab.core.figures import plot_image_grid, save_figure
from cnnlab.core.runs import write_csv
from cnnlab.data.decode import DecodeError, decode_image, fit_square
from cnnlab.evaluate.metrics import compute_metrics
from cnnlab.evaluate.plots import plot_confusion_pair
from cnnlab.evaluate.predict import Predictions


def write_predictions(preds: Predictions, path: Path) -> Path:
    header = ["path", "target", "prediction"] + [f"prob_{c}" for c in preds.classes]
    rows = ([p, preds.classes[t], preds.classes[int(np.argmax(pr))]] + [f"{v:.8g}" for v in pr]
            for p, t, pr in zip(preds.paths, preds.targets, preds.probs))
    return write_csv(path, header, rows)


def write_evaluation(preds: Predictions, data_root: Path, out_dir: Path, max_misclassified: int = 32) -> dict:
    """Write predictions.csv, confusion_matrix.png and misclassified.png into `out_dir`."""
    classes = list(preds.classes)
    metrics = compute_metrics(preds.targets, preds.probs, classes)
    metrics["images_per_second"] = round(preds.images_per_second, 1)
    write_predictions(preds, out_dir / "predictions.csv")
    save_figure(plot_confusion_pair(np.array(metrics["confusion_matrix"]), classes), out_dir / "confusion_matrix.png")
    pred = preds.probs.argmax(1)
    wrong = np.flatnonzero(pred != preds.targets)
    # the most confident mistakes first: they say most about what the model gets wrong
    wrong = wrong[np.argsort(-preds.probs[wrong, pred[wrong]])][:max_misclassified]
    images, titles = [], []
    for i in wrong:
        try:
            images.append(np.asarray(fit_square(decode_image(Path(data_root) / preds.paths[i]).image, 64)))
        except (DecodeError, OSError):
            continue
        titles.append(f"{classes[preds.targets[i]]} -> {classes[pred[i]]}\n{preds.probs[i, pred[i]]:.2f}")
    if images:
        fig = plot_image_grid(images, titles, ncols=8, title="Misclassified (true -> predicted, probability)",
                              colors=["darkred"] * len(images))
        save_figure(fig, out_dir / "misclassified.png")
    return metrics
