"""Model files: weights as safetensors beside a JSON that describes how to rebuild and feed them.

`model.json` holds the registry name and arguments, the classes in order and the preprocessing
(image size, mean, std), so a run folder alone rebuilds the model; nothing is ever unpickled.
A bundle is the same two files plus the whole model in ONNX (fp32, and int8 where it quantizes) and
`bundle.json` with every file's sha256 (`load_bundle` checks them); `onnx_session` is the one ONNX
Runtime set-up.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from cnnlab.core.errors import UserError
from cnnlab.core.runs import RunFolder, atomic_write, load_json, save_json, sha256_file
from cnnlab.models.registry import create_model, load_state

BUNDLE_FILE = "bundle.json"  # classes, metrics, the "uncertain" threshold, every file's sha256
ONNX = "model.onnx"  # the whole model (logits) in ONNX, any batch size
INT8_ONNX = "model.int8.onnx"  # the same, statically quantized to int8 (absent where the quantizer failed)
BUNDLE_FILES = (RunFolder.weights, RunFolder.model, ONNX, INT8_ONNX)  # the files of a bundle that bundle.json hashes


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    """Write the state dict (parameters and buffers) atomically as safetensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, save(state))


def save_model(model: torch.nn.Module, folder: Path, meta: dict, weights_name: str = RunFolder.weights) -> None:
    save_weights(model, folder / weights_name)
    save_json(folder / RunFolder.model, meta)


def read_meta(folder: str | Path) -> dict:
    """`folder/model.json`: how to rebuild the model and feed it (classes, image size, crop, mean, std)."""
    try:
        return json.loads((Path(folder) / RunFolder.model).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model in {folder}: {type(e).__name__}: {e}") from None


def load_model(folder: str | Path, weights_name: str = RunFolder.weights) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model described by `folder/model.json` and load its safetensors weights."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        model = create_model(meta["model_name"], len(meta["classes"]), meta.get("input_size") or meta["image_size"],
                             empty=True, **meta.get("model_args", {}))
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"cannot load the model in {folder}: {type(e).__name__}: {e}") from None
    load_weights(model, folder / weights_name, meta["model_name"])
    model.eval()
    return model, meta


def load_weights(model: torch.nn.Module, path: Path, name: str) -> None:
    """The whole model's safetensors weights from `path` into `model` (an empty build too: `load_state`);
    a file that does not fit `name` is one UserError."""
    try:
        state = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as e:  # missing, unreadable, or not a safetensors file
        raise UserError(f"cannot load the model in {path.parent}: {type(e).__name__}: {e}") from None
    try:
        missing, unexpected = load_state(model, state)
    except RuntimeError as e:  # a tensor of another shape
        raise UserError(f"weights in {path} do not fit the model {name}: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise UserError(f"weights in {path} do not fit the model {name} "
                        f"(missing {len(missing)}, unexpected {len(unexpected)})")


def to_onnx(module: torch.nn.Module, example: torch.Tensor, output: str, dynamic_batch: bool) -> bytes:
    """ONNX bytes of `module` traced on `example` (input named "x"); the batch axis fixed or dynamic."""
    buf = io.BytesIO()
    axes = {"x": {0: "n"}, output: {0: "n"}} if dynamic_batch else None
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), buf, input_names=["x"], output_names=[output],
                          dynamic_axes=axes, dynamo=False, opset_version=17)
    return buf.getvalue()


class OnnxUnavailable(Exception):
    """ONNX Runtime cannot run this model here (not installed, or the model does not load or run);
    str(error) is the reason, with the original exception's type."""


def _ort_errors() -> tuple[type[BaseException], ...]:
    """What ONNX Runtime raises for a model it cannot load or run: its own exception types (plain
    Exception subclasses, one per status code), and the Python wrapper's RuntimeError and ValueError."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return (*own, RuntimeError, ValueError, OSError)


def onnx_session(model: bytes | str | Path, threads: int | None = None, probe: tuple[int, ...] | None = None):
    """An ONNX Runtime CPU session on `model` (ONNX bytes or a file) with `threads` intra-op threads
    (None: ONNX Runtime's default, one per core) and no inter-op pool. With `probe`, one run on zeros
    of that shape proves the session runs, not just loads.

    Raises:
        OnnxUnavailable: onnxruntime is not installed, or it cannot load or run the model.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise OnnxUnavailable(f"onnxruntime is not installed ({type(e).__name__}: {e})") from None
    try:
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        if probe is not None:
            session.run(None, {"x": np.zeros(probe, np.float32)})
    except _ort_errors() as e:
        raise OnnxUnavailable(f"{type(e).__name__}: {str(e)[:200]}") from None
    return session


def bundle_folder(path: str | Path) -> Path:
    """The bundle folder at `path`, or in the run folder `path` (its bundle/); UserError when neither."""
    folder = Path(path)
    if not (folder / BUNDLE_FILE).is_file() and (RunFolder(folder).bundle / BUNDLE_FILE).is_file():
        folder = RunFolder(folder).bundle
    if not (folder / BUNDLE_FILE).is_file():
        raise UserError(f"{path} is not a bundle (no {BUNDLE_FILE}); make one with `cnnlab export RUN`")
    return folder


def load_bundle(path: str | Path) -> tuple[Path, dict]:
    """(folder, bundle.json) after checking every file's sha256; accepts a bundle or a run folder."""
    folder = bundle_folder(path)
    info = load_json(folder / BUNDLE_FILE)
    for name, digest in info.get("files", {}).items():
        if not (folder / name).is_file():
            raise UserError(f"bundle {folder}: {name} is missing; export it again")
        if sha256_file(folder / name) != digest:
            raise UserError(f"bundle {folder}: {name} does not match its sha256 in {BUNDLE_FILE} (changed or "
                            "corrupted); export it again")
    return folder, info
