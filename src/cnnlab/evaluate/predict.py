"""Predictions over a loader, and `Predictor`: a saved run loaded for inference.

`Predictor` follows scikit-learn's names (`classes_`, `predict`, `predict_proba`) and preprocesses
with the run's own settings through the one decoder, so prediction sees images exactly as
evaluation did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.core.runs import find_run
from cnnlab.data.augment import to_model_input
from cnnlab.data.decode import load_array
from cnnlab.models.checkpoint import load_model


@dataclass(frozen=True)
class Predictions:
    paths: list[str]
    targets: np.ndarray  # (N,) int
    probs: np.ndarray  # (N, K) float
    classes: tuple[str, ...]
    images_per_second: float


@torch.no_grad()
def predict_loader(model, loader, classes, device=torch.device("cpu")) -> Predictions:
    """Softmax probabilities (fp32) for every batch of `loader`, with paths and targets."""
    model.eval().to(device)
    probs, targets, paths = [], [], []
    start = time.perf_counter()
    for x, y, idx in loader:
        probs.append(torch.softmax(model(x.to(device)).float(), 1).cpu())
        targets.append(y)
        paths += [loader.paths[i] for i in idx.tolist()]
    seconds = time.perf_counter() - start
    p = torch.cat(probs).double().numpy() if probs else np.zeros((0, len(classes)))
    t = torch.cat(targets).numpy() if targets else np.zeros(0, dtype=np.int64)
    return Predictions(paths, t, p, tuple(classes), len(t) / seconds if seconds > 0 else 0.0)


@torch.no_grad()
def inference_speed(model, image_size: int, device=torch.device("cpu"), batch: int = 32, singles: int = 15) -> dict:
    """Latency at batch 1 (median ms per image) and throughput at `batch` (images/s) on random input."""
    model.eval().to(device)
    one = torch.randn(1, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    many = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    model(one), model(many)  # warm-up: first calls pick kernels
    times = []
    for _ in range(singles):
        start = time.perf_counter()
        model(one)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    model(many)
    seconds = time.perf_counter() - start
    return {"latency_ms": round(1000 * float(np.median(times)), 3), "throughput": round(batch / seconds, 1),
            "batch": batch, "threads": torch.get_num_threads(), "device": str(device)}


class Predictor:
    """A trained model from a run folder, ready to classify image files or bytes."""

    def __init__(self, model: torch.nn.Module, meta: dict):
        self.model, self.meta = model.eval(), meta
        self.classes_ = list(meta["classes"])
        self.image_size = int(meta["image_size"])
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "Predictor":
        model, meta = load_model(find_run(run_dir))
        return cls(model, meta)

    def preprocess(self, images) -> torch.Tensor:
        arrays = np.stack([load_array(im, self.image_size, self.meta.get("crop", 1.0)) for im in images])
        return to_model_input(torch.from_numpy(arrays), self.mean, self.std)

    @torch.no_grad()
    def predict_proba(self, images) -> np.ndarray:
        """(N, K) class probabilities for image paths or raw bytes (raises DecodeError on bad ones)."""
        return torch.softmax(self.model(self.preprocess(images)).float(), 1).double().numpy()

    def predict(self, images) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(images).argmax(1)]
