"""Predictions over a loader, and `Predictor`: a trained model (a run folder or a bundle) loaded for
inference, the one type behind `predict`, `export --check` and `serve`.

`Predictor` follows scikit-learn's names (`classes_`, `predict`, `predict_proba`) and preprocesses
with the model's own settings (model.json: image size, crop, mean, std) through the one decoder
(`data.decode.load_array`) and the one normalisation (`data.augment.to_model_input`), so prediction
and serving see images exactly as evaluation did.

Engines: PyTorch, or ONNX Runtime on a bundle's model.onnx. `auto` takes ONNX Runtime where the
folder has model.onnx and it loads and runs; a fallback to PyTorch is logged with its reason.

Threads: `threads` caps both PyTorch's and ONNX Runtime's intra-op pools (a server passes one per
worker). PyTorch's default of one thread per core collapses a server to a few requests per second
when another process holds a core; with one thread per worker and several workers, the cores are
shared by requests instead. None leaves both libraries' defaults.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.core.errors import UserError
from cnnlab.core.runs import load_run
from cnnlab.data.augment import to_model_input
from cnnlab.data.decode import load_array
from cnnlab.models.checkpoint import (BUNDLE_FILE, ONNX, OnnxUnavailable, load_bundle, load_model, onnx_session,
                                     read_meta)

ENGINES = ("auto", "onnx", "torch")


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
    """A trained model ready to classify image files or bytes: `Predictor.load(run_or_bundle)`.

    Attributes: `classes_` (class names in output order), `kind` ("onnxruntime" | "pytorch"), `meta`
    (model.json), `info` (bundle.json; {} for a run folder), `folder`, `model` (the PyTorch module, None
    under ONNX Runtime), `seconds` (one warm batch-1 inference, measured by `warm()`).
    """

    def __init__(self, forward, meta: dict, kind: str, folder: Path, info: dict | None = None,
                 model: torch.nn.Module | None = None):
        self._forward = forward  # normalised float32 (N, 3, S, S) in channels_last -> logits (N, K)
        self.meta, self.kind, self.folder, self.model = meta, kind, folder, model
        self.info = info if info is not None else {}
        self.classes_ = list(meta["classes"])
        self.image_size, self.crop = int(meta["image_size"]), float(meta.get("crop", 1.0))
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.seconds = 0.0

    @classmethod
    def load(cls, path: str | Path, engine: str = "auto", threads: int | None = None, log=print) -> "Predictor":
        """The model in `path`: a bundle folder (every file's sha256 checked) or a finished run folder.

        engine: "torch", "onnx" (ONNX Runtime on the folder's model.onnx, or a UserError saying why not),
        or "auto" (ONNX Runtime when the folder has a model.onnx that loads and runs, else PyTorch; a
        fallback is logged with its reason). threads: intra-op threads (None: the libraries' defaults).
        """
        if engine not in ENGINES:
            raise UserError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        folder, info = Path(path), None
        if (folder / BUNDLE_FILE).is_file():
            folder, info = load_bundle(folder)
        else:
            folder = load_run(folder).dir
        meta = read_meta(folder)
        if threads is not None:
            torch.set_num_threads(threads)  # also for the normalisation: idle pool threads spin on shared cores
        onnx = folder / ONNX
        if engine != "torch":
            why = f"{folder} has no {ONNX}"
            if onnx.is_file():
                size = int(meta["image_size"])
                try:
                    session = onnx_session(onnx, threads, probe=(1, 3, size, size))
                except OnnxUnavailable as e:
                    why = str(e)
                else:
                    def run_onnx(x: torch.Tensor) -> torch.Tensor:
                        return torch.from_numpy(session.run(None, {"x": np.ascontiguousarray(x.numpy())})[0])

                    return cls(run_onnx, meta, "onnxruntime", folder, info)
            if engine == "onnx":
                raise UserError(f"engine onnx: ONNX Runtime cannot be used ({why}); serve a bundle made by "
                                "`cnnlab export RUN` where onnxruntime is installed, or use --engine torch")
            if onnx.is_file():  # a folder without one (a run folder) has only PyTorch: nothing to say
                log(f"engine: ONNX Runtime unavailable ({why}); using PyTorch")
        model, meta = load_model(folder)
        return cls(model, meta, "pytorch", folder, info, model)

    @property
    def preprocessing(self) -> dict:
        """How an image becomes the model's input (from model.json): what the page and bundle.json show."""
        m = self.meta
        return {"image_size": self.image_size, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "input_size": m.get("input_size"), "steps": m.get("preprocessing", "")}

    def decode(self, data: bytes | str | Path) -> np.ndarray:
        """uint8 (3, S, S): the training decoder (raises DecodeError for anything it will not read)."""
        return load_array(data, self.image_size, self.crop)

    @torch.no_grad()
    def predict_arrays(self, arrays: list[np.ndarray]) -> np.ndarray:
        """(N, K) float64 class probabilities for decoded images (softmax in fp32, as evaluation)."""
        x = to_model_input(torch.from_numpy(np.stack(arrays)), self.mean, self.std)
        return torch.softmax(self._forward(x).float(), 1).double().numpy()

    def predict_proba(self, images) -> np.ndarray:
        """(N, K) class probabilities for image paths or raw bytes (raises DecodeError on bad ones)."""
        return self.predict_arrays([self.decode(im) for im in images])

    def predict(self, images) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(images).argmax(1)]

    def predict_bytes(self, data: bytes) -> np.ndarray:
        """Class probabilities (K,) for one encoded image."""
        return self.predict_arrays([self.decode(data)])[0]

    def warm(self) -> None:
        """Run twice on a blank image (the first call picks kernels); `seconds` is the second's time."""
        blank = [np.zeros((3, self.image_size, self.image_size), np.uint8)]
        self.predict_arrays(blank)
        start = time.perf_counter()
        self.predict_arrays(blank)
        self.seconds = time.perf_counter() - start
