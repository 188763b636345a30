"""Predictions over a loader, and `Predictor`: a trained model (a run folder or a bundle) loaded for
inference, the one type behind `predict`, `export --check` and `serve`.

`Predictor` follows scikit-learn's names (`classes_`, `predict`, `predict_proba`) and preprocesses
with the model's own settings (model.json: image size, crop, mean, std) through the one decoder
(`data.decode.load_array`) and the one normalisation (`data.augment.to_model_input`), so prediction
and serving see images exactly as evaluation did.

Engines (`ENGINES`, see evaluate/engines.py): ONNX Runtime on a bundle's model.onnx (fp32) or
model.int8.onnx, PyTorch fp32, or PyTorch under bf16 autocast where the CPU has bf16 hardware. All
of them go through `predict_arrays`, so the temperature applies alike. `auto` takes the fastest
engine that the bundle measured within 0.3 points of fp32's test accuracy; on a run folder, ONNX
Runtime where the folder has model.onnx and it loads and runs; a fallback to PyTorch is logged
with its reason.

Threads: `threads` caps both PyTorch's and ONNX Runtime's intra-op pools (a server passes one per
worker). PyTorch's default of one thread per core collapses a server to a few requests per second
when another process holds a core; with one thread per worker and several workers, the cores are
shared by requests instead. None leaves both libraries' defaults.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.core.env import cpu_has_bf16
from cnnlab.core.errors import UserError
from cnnlab.core.runs import load_run
from cnnlab.data.augment import to_model_input
from cnnlab.data.decode import load_array
from cnnlab.evaluate.engines import FP32, KINDS, NO_BF16, bf16_forward, choose_engine, runnable_here
from cnnlab.evaluate.explain import DEFAULT_METHOD, Explanation, explain_arrays, target_layer
from cnnlab.models.checkpoint import (BUNDLE_FILE, INT8_ONNX, ONNX, OnnxUnavailable, load_bundle, load_model,
                                     onnx_session, read_meta)

ENGINES = ("auto", "onnx", "int8", "bf16", "torch")


class _Unavailable(Exception):
    """An engine that cannot run here: `why` (the cause, for auto's log line) and `message` (the cause and
    what to do, for the UserError of an engine asked for by name)."""

    def __init__(self, why: str, message: str):
        super().__init__(message)
        self.why, self.message = why, message


def _int8_file(folder: Path, info: dict | None) -> str:
    """model.int8.onnx when this bundle lists it with its sha256 (an unlisted file is never run)."""
    if info is None:
        raise _Unavailable(f"{folder} is a run folder", f"{folder} is a run folder, without an int8 model; make a "
                           "bundle with `cnnlab export RUN` and load that")
    if INT8_ONNX not in info.get("files", {}):
        why = info.get("engines", {}).get("int8", {}).get("error") or "exported before int8 engines existed"
        raise _Unavailable(f"this bundle has no int8 model ({why})", f"this bundle has no int8 model ({why}); "
                           "use --engine onnx or auto, or export the run again")
    return INT8_ONNX


@dataclass(frozen=True)
class Predictions:
    paths: list[str]
    targets: np.ndarray  # (N,) int
    probs: np.ndarray  # (N, K) float: softmax(logits / temperature)
    classes: tuple[str, ...]
    images_per_second: float | None  # None when the model read cached features, not images
    logits: np.ndarray  # (N, K) float: what the network put out, before any temperature


@torch.no_grad()
def predict_loader(model, loader, classes, device=torch.device("cpu"), temperature: float = 1.0) -> Predictions:
    """Logits and softmax probabilities (fp32, logits divided by `temperature`) for every batch of `loader`,
    with paths and targets."""
    model.eval().to(device)
    logits, targets, paths, images = [], [], [], True
    start = time.perf_counter()
    for x, y, idx in loader:
        images = x.dim() == 4  # else (N, D) features of a frozen backbone, cached: a head's speed, not a model's
        logits.append(model(x.to(device)).float().cpu())
        targets.append(y)
        paths += [loader.paths[i] for i in idx.tolist()]
    seconds = time.perf_counter() - start
    z = torch.cat(logits) if logits else torch.zeros(0, len(classes))
    p = torch.softmax(z / temperature, 1).double().numpy()
    t = torch.cat(targets).numpy() if targets else np.zeros(0, dtype=np.int64)
    rate = (len(t) / seconds if seconds > 0 else 0.0) if images else None
    return Predictions(paths, t, p, tuple(classes), rate, z.double().numpy())


@torch.no_grad()
def inference_speed(model, image_size: int, device=torch.device("cpu"), batch: int = 32, singles: int = 15,
                    seconds: float = 1.0) -> dict:
    """Latency at batch 1 (median ms per image) and throughput at up to `batch` images (images/s) on
    random input, in about `seconds`: a large network gets fewer timed singles (at least 3) and a
    smaller batch (recorded as `batch`), so that measuring a large network costs about a second, not ten."""
    model.eval().to(device)
    one = torch.randn(1, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    _seconds(model, one, device)  # warm-up: the first call picks kernels
    times: list[float] = []
    while len(times) < singles and (len(times) < 3 or sum(times) < seconds / 2):
        times.append(_seconds(model, one, device))
    batch = max(1, min(batch, int(seconds / 4 / max(min(times), 1e-6))))  # warm-up and timed call: ~seconds / 2
    many = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    _seconds(model, many, device)
    took = _seconds(model, many, device)
    return {"latency_ms": round(1000 * float(np.median(times)), 3), "throughput": round(batch / took, 1),
            "batch": batch, "threads": torch.get_num_threads(), "device": str(device)}


def _seconds(model, x: torch.Tensor, device: torch.device) -> float:
    """One call's time; on a GPU until its kernels have finished (they run after the call returns)."""
    start = time.perf_counter()
    model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class Predictor:
    """A trained model ready to classify image files or bytes: `Predictor.load(run_or_bundle)`.

    Attributes: `classes_` (class names in output order), `engine` ("onnx", "int8", "bf16" or "torch", as
    `--engine` names it), `kind` (what runs it, `engines.KINDS`: "onnxruntime" (fp32), "onnxruntime-int8",
    "pytorch-bf16" or "pytorch"), `meta` (model.json), `info` (bundle.json; {}
    for a run folder), `folder`, `model` (the PyTorch module, None under ONNX Runtime), `temperature`
    (model.json's, fitted on validation data: every probability is softmax(logits / temperature)),
    `seconds` (a warm batch-1 inference, the fastest of five in `warm()`).
    """

    def __init__(self, forward, meta: dict, engine: str, folder: Path, info: dict | None = None,
                 model: torch.nn.Module | None = None):
        self._forward = forward  # normalised float32 (N, 3, S, S) in channels_last -> logits (N, K)
        self.engine, self.kind = engine, KINDS[engine]
        self.meta, self.folder, self.model = meta, folder, model
        self.info = info if info is not None else {}
        self.classes_ = list(meta["classes"])
        self.image_size, self.crop = int(meta["image_size"]), float(meta.get("crop", 1.0))
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.temperature = meta.get("temperature", 1.0)  # 1.0: a model saved before calibration
        if not isinstance(self.temperature, (int, float)) or not 0 < self.temperature < float("inf"):
            raise UserError(f"{folder / 'model.json'}: temperature {self.temperature!r} is not a positive number; "
                            "restore the file (or export the run again)")
        self.seconds = 0.0
        self._explained: tuple[torch.nn.Module, str] | None = None  # (fp32 PyTorch model, default layer), once

    @classmethod
    def load(cls, path: str | Path, engine: str = "auto", threads: int | None = None, log=print) -> "Predictor":
        """The model in `path`: a bundle folder (every file's sha256 checked) or a finished run folder.

        engine: "onnx" (ONNX Runtime fp32 on model.onnx), "int8" (ONNX Runtime on a bundle's model.int8.onnx),
        "bf16" (PyTorch under bf16 autocast, where the CPU has AMX or AVX512-BF16), "torch" (PyTorch fp32):
        each a UserError saying why and what to do where it cannot run. "auto": on a bundle, the fastest
        engine whose test accuracy (measured at export, in bundle.json) is within 0.3 points of fp32's and
        that is at least 1.1x as fast, said in one log line (`engines.choose_engine`); on a run folder, ONNX
        Runtime where there is a model.onnx, else PyTorch. A failed ONNX Runtime under auto falls back to PyTorch, logged with its reason.
        threads: intra-op threads (None: the libraries' defaults).
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
        if engine == "auto":
            return cls._auto(folder, meta, info, threads, log)
        try:
            return cls._build(engine, folder, meta, info, threads)
        except _Unavailable as e:
            raise UserError(f"engine {engine}: {e.message}") from None

    @classmethod
    def _auto(cls, folder: Path, meta: dict, info: dict | None, threads: int | None, log) -> "Predictor":
        """The measured choice on a bundle (fp32 ONNX Runtime where it cannot run), else PyTorch."""
        name, why = choose_engine(info["engines"], runnable_here) if info and info.get("engines") else (FP32, "")
        failed: list[tuple[str, str]] = []  # (engine, why) for each that would not run here
        for candidate in dict.fromkeys((name, FP32)):
            try:
                predictor = cls._build(candidate, folder, meta, info, threads)
            except _Unavailable as e:
                failed.append((candidate, e.why))
                continue
            if failed:
                log(f"engine: {candidate} (fp32: {failed[0][0]} will not run here: {failed[0][1]})")
            elif why:
                log(f"engine: {why}")
            return predictor
        if (folder / ONNX).is_file():  # a folder without one (a run folder) has only PyTorch: nothing to say
            log(f"engine: ONNX Runtime unavailable ({failed[-1][1]}); using PyTorch")
        return cls._build("torch", folder, meta, info, threads)

    @classmethod
    def _build(cls, engine: str, folder: Path, meta: dict, info: dict | None, threads: int | None) -> "Predictor":
        """The Predictor on `engine`; raises _Unavailable (why, and what to do) where it cannot run."""
        if engine in ("torch", "bf16"):
            if engine == "bf16" and not cpu_has_bf16():
                forced = " (CNNLAB_CPU_BF16=0 says so)" if os.environ.get("CNNLAB_CPU_BF16") == "0" else ""
                raise _Unavailable(NO_BF16 + forced, f"{NO_BF16}{forced}; use --engine auto, int8 or onnx")
            model, meta = load_model(folder)
            try:
                forward = bf16_forward(model, int(meta["image_size"])) if engine == "bf16" else model
            except Exception as e:  # TorchScript cannot trace every model: no bf16 engine for it, said why
                why = f"the bf16 trace failed ({type(e).__name__}: {str(e)[:160]})"
                raise _Unavailable(why, f"{why}; use --engine auto, onnx or torch") from None
            return cls(forward, meta, engine, folder, info, model)
        name = ONNX if engine == "onnx" else _int8_file(folder, info)
        size = int(meta["image_size"])
        try:
            if not (folder / name).is_file():
                raise OnnxUnavailable(f"{folder} has no {name}")
            session = onnx_session(folder / name, threads, probe=(1, 3, size, size))
        except OnnxUnavailable as e:
            advice = ("serve a bundle made by `cnnlab export RUN` where onnxruntime is installed, or use --engine "
                      "torch" if engine == "onnx" else "use --engine onnx or torch")
            raise _Unavailable(str(e), f"ONNX Runtime cannot be used ({e}); {advice}") from None

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"x": np.ascontiguousarray(x.numpy())})[0])

        return cls(run_onnx, meta, engine, folder, info)

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
        """(N, K) float64 calibrated class probabilities for decoded images (softmax in fp32, as evaluation)."""
        x = to_model_input(torch.from_numpy(np.stack(arrays)), self.mean, self.std)
        return torch.softmax(self._forward(x).float() / self.temperature, 1).double().numpy()

    def predict_proba(self, images) -> np.ndarray:
        """(N, K) class probabilities for image paths or raw bytes (raises DecodeError on bad ones)."""
        return self.predict_arrays([self.decode(im) for im in images])

    def predict(self, images) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(images).argmax(1)]

    def predict_bytes(self, data: bytes) -> np.ndarray:
        """Class probabilities (K,) for one encoded image."""
        return self.predict_arrays([self.decode(data)])[0]

    def class_index(self, name: str | int) -> int:
        """The output index of class `name` (a class name, or its index as a number)."""
        if isinstance(name, int) or (isinstance(name, str) and name.isdecimal() and name not in self.classes_):
            if 0 <= int(name) < len(self.classes_):
                return int(name)
        elif name in self.classes_:
            return self.classes_.index(name)
        raise UserError(f"class {name!r} is not one of the model's classes: {', '.join(self.classes_)} "
                        f"(or their index, 0 to {len(self.classes_) - 1})")

    def explain(self, data: bytes | str | Path, target: str | int | None = None, method: str = DEFAULT_METHOD,
                layer: str | None = None) -> tuple[Explanation, np.ndarray]:
        """The class-activation map of class `target` (default: the predicted one) for one image, and its
        calibrated probabilities (K,) from this Predictor's engine (evaluate/explain.py).

        The map needs gradients, so it is computed on the model's fp32 PyTorch weights whatever the engine;
        the image is decoded and normalised as `predict` does. Raises DecodeError for an unreadable image."""
        array = self.decode(data)
        probs = self.predict_arrays([array])[0]
        index = int(probs.argmax()) if target is None else self.class_index(target)
        model, default = self._explainer()
        (explanation,) = explain_arrays(model, [array], self.mean, self.std, [index], method, layer or default)
        return explanation, probs

    def _explainer(self) -> tuple[torch.nn.Module, str]:
        """A private copy of the fp32 model: a map hooks its layers and turns TTA off while it runs, which must
        not touch the model a concurrent `predict` runs on (the torch engine's)."""
        if self._explained is None:
            model = copy.deepcopy(self.model) if self.model is not None else load_model(self.folder)[0]
            self._explained = model, target_layer(model, self.image_size)
        return self._explained

    def warm(self) -> None:
        """Run on a blank image: the first call picks kernels; `seconds` is the fastest of the next five, the
        model's own cost even on a busy machine (one timing there can hold a whole time slice of another process)."""
        blank = [np.zeros((3, self.image_size, self.image_size), np.uint8)]
        self.predict_arrays(blank)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            self.predict_arrays(blank)
            times.append(time.perf_counter() - start)
        self.seconds = min(times)
