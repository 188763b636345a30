"""Model files: weights as safetensors beside a JSON that describes how to rebuild and feed them.

`model.json` holds the registry name and arguments, the classes in order and the preprocessing
(image size, mean, std), so a run folder alone rebuilds the model; nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from cnnlab.core.errors import UserError
from cnnlab.core.runs import atomic_write, save_json
from cnnlab.models.registry import create_model


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    """Write the state dict (parameters and buffers) atomically as safetensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, save(state))


def save_model(model: torch.nn.Module, folder: Path, meta: dict, weights_name: str = "model.safetensors") -> None:
    save_weights(model, folder / weights_name)
    save_json(folder / "model.json", meta)


def load_model(folder: str | Path, weights_name: str = "model.safetensors") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model described by `folder/model.json` and load its safetensors weights."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "model.json").read_text())
        model = create_model(meta["model_name"], len(meta["classes"]), meta.get("input_size") or meta["image_size"],
                             **meta.get("model_args", {}))
        state = load_file(str(folder / weights_name))
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"cannot load the model in {folder}: {type(e).__name__}: {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"weights in {folder / weights_name} do not fit the model {meta['model_name']} "
                        f"(missing {len(missing)}, unexpected {len(unexpected)})")
    model.eval()
    return model, meta


def to_onnx(module: torch.nn.Module, example: torch.Tensor, output: str, dynamic_batch: bool) -> bytes:
    """ONNX bytes of `module` traced on `example` (input named "x"); the batch axis fixed or dynamic."""
    buf = io.BytesIO()
    axes = {"x": {0: "n"}, output: {0: "n"}} if dynamic_batch else None
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), buf, input_names=["x"], output_names=[output],
                          dynamic_axes=axes, dynamo=False, opset_version=17)
    return buf.getvalue()
