"""What a run needs before it trains: its data and split, and its model with starting weights.

Shared by `cnnlab train` (train/run.py), `cnnlab lr-find` and the study's checks, so all three see
the same data, split, sizes and preprocessing. Nothing here writes a file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from cnnlab.core.config import Config
from cnnlab.core.errors import UserError
from cnnlab.core.recipes import DEFAULT_MODEL
from cnnlab.core.runs import RunFolder, load_json, load_run
from cnnlab.data.loaders import first_images
from cnnlab.data.sources import require_trainable, resolve_data, scan_folder
from cnnlab.data.splits import Split, load_split, make_split, require_val_and_test
from cnnlab.models import create_model, get_entry
from cnnlab.models.checkpoint import load_weights
from cnnlab.models.pretrained import is_transfer_name, pretrained_preprocessing
from cnnlab.models.summary import summarize
from cnnlab.models.weights import find_weights, load_backbone
from cnnlab.train.phases import Phase, plan_phases


def data_and_split(cfg: Config, log, split_csv: Path | None = None) -> tuple[Path, Split]:
    """Resolve the data (saying which), scan it and make the split, or reuse `split_csv` / the config's."""
    root, line = resolve_data(cfg.data.path)  # "" and "auto": the default data, saying which
    log(line)
    scan = require_trainable(scan_folder(root))
    for w in scan.warnings:
        log(f"warning: {w}")
    if split_csv or cfg.data.split_file or cfg.model.init:
        split = load_split(split_csv or cfg.data.split_file or RunFolder(cfg.model.init).split, scan)
    else:
        split = make_split(scan, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
                           seed=cfg.data.split_seed, limit_per_class=cfg.data.limit_per_class)
    if split.dropped:
        log(f"leakage: left out {len(split.dropped)} training files whose bytes also appear in val/test")
    require_val_and_test(split)  # before any run folder exists
    return root, split


def class_weights(split: Split) -> torch.Tensor:
    """Inverse-frequency loss weights ("balanced"), from the training split's class counts."""
    counts = np.array([sum(1 for r in split.of("train") if r.label == c) for c in split.classes], dtype=float)
    return torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)


@dataclasses.dataclass(frozen=True)
class ModelSetup:
    name: str
    net: torch.nn.Module  # the network, with its starting weights
    model_args: dict
    size: int  # the images' decode side
    input_size: int  # the network's input side (pretrained backbones upscale smaller images)
    transfer: bool
    phases: list[Phase]
    crop: float
    mean_std: tuple | None  # None: computed from the training images
    weights: dict  # where the starting weights came from, for model.json and summary.json


def build_model(cfg: Config, split: Split, log) -> ModelSetup:
    """Build the model with its starting weights, sizes and preprocessing; check the phases fit it."""
    name = cfg.model.name or DEFAULT_MODEL
    transfer = is_transfer_name(name)
    model_args = {"layers": list(cfg.model.layers)} if name == "custom" else {}
    if cfg.model.layers and name != "custom":
        raise UserError(f"model.layers is only read by model 'custom', not {name!r}; set model.name: custom")
    phases = plan_phases(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=name)), transfer)
    crop, mean_std = 1.0, None
    if transfer:  # preprocessing from the backbone's pretrained config; small data is upscaled inside the model
        prep = pretrained_preprocessing(name)
        input_size = cfg.model.input_size or prep["input_size"]
        size = cfg.data.image_size or input_size
        crop = prep["crop"] if size >= input_size else 1.0
        mean_std = (tuple(prep["mean"]), tuple(prep["std"]))
        model_args = {"head": cfg.model.head, "hidden": cfg.model.head_hidden, "dropout": cfg.model.dropout,
                      "bn": cfg.model.bn}
    else:
        size = cfg.data.image_size or get_entry(name).default_size
        input_size = size
    loaded = transfer and bool(cfg.model.init or cfg.model.pretrained or cfg.model.weights)
    model = create_model(name, len(split.classes), input_size, empty=loaded,  # the weights replace any initialisation
                         **model_args)  # shape errors surface here
    for ph in phases:
        if isinstance(ph.unfreeze, int) and ph.unfreeze > len(model.blocks()):
            raise UserError(f"train.unfreeze {ph.unfreeze}: {name} has {len(model.blocks())} blocks; "
                            f"use at most {len(model.blocks())} or 'all'")
    weights = _initial_weights(model, name, cfg, split, log) if transfer else {}
    return ModelSetup(name, model, model_args, size, input_size, transfer, phases, crop, mean_std, weights)


def check_model(cfg: Config) -> None:
    """The model exists and takes its image size (a dry build; pretrained backbones are checked by name)."""
    name = cfg.model.name or DEFAULT_MODEL
    entry = get_entry(name)
    if not is_transfer_name(name):  # pretrained backbones resize their input inside the model
        args = {"layers": list(cfg.model.layers)} if name == "custom" else {}
        size = cfg.data.image_size or entry.default_size
        summarize(create_model(name, 10, size, **args), size)  # one image through it: every layer fits


def load_saved(model: torch.nn.Module, run: RunFolder) -> None:
    """The full model's weights as the run folder holds them (after a finished phase or run)."""
    load_weights(model, run.weights, getattr(model, "model_name", type(model).__name__))


def init_from_data(model, loaders, device) -> None:
    """Layers set from the training images before training (FastNet's whitening stem), if the model has any."""
    if hasattr(model, "init_from_data"):
        model.init_from_data(first_images(loaders.train, 5000).to(device))


def _initial_weights(model, name: str, cfg: Config, split: Split, log) -> dict:
    """Load the backbone's starting weights (a run with --from, or ImageNet weights); return their record."""
    m = cfg.model
    if m.init:
        try:
            run = load_run(m.init)
        except UserError as e:
            raise UserError(f"--from: {e}") from None
        meta = load_json(run.model)
        if meta["model_name"] != name or list(meta["classes"]) != list(split.classes):
            raise UserError(f"--from {run.dir}: that run trained {meta['model_name']} on classes {meta['classes']}; "
                            f"this run wants {name} on {list(split.classes)}")
        if meta.get("model_args") != {"head": m.head, "hidden": m.head_hidden, "dropout": m.dropout, "bn": m.bn}:
            raise UserError(f"--from {run.dir}: its head settings {meta.get('model_args')} differ from this config's")
        load_saved(model, run)
        log(f"weights: from run {run.dir}")
        return {"init_run": str(run.dir), "weights_sha256": meta.get("weights_sha256", ""),
                "weights_source": f"run {run.dir}"}
    if not (m.pretrained or m.weights):
        return {"weights_sha256": "", "weights_source": "random initialisation"}
    w = find_weights(name, m.weights)
    load_backbone(model, w.state, name)
    log(f"weights: {w.source} (sha256 {w.sha256[:12]})")
    return {"weights_sha256": w.sha256, "weights_source": w.source}
