"""Write an evaluation: predictions.csv, metrics, the confusion matrix and the galleries with their maps.

`calibrated_test` (after training) fits the temperature on the validation split, predicts the test
split with it and draws reliability.png; `cnnlab evaluate` applies the temperature model.json stores.

`write_evaluation` is used after training (on the test split) and by `cnnlab evaluate`
(`evaluate_run`, on the run's test split or on other images); it takes `Predictions` and returns
the metrics dict that goes into `summary.json` (or an evaluation folder's metrics.json).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnnlab.core.figures import save_figure
from cnnlab.core.errors import UserError
from cnnlab.core.runs import RunFolder, load_run, new_run_dir, read_csv, save_json, write_csv
from cnnlab.data.hashes import file_hashes
from cnnlab.data.loaders import FileSource, Loader
from cnnlab.data.sources import resolve_data, scan_folder
from cnnlab.data.splits import Row, Split, load_split
from cnnlab.evaluate.galleries import write_galleries
from cnnlab.evaluate.calibration import calibration_record, enough_answers, fit_temperature, softmax
from cnnlab.evaluate.metrics import compute_metrics, reliability
from cnnlab.evaluate.plots import plot_confusion_pair, plot_reliability
from cnnlab.evaluate.predict import Predictions, predict_loader
from cnnlab.models.checkpoint import load_model


def write_predictions(preds: Predictions, path: Path) -> Path:
    header = ["path", "target", "prediction"] + [f"prob_{c}" for c in preds.classes]
    rows = ([p, preds.classes[t], preds.classes[int(np.argmax(pr))]] + [f"{v:.8g}" for v in pr]
            for p, t, pr in zip(preds.paths, preds.targets, preds.probs))
    return write_csv(path, header, rows)


def calibrated_test(model, val_loader, test_loader, classes, device, out_dir: Path,
                    out_of_fold=None, val: tuple | None = None) -> tuple[Predictions, dict]:
    """Fit the temperature on the validation split, then predict the test split with it.

    out_of_fold: where the validation split holds too few mistakes to fit on, a callable that returns
        (logits, targets) of the training images predicted out of fold, fitted on together with it.
    val: (logits, targets) of `val_loader` as the best epoch's validation computed them with these weights
        (in the training precision), which spares predicting the split again; None predicts it here (fp32).
    Returns the test predictions (calibrated probabilities) and summary.json's calibration record;
    writes reliability.png (the test split before and after) into `out_dir`.
    """
    if val is None:
        predicted = predict_loader(model, val_loader, classes, device)
        val = predicted.logits, predicted.targets
    logits, targets = val
    images, why = "validation images", ""
    if out_of_fold is not None and not enough_answers(logits, targets):
        more_logits, more_targets = out_of_fold()
        if len(more_targets):
            logits, targets = np.concatenate([logits, more_logits]), np.concatenate([targets, more_targets])
            images = f"images: {len(val[1])} validation and {len(more_targets)} training, predicted out of fold"
        else:
            why = "; the training images' out-of-fold heads did not finish (a signal came, or one diverged)"
    temperature, fitted_on = fit_temperature(logits, targets, images)
    fitted_on += why
    temperature = round(temperature, 6)  # as model.json stores it
    test = predict_loader(model, test_loader, classes, device, temperature)
    before = softmax(test.logits)
    record = calibration_record(temperature, fitted_on, test.targets, before, test.probs)
    if len(test.targets):
        t = record["test"]
        titles = (f"before: T = 1, ECE {t['ece_before']:.3f}", f"after: T = {temperature:.3f}, ECE {t['ece_after']:.3f}")
        fig = plot_reliability(reliability(test.targets, before), reliability(test.targets, test.probs), titles)
        save_figure(fig, RunFolder(out_dir).reliability)
    return test, record


def write_evaluation(preds: Predictions, data_root: Path, out_dir: Path, model, preprocessing: dict) -> dict:
    """Write predictions.csv, confusion_matrix.png and the galleries (misclassified.png, confident.png, with
    the maps of `model`, preprocessed as `preprocessing` says: model.json's keys) into `out_dir`."""
    classes = list(preds.classes)
    metrics = compute_metrics(preds.targets, preds.probs, classes)
    if preds.images_per_second is not None:
        metrics["images_per_second"] = round(preds.images_per_second, 1)
    write_predictions(preds, RunFolder(out_dir).predictions)
    save_figure(plot_confusion_pair(np.array(metrics["confusion_matrix"]), classes), RunFolder(out_dir).confusion)
    write_galleries(model, preprocessing, preds, data_root, out_dir)
    return metrics


def evaluate_run(run: str | Path, data: str | None = None, include_seen: bool = False, log=print) -> Path:
    """Evaluate a trained run on its own test split, or on all images of `data`.

    Images of `data` whose bytes the run trained or validated on (their sha256 is in its split.csv)
    are left out, or with `include_seen` kept and counted. Writes into `RUN/evaluations/<time>-evaluation/`
    and returns that folder.
    """
    folder = load_run(run)
    model, meta = load_model(folder.dir)
    classes = tuple(meta["classes"])
    seen: list = []
    if data:
        root, line = resolve_data(data)
        split, seen = _other_images(folder, root, classes, include_seen, log)
    else:
        root = Path(folder.read_summary()["data"]["root"])
        line = f"data: the run's test split in {root}"
        split = load_split(folder.split, scan_folder(root))
        split = Split(tuple(r for r in split.rows if r.split == "test"), classes)
    log(line)
    rows = list(split.rows)
    y = torch.tensor([classes.index(r.label) for r in rows], dtype=torch.long)
    test = Loader(FileSource(root, rows, meta["image_size"], workers=0, crop=meta.get("crop", 1.0)), y,
                  [r.path for r in rows], 64, meta["mean"], meta["std"])
    preds = predict_loader(model, test, classes, temperature=meta.get("temperature", 1.0))
    if not len(preds.targets):
        raise UserError(f"none of the {len(rows)} images in {root} decode; pass a folder of readable images "
                        f"(`cnnlab audit {root}` lists what is wrong)")
    out = new_run_dir(folder.evaluations, "evaluation")  # a new folder, even for two in one second
    metrics = write_evaluation(preds, root, out, model, meta)
    if data:
        metrics["seen_images"] = {"count": len(seen), "included": include_seen}
    save_json(RunFolder(out).metrics, metrics)
    log(f"accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['f1_macro']:.4f}  loss {metrics['loss']:.4f}  "
        f"on {metrics['n']:,} images")
    return out


def _other_images(folder: RunFolder, root: Path, classes: tuple, include_seen: bool, log) -> tuple[Split, list]:
    """The images of `root` to evaluate on (its test/ split if it has one), without those the run trained or
    validated on unless `include_seen`; and the seen ones."""
    scan = scan_folder(root)
    unknown = sorted(set(scan.classes) - set(classes))
    if unknown:
        raise UserError(f"{root} has classes the model does not know: {', '.join(unknown)}; the model knows "
                        f"{', '.join(classes)}: pass a folder whose class folders are among them")
    if not scan.items:
        raise UserError(f"no images found in {root}")
    items = [i for i in scan.items if i.split == "test"] or list(scan.items)
    seen_hashes = {r["sha256"] for r in read_csv(folder.split) if r["split"] in ("train", "val")} \
        if folder.split.is_file() else set()
    hashes = file_hashes(root, [i.path for i in items])
    seen = [i for i in items if hashes[i.path] in seen_hashes]
    if seen:
        log(f"warning: {len(seen)} of {len(items)} images in {root} are ones the run trained or validated on "
            "(same bytes as in its split.csv); " + ("kept, so the figures are optimistic" if include_seen else
                                                    "left out (--include-seen keeps them)"))
        if not include_seen:
            items = [i for i in items if hashes[i.path] not in seen_hashes]
    if not items:
        raise UserError(f"every image in {root} is one the run trained or validated on; pass new images, "
                        "or --include-seen to evaluate on them anyway")
    return Split(tuple(Row(i.path, i.label, "test", hashes[i.path]) for i in items), classes), seen
