"""The deployable bundle: weights (safetensors, ONNX fp32 and int8), and one JSON that says how to use them.

`bundle.json` holds the classes in order, the metrics, the split manifest's hash, the "uncertain"
threshold chosen on validation data, the cnnlab version, the sha256 of every file, each engine's
measured test accuracy, agreement with fp32 and speed (serve/engines.py: `auto` chooses by them),
and a copy of the preprocessing for people (the model itself is fed from model.json, as everywhere). `load_bundle`
(in models/checkpoint.py, beside the other model files, so that the Predictor can read a bundle
without importing this module) checks every hash before anything is used; nothing is unpickled.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from cnnlab import __version__
from cnnlab.core.errors import UserError
from cnnlab.core.runs import RunFolder, atomic_write, load_run, read_csv, save_json, sha256_file
from cnnlab.evaluate.predict import Predictor
from cnnlab.models.checkpoint import BUNDLE_FILE, BUNDLE_FILES, INT8_ONNX, ONNX, load_bundle, to_onnx
from cnnlab.serve.engines import engine_lines, even_sample, measure_engines, quantize_int8

__all__ = ["BUNDLE_FILE", "check", "export", "load_bundle", "uncertainty_threshold"]  # the reader is in checkpoint
MAX_THRESHOLD_IMAGES = 2000  # validation images used to choose the "uncertain" threshold


def uncertainty_threshold(confidence: np.ndarray, correct: np.ndarray, classes: int) -> tuple[float, str]:
    """The top-probability cut that best separates right from wrong answers (Youden's J on
    validation predictions), and how it was chosen; below it the page says "uncertain". With
    nothing to separate (no mistake, or no right answer), halfway from chance to certainty: a
    fixed 0.5 would never flag a 2-class model's answer."""
    from sklearn.metrics import roc_curve

    if correct.all() or not correct.any():
        none = "image" if not len(correct) else "mistake" if correct.all() else "right answer"
        return (1 + 1 / classes) / 2, f"no {none} among them: halfway from chance (1/{classes}) to certainty"
    fpr, tpr, thresholds = roc_curve(correct.astype(int), confidence)
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, max(0.0, thresholds[best]))), "Youden's J"


def _val_threshold(run: RunFolder, predictor: Predictor) -> tuple[float, str, int]:
    rows = [r for r in read_csv(run.split) if r["split"] == "val"]
    rows = even_sample(rows, MAX_THRESHOLD_IMAGES)  # keeps export quick on big models
    root = Path(run.read_summary()["data"]["root"])
    conf, correct = [], []
    for i in range(0, len(rows), 64):
        chunk = [r for r in rows[i:i + 64] if (root / r["path"]).is_file()]
        if not chunk:
            continue
        p = predictor.predict_proba([root / r["path"] for r in chunk])
        conf += p.max(1).tolist()
        correct += [predictor.classes_[k] == r["class"] for k, r in zip(p.argmax(1), chunk)]
    return *uncertainty_threshold(np.array(conf), np.array(correct, dtype=bool), len(predictor.classes_)), len(conf)


def export(run: str | Path, out: str | Path | None = None, log=print) -> Path:
    """Write the bundle of `run` into `out` (default RUN/bundle); return its folder."""
    run = load_run(run)
    for path in (run.summary, run.split):
        if not path.is_file():
            raise UserError(f"{run.dir} has no {path.name}: its training did not finish; finish it with "
                            f"`cnnlab train --resume {run.dir}`, then export")
    predictor = Predictor.load(run.dir, engine="torch")  # the run's own model, as evaluation ran it
    model, meta = predictor.model, predictor.meta
    summary = run.read_summary()
    folder = Path(out) if out else run.bundle
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "it is a file" if folder.is_file() else e.strerror
        raise UserError(f"cannot create the bundle folder {folder}: {why}; pass --out a new or empty folder") from None
    shutil.copyfile(run.weights, folder / RunFolder.weights)
    shutil.copyfile(run.model, folder / RunFolder.model)
    size = meta["image_size"]  # the whole model (logits), any batch size
    atomic_write(folder / ONNX, to_onnx(model, torch.zeros(1, 3, size, size), "logits", dynamic_batch=True))
    root = Path(summary["data"]["root"])
    int8 = quantize_int8(folder, run, predictor, root)  # {"error": why} where the quantizer cannot
    threshold, how, n_val = _val_threshold(run, predictor)
    test = summary.get("test") or {}
    info = {"format": "cnnlab-bundle-1", "cnnlab_version": __version__, "run": run.dir.name,
            "classes": meta["classes"], "model_name": meta["model_name"],
            "preprocessing": predictor.preprocessing,  # a copy for people: the Predictor reads model.json
            "metrics": {k: test[k] for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "loss", "n")
                        if k in test},
            "uncertain_below": round(threshold, 4),
            "threshold_from": f"{n_val} validation images ({how}"
                              + (", on calibrated probabilities)" if "temperature" in meta else ")"),
            "temperature": predictor.temperature,  # what the served probabilities are divided by
            "split_sha256": meta.get("split_sha256", ""),
            "files": {name: sha256_file(folder / name) for name in BUNDLE_FILES
                      if name != INT8_ONNX or (folder / name).is_file()}}
    save_json(folder / BUNDLE_FILE, info)  # first without measurements: the engines load through load_bundle
    info["engines"], info["engines_measured"] = measure_engines(folder, run, int8, root)
    save_json(folder / BUNDLE_FILE, info)
    log(f"bundle: {folder} (uncertain below {threshold:.3f}, from {n_val} validation images)")
    for line in engine_lines(info["engines"], info["engines_measured"]):
        log(line)
    return folder


def check(folder: Path, run: str | Path | RunFolder, log=print, chunk: int = 256) -> float:
    """Largest |bundle probability - evaluation probability| over every test image of the run."""
    run = load_run(run.dir if isinstance(run, RunFolder) else run)
    rows = read_csv(run.predictions)
    root = Path(run.read_summary()["data"]["root"])
    predictor = Predictor.load(folder, engine="onnx")  # fp32, which must equal evaluation; int8 and bf16 are measured
    classes = predictor.classes_
    err = 0.0
    for i in range(0, len(rows), chunk):  # in chunks: 10,000 images at 224 px would not fit in memory at once
        part = rows[i:i + chunk]
        probs = predictor.predict_proba([root / r["path"] for r in part])
        ref = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in part])
        err = max(err, float(np.abs(probs - ref).max()))
    log(f"check: {len(rows)} test images, largest probability difference to evaluation {err:.2e} "
        f"({predictor.kind})")
    return err
