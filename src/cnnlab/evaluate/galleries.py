"""The report's galleries: test images with what the network looked at.

misclassified.png holds the most confident mistakes, each as the image, the map of the class the
model said and the map of the true class, so "cat taken for dog" can be seen; confident.png holds
the most confident right answers with the map of their class and of the runner-up. Images are shown
as the model saw them (decoded, cropped and resized by the one decoder); maps are Grad-CAM on the
served function (evaluate/explain.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnlab.core.figures import image_grid
from cnnlab.core.runs import RunFolder, atomic_write
from cnnlab.data.decode import DecodeError, load_array
from cnnlab.evaluate.explain import explain_arrays, overlay
from cnnlab.evaluate.predict import Predictions

PER_GALLERY = 12  # images per gallery, three panels each


def write_galleries(model, preprocessing: dict, preds: Predictions, data_root: Path, out_dir: Path,
                    n: int = PER_GALLERY) -> list[Path]:
    """Write misclassified.png and confident.png into `out_dir` (each only where it has an image); return them.

    `preprocessing`: model.json's image_size, crop, mean and std."""
    classes, probs = preds.classes, preds.probs
    pred = probs.argmax(1)
    runner_up = np.argsort(-probs, 1)[:, 1] if probs.shape[1] > 1 else pred
    confidence = probs[np.arange(len(pred)), pred]
    wrong, right = np.flatnonzero(pred != preds.targets), np.flatnonzero(pred == preds.targets)
    written = []
    for picked, second, is_truth, path, heading in (
            (wrong, preds.targets, True, RunFolder(out_dir).misclassified,
             "Misclassified, most confident first: the image, the map of the class it said, the map of the true class"),
            (right, runner_up, False, RunFolder(out_dir).confident,
             "Right, most confident first: the image, the map of its class, the map of the runner-up")):
        picked = picked[np.argsort(-confidence[picked], kind="stable")]
        rows = _decoded(picked, preds.paths, data_root, preprocessing, n)
        if not rows:
            continue
        index = [i for i, _ in rows]
        arrays = [a for _, a in rows]
        maps = _maps(model, arrays * 2, preprocessing, [*pred[index], *second[index]])  # one pass for both maps
        said, other = maps[:len(arrays)], maps[len(arrays):]
        images, titles, colours = [], [], []
        for i, a, m1, m2 in zip(index, arrays, said, other):
            truth, answer = classes[preds.targets[i]], classes[pred[i]]
            images += [a.transpose(1, 2, 0), m1, m2]
            titles += [f"true: {truth}\nsaid: {answer} {confidence[i]:.2f}", f"map: {answer}",
                       f"map: {classes[second[i]]}" + ("" if is_truth else f" {probs[i, second[i]]:.2f}")]
            colours += ["darkred" if answer != truth else "darkgreen", "black", "black"]
        written.append(atomic_write(path, image_grid(images, titles, ncols=6, title=heading, colors=colours,
                                                     side=112)))
    return written


def _decoded(picked: np.ndarray, paths: list[str], root: Path, pre: dict, n: int) -> list[tuple[int, np.ndarray]]:
    """(index, uint8 3 x S x S) of the first `n` of `picked` that still decode."""
    out = []
    for i in picked:
        if len(out) == n:
            break
        try:
            out.append((int(i), load_array(Path(root) / paths[i], int(pre["image_size"]), float(pre.get("crop", 1.0)))))
        except (DecodeError, OSError):
            continue
    return out


def _maps(model, arrays: list[np.ndarray], pre: dict, targets) -> list[np.ndarray]:
    return [overlay(e.image, e.cam) for e in explain_arrays(model, arrays, pre["mean"], pre["std"], [int(t) for t in targets])]
