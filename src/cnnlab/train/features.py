"""Cached backbone features for the frozen phase: computed once per image and view, then the head
trains on them in seconds instead of re-running the backbone every epoch.

Extraction runs on the fastest engine that agrees with PyTorch: ONNX Runtime (the backbone
exported at a fixed batch shape, which ORT runs several times faster than eager PyTorch runs
depthwise convolutions on a CPU), checked against fp32 PyTorch on the first batch, with PyTorch
as the fallback. Features are kept in the user cache under a key made of the backbone's weights,
the preprocessing and the images' content hashes, so a second run (another head, another
learning rate) skips extraction.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time

import numpy as np
import torch

from cnnlab.data.loaders import Loader, Loaders, MemorySource
from cnnlab.core.env import cache_dir
from cnnlab.models.checkpoint import OnnxUnavailable, onnx_session, to_onnx

AGREE_ATOL = 1e-3  # |ORT - PyTorch| allowed, relative to the features' scale
BATCH = 64  # extraction batch: large enough for throughput, small enough for 224 px activations


class _Features(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


class TorchEngine:
    """The backbone in PyTorch, on the device its weights are on (the loaders' batches are on the CPU)."""

    name = "pytorch"

    def __init__(self, model):
        self.model = model.eval()
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return self.model.features(x).float().cpu().numpy()


class OnnxEngine:
    """The backbone in ONNX Runtime at a fixed batch size; short batches are padded."""

    name = "onnxruntime"

    def __init__(self, model, batch: int, size: int, threads: int):
        cpu = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
        onnx = to_onnx(_Features(cpu), torch.zeros(batch, 3, size, size), "f", dynamic_batch=False)
        self.session = onnx_session(onnx, threads)  # OnnxUnavailable: no onnxruntime, or it cannot load it
        self.batch = batch

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        n = len(x)
        xb = x.contiguous().numpy()
        if n < self.batch:
            xb = np.concatenate([xb, np.zeros((self.batch - n, *xb.shape[1:]), xb.dtype)])
        return self.session.run(None, {"x": xb})[0][:n]


def make_engine(model, kind: str, batch: int, size: int, probe: torch.Tensor, threads: int, log=print):
    """The engine `kind` asks for (auto = ONNX Runtime when it agrees with PyTorch on `probe`)."""
    torch_engine = TorchEngine(model)
    if kind == "torch":
        return torch_engine
    if kind == "auto" and torch_engine.device.type != "cpu":  # ONNX Runtime here runs on the CPU: slower than a GPU
        log(f"features: PyTorch on {torch_engine.device}")
        return torch_engine
    try:
        engine = OnnxEngine(model, batch, size, threads)
        fast, ref = engine(probe), torch_engine(probe)
        err = float(np.abs(fast - ref).max())
        scale = max(1.0, float(np.abs(ref).max()))
        if err <= AGREE_ATOL * scale:
            log(f"features: ONNX Runtime (agrees with PyTorch fp32 to {err:.1e} on {len(probe)} images)")
            return engine
        log(f"features: ONNX Runtime differs from PyTorch by {err:.2e}; using PyTorch")
    except OnnxUnavailable as e:  # no onnxruntime, or it cannot load or run the backbone
        log(f"features: ONNX Runtime unavailable ({str(e)[:160]}); using PyTorch")
    except Exception as e:
        # Kept broad on purpose: it guards the ONNX export of an arbitrary backbone (timm models, custom
        # CNNs), and the TorchScript tracer and exporter raise many unrelated types for a module they cannot
        # trace (RuntimeError, TypeError, torch.onnx.errors.*, AttributeError, ...), and session.run
        # raises ONNX Runtime's own types. Any of them only means this speed-up is unavailable: training
        # goes on with PyTorch, and the reason is logged, never swallowed.
        log(f"features: ONNX Runtime unavailable ({type(e).__name__}: {str(e)[:120]}); using PyTorch")
    return torch_engine


def _state_key(model) -> str:
    h = hashlib.sha256()
    for k, v in model.backbone.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _extract(engine, loader: Loader, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(features, the loader's indices they belong to): a streaming loader leaves out files that do not
    decode, so the features of image k are not always row k."""
    parts, kept = [], []
    for x, _, idx in loader:
        parts.append(engine(x.flip(3) if flip else x))
        kept.append(idx.numpy())
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(parts), np.concatenate(kept).astype(np.int64)


def feature_loaders(model, loaders: Loaders, *, views: int, engine: str, batch_size: int, eval_batch_size: int,
                    seed: int, threads: int, log=print) -> tuple[Loaders, dict]:
    """Loaders over cached features: train holds `views` rows per image (the image, then its mirror).

    Returns the loaders and {'engine', 'seconds', 'images_per_second', 'cached'} for the record.
    """
    key = hashlib.sha256(f"{model.model_name}|{model.input_size}|{loaders.image_size}|{loaders.mean}|"
                         f"{loaders.std}|{_state_key(model)}".encode())
    plain = {s: getattr(loaders, s) for s in ("train", "val", "test")}
    for s, ld in plain.items():
        key.update(f"{s}:".encode() + "\n".join(ld.paths).encode())
    folder = cache_dir() / "features" / key.hexdigest()[:24]
    jobs = [("train", v) for v in range(views)] + [("val", 0), ("test", 0)]
    record = {"engine": "cache", "seconds": 0.0, "images_per_second": 0.0, "cached": True}
    feats = {}
    if all((folder / f"{s}-{v}{part}.npy").is_file() for s, v in jobs for part in ("", "-index")):
        for s, v in jobs:
            feats[s, v] = (np.load(folder / f"{s}-{v}.npy", allow_pickle=False),
                           np.load(folder / f"{s}-{v}-index.npy", allow_pickle=False))
        log(f"features: loaded from the cache {folder}")
    else:
        ordered = {s: Loader(ld.source, ld.y, ld.paths, BATCH, loaders.mean, loaders.std)
                   for s, ld in plain.items()}
        probe = next(iter(ordered["val"]))[0][:8]
        eng = make_engine(model, engine, BATCH, loaders.image_size, probe, threads, log)
        n = sum(len(ordered[s].y) for s, _ in jobs)
        log(f"features: extracting {n:,} images x views with {eng.name} (once; cached) ...")
        start = time.perf_counter()
        for s, v in jobs:
            feats[s, v] = _extract(eng, ordered[s], flip=v == 1)
        seconds = time.perf_counter() - start
        record = {"engine": eng.name, "seconds": round(seconds, 2), "images_per_second": round(n / seconds, 1),
                  "cached": False}
        log(f"features: {n:,} in {seconds:.1f} s ({n / seconds:.0f} images/s)")
        tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for (s, v), (f, index) in feats.items():
            np.save(tmp / f"{s}-{v}.npy", f)
            np.save(tmp / f"{s}-{v}-index.npy", index)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote the same features first
            pass

    def make(s: str, train: bool) -> Loader:
        ld = plain[s]
        parts = [feats[s, v] for v in range(views if train else 1)]
        x = torch.from_numpy(np.concatenate([f for f, _ in parts]))
        y = torch.cat([ld.y[torch.from_numpy(index)] for _, index in parts])
        paths = [ld.paths[i] for _, index in parts for i in index]
        return Loader(MemorySource(x), y, paths, batch_size if train else eval_batch_size,
                      None, None, train=train, seed=seed)

    out = Loaders(make("train", True), make("val", False), make("test", False), loaders.classes, loaders.mean,
                  loaders.std, loaders.image_size, "features", loaders.rejected)
    return out, record

