"""The deployable bundle: weights (safetensors and ONNX), and one JSON that says how to use them.

`bundle.json` holds the classes in order, the preprocessing, the metrics, the split manifest's
hash, the "uncertain" threshold chosen on validation data, the cnnlab version and the sha256 of
every file. `load_bundle` checks every hash before anything is used; nothing is unpickled.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from cnnlab import __version__
from cnnlab.core.errors import UserError
from cnnlab.core.runs import atomic_write, find_run, load_json, read_csv, save_json, sha256_file
from cnnlab.models.checkpoint import load_model, to_onnx

FILES = ("model.safetensors", "model.json", "model.onnx")
MAX_THRESHOLD_IMAGES = 2000  # validation images used to choose the "uncertain" threshold


def uncertainty_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """The top-probability cut that best separates right from wrong answers (Youden's J on
    validation predictions); below it the page says "uncertain"."""
    from sklearn.metrics import roc_curve

    if correct.all() or not correct.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(correct.astype(int), confidence)
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, max(0.0, thresholds[best])))


def _val_threshold(run: Path, model, meta: dict) -> tuple[float, int]:
    from cnnlab.evaluate.predict import Predictor

    rows = [r for r in read_csv(run / "split.csv") if r["split"] == "val"]
    rows = rows[:: max(1, len(rows) // MAX_THRESHOLD_IMAGES)]  # an even sample keeps export quick on big models
    root = Path(load_json(run / "summary.json")["data"]["root"])
    predictor, conf, correct = Predictor(model, meta), [], []
    for i in range(0, len(rows), 64):
        chunk = [r for r in rows[i:i + 64] if (root / r["path"]).is_file()]
        if not chunk:
            continue
        p = predictor.predict_proba([root / r["path"] for r in chunk])
        conf += p.max(1).tolist()
        correct += [predictor.classes_[k] == r["class"] for k, r in zip(p.argmax(1), chunk)]
    return uncertainty_threshold(np.array(conf), np.array(correct, dtype=bool)), len(conf)


def export(run: str | Path, out: str | Path | None = None, log=print) -> Path:
    """Write the bundle of `run` into `out` (default RUN/bundle); return its folder."""
    run = find_run(run)
    if not (run / "model.safetensors").is_file() or not (run / "model.json").is_file():
        raise UserError(f"{run} has no trained model (model.safetensors + model.json); train it to the end first")
    for name in ("summary.json", "split.csv"):
        if not (run / name).is_file():
            raise UserError(f"{run} has no {name}: its training did not finish; finish it with "
                            f"`cnnlab train --resume {run}`, then export")
    model, meta = load_model(run)
    summary = load_json(run / "summary.json")
    folder = Path(out) if out else run / "bundle"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "it is a file" if folder.is_file() else e.strerror
        raise UserError(f"cannot create the bundle folder {folder}: {why}; pass --out a new or empty folder") from None
    shutil.copyfile(run / "model.safetensors", folder / "model.safetensors")
    shutil.copyfile(run / "model.json", folder / "model.json")
    size = meta["image_size"]  # the whole model (logits), any batch size
    atomic_write(folder / "model.onnx", to_onnx(model, torch.zeros(1, 3, size, size), "logits", dynamic_batch=True))
    threshold, n_val = _val_threshold(run, model, meta)
    test = summary.get("test") or {}
    info = {"format": "cnnlab-bundle-1", "cnnlab_version": __version__, "run": run.name,
            "classes": meta["classes"], "model_name": meta["model_name"],
            "preprocessing": {"image_size": meta["image_size"], "crop": meta.get("crop", 1.0),
                              "mean": meta["mean"], "std": meta["std"], "input_size": meta.get("input_size"),
                              "steps": meta.get("preprocessing", "")},
            "metrics": {k: test[k] for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "loss", "n")
                        if k in test},
            "uncertain_below": round(threshold, 4), "threshold_from": f"{n_val} validation images (Youden's J)",
            "split_sha256": meta.get("split_sha256", ""),
            "files": {name: sha256_file(folder / name) for name in FILES}}
    save_json(folder / "bundle.json", info)
    log(f"bundle: {folder} (uncertain below {threshold:.3f}, from {n_val} validation images)")
    return folder


def load_bundle(path: str | Path) -> tuple[Path, dict]:
    """(folder, bundle.json) after checking every file's sha256; accepts a bundle or a run folder."""
    folder = Path(path)
    if not (folder / "bundle.json").is_file() and (folder / "bundle" / "bundle.json").is_file():
        folder = folder / "bundle"
    if not (folder / "bundle.json").is_file():
        raise UserError(f"{path} is not a bundle (no bundle.json); make one with `cnnlab export RUN`")
    info = load_json(folder / "bundle.json")
    for name, digest in info.get("files", {}).items():
        if not (folder / name).is_file():
            raise UserError(f"bundle {folder}: {name} is missing; export it again")
        if sha256_file(folder / name) != digest:
            raise UserError(f"bundle {folder}: {name} does not match its sha256 in bundle.json (changed or "
                            "corrupted); export it again")
    return folder, info


def check(folder: Path, run: Path, log=print, chunk: int = 256) -> float:
    """Largest |bundle probability - evaluation probability| over every test image of the run."""
    from cnnlab.serve.engine import Engine

    rows = read_csv(run / "predictions.csv")
    root = Path(load_json(run / "summary.json")["data"]["root"])
    engine = Engine.load(folder)
    classes = engine.classes
    err = 0.0
    for i in range(0, len(rows), chunk):  # in chunks: 10,000 images at 224 px would not fit in memory at once
        part = rows[i:i + chunk]
        probs = engine.predict_files([root / r["path"] for r in part])
        ref = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in part])
        err = max(err, float(np.abs(probs - ref).max()))
    log(f"check: {len(rows)} test images, largest probability difference to evaluation {err:.2e} "
        f"({engine.kind})")
    return err
