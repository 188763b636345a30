"""Inference for serving: the bundle's ONNX model in ONNX Runtime (PyTorch as the fallback), fed
through the same decoder and normalisation as training and evaluation.

Threads: one intra-op thread per server worker by default. PyTorch's default of one thread per
core collapses a server to a few requests per second when another process holds a core; with
one thread per worker and several workers, the cores are shared by requests instead.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from cnnlab.data.decode import load_array
from cnnlab.serve.bundle import load_bundle


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


class Engine:
    def __init__(self, folder: Path, info: dict, engine: str = "auto", threads: int = 1):
        self.info = info
        self.classes = list(info["classes"])
        prep = info["preprocessing"]
        self.size, self.crop = int(prep["image_size"]), float(prep.get("crop", 1.0))
        self.mean, self.std = tuple(prep["mean"]), tuple(prep["std"])
        self.kind, self._run = "", None
        self.seconds = 0.0  # one warm inference at batch 1, measured by warm()
        torch.set_num_threads(threads)  # also for the normalisation: idle pool threads spin on shared cores
        self._mean = (np.array(self.mean, np.float32) * 255).reshape(1, 3, 1, 1)
        self._std = (np.array(self.std, np.float32) * 255).reshape(1, 3, 1, 1)
        if engine in ("auto", "onnx"):
            try:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
                self._run = lambda x: session.run(None, {"x": x})[0]
                self.kind = "onnxruntime"
            except Exception:  # a missing or broken runtime: PyTorch still serves
                if engine == "onnx":
                    raise
        if self._run is None:
            from cnnlab.models.checkpoint import load_model

            model, _ = load_model(folder)

            @torch.no_grad()
            def run(x):
                return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).float().numpy()

            self._run, self.kind = run, "pytorch"

    @classmethod
    def load(cls, path: str | Path, engine: str = "auto", threads: int = 1) -> "Engine":
        folder, info = load_bundle(path)
        return cls(folder, info, engine, threads)

    def decode(self, data: bytes | str | Path) -> np.ndarray:
        """uint8 (3, S, S): the training decoder (raises DecodeError for anything it will not read)."""
        return load_array(data, self.size, self.crop)

    def predict_arrays(self, arrays: list[np.ndarray]) -> np.ndarray:
        # the normalisation of data/augment.to_model_input, in NumPy: no torch call on the request path
        x = (np.stack(arrays).astype(np.float32) - self._mean) / self._std
        return _softmax(self._run(x))

    def predict_bytes(self, data: bytes) -> np.ndarray:
        """Class probabilities (K,) for one encoded image."""
        return self.predict_arrays([self.decode(data)])[0]

    def predict_files(self, paths) -> np.ndarray:
        return self.predict_arrays([self.decode(p) for p in paths])

    def warm(self) -> None:
        blank = [np.zeros((3, self.size, self.size), np.uint8)]
        self.predict_arrays(blank)
        start = time.perf_counter()
        self.predict_arrays(blank)
        self.seconds = time.perf_counter() - start
