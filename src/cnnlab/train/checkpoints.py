"""Training checkpoints: everything needed to continue a run exactly, in one safetensors file.

`checkpoint.safetensors` holds the model, the optimizer's tensors and the RNG states as tensors,
and the rest (epoch and step, early-stopping state, history, optimizer hyper-parameters, scheduler
state, Python and NumPy RNG state) as JSON in the file's metadata. Nothing is pickled. It is
written atomically, so the previous checkpoint stays intact until the new one is complete.
`save_train` rewrites the train settings of config.yaml that a time budget re-plans, which a resume follows.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, safe_open, save

from cnnlab.core.config import dump_config, load_config
from cnnlab.core.errors import UserError
from cnnlab.core.runs import RunFolder, atomic_write



def capture_rng() -> tuple[dict, dict]:
    """(tensors, json) for the global Python, NumPy and torch RNG states, each GPU's too where CUDA is in use
    (dropout and random augmentation on the GPU draw from them)."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": [py[0], list(py[1]), py[2]], "numpy": [name, int(pos), int(has_gauss), float(gauss)]}


def restore_rng(tensors: dict, state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, pos, has_gauss, g = state["numpy"]
    np.random.set_state((name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, g))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():  # the same GPUs: their draws
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, progress: dict,
                    loader_state: torch.Tensor | None, scaler=None) -> Path:
    """Write the full training state; `progress` is JSON (epoch, step, history, best, ...); `scaler`: fp16's
    GradScaler, whose loss scale a resume continues from rather than searching for it again."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, v in st.items():
            tensors[f"optim.{idx}.{name}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    rng_tensors, rng_state = capture_rng()
    tensors.update(rng_tensors)
    if loader_state is not None:
        tensors["rng.loader"] = loader_state
    meta = {"progress": progress, "rng": rng_state, "param_groups": opt["param_groups"],
            "scheduler": scheduler.state_dict()}
    if scaler is not None and scaler.is_enabled():
        meta["scaler"] = scaler.state_dict()  # plain numbers: the scale, its growth tracker and settings
    data = save(tensors, metadata={"cnnlab": json.dumps(meta)})
    return atomic_write(RunFolder(run_dir).checkpoint, data)


def load_checkpoint(run_dir: Path) -> tuple[dict, dict]:
    """(tensors, meta) of the run's checkpoint, or a UserError saying why it cannot be resumed."""
    path = RunFolder(run_dir).checkpoint
    if not path.is_file():
        raise UserError(f"{run_dir} has no {RunFolder.checkpoint} to resume from (it finished, or never completed a step)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["cnnlab"])
        return load_file(str(path)), meta
    except Exception as e:  # a damaged file must not take the user down with a traceback
        raise UserError(f"{path} cannot be read ({type(e).__name__}); it is damaged") from None


def restore_training(tensors: dict, meta: dict, model, optimizer, scheduler, scaler=None) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and scaler.is_enabled() and "scaler" in meta:
        scaler.load_state_dict(meta["scaler"])
    restore_rng(tensors, meta["rng"])


def save_train(path: Path, **changes) -> None:
    """Rewrite a run's config.yaml with train settings changed. The one exception to "a config is never
    changed": a time budget re-plans the steps (the epochs, the last one's cut, the warm-up kept in steps) during
    the run, and a resume must follow the schedule the run has."""
    used = load_config(path)
    atomic_write(path, dump_config(dataclasses.replace(used, train=dataclasses.replace(used.train, **changes))))
