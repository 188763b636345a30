"""The Python API: the same verbs as the CLI (`audit`, `train`, `lr_find`, `study`, `report`, `evaluate`,
`predict`, `summary`).

Data flows one way: config -> resolve and scan the data -> split -> model -> run folder ->
loaders -> fit -> evaluate on the test split -> summary.json and report. Every user mistake is
raised as `UserError` before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from cnnlab.core import signals
from cnnlab.core.config import Config, config_to_dict, dump_config, load_config
from cnnlab.core.env import env_info, precision_note, resolve_precision, seed_everything, set_threads
from cnnlab.core.errors import UserError, WeightsNotFound
from cnnlab.core.recipes import DEFAULT_MODEL
from cnnlab.core.runs import (atomic_write, find_run, is_finished, load_json, new_run_dir, read_csv, save_json,
                              sha256_file, write_csv)
from cnnlab.data.audit import AuditReport, audit as _audit, format_report, write_audit
from cnnlab.data.decode import DecodeError
from cnnlab.data.loaders import FileSource, Loader, first_images, make_loaders
from cnnlab.data.sources import default_data, require_trainable, resolve_data, scan_folder
from cnnlab.data.splits import Row, Split, load_split, make_split, manifest_hash, require_val_and_test, save_split
from cnnlab.evaluate.evaluation import write_evaluation
from cnnlab.evaluate.plots import plot_curves
from cnnlab.evaluate.predict import Predictor, inference_speed, predict_loader
from cnnlab.evaluate.run_report import write_run_report
from cnnlab.models import create_model, get_entry
from cnnlab.models.checkpoint import load_model, save_model
from cnnlab.models.pretrained import is_transfer_name, pretrained_preprocessing
from cnnlab.models.summary import count_params, format_summary, summarize
from cnnlab.models.weights import find_weights, load_backbone
from cnnlab.train.checkpoints import load_checkpoint
from cnnlab.train.distributed import is_main_process  # noqa: F401 (the CLI asks through the API)
from cnnlab.train.distributed import barrier, broadcast, cleanup, device_for, setup
from cnnlab.train.features import feature_loaders
from cnnlab.train.loop import HISTORY_COLUMNS, FitResult, fit
from cnnlab.train.lr_find import lr_range_test
from cnnlab.train.phases import plan_phases


def audit(data: str, out: str | Path = "audit.json", workers: int = 2, log=print) -> AuditReport:
    """Decode every image of `data`, print the summary, write `out` plus two figures beside it."""
    root, line = resolve_data(data)
    log(line)
    scan = scan_folder(root)
    if not scan.items:
        raise UserError(f"no images found in {root}; expected class subfolders of images (or train/ and test/ folders)")
    report = _audit(scan, workers=workers)
    log(format_report(report))
    for p in write_audit(report, scan, Path(out)):
        log(f"wrote {p}")
    return report


def summary(name: str, image_size: int = 0, num_classes: int = 10) -> str:
    entry = get_entry(name)
    size = image_size or entry.default_size
    return format_summary(name, summarize(create_model(name, num_classes, size), size), size)


def _class_weights(split: Split) -> torch.Tensor:
    counts = np.array([sum(1 for r in split.of("train") if r.label == c) for c in split.classes], dtype=float)
    return torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)


# What a resumed run may change; everything else must match the checkpointed run.
RESUMABLE_CHANGES = {"train.epochs", "train.patience", "train.checkpoint_steps", "train.threads", "train.compile",
                     "train.eval_batch_size", "data.workers", "data.loader", "data.memory_cap_mb", "out", "tag"}
# How a run is carried out, not what it computes: a study whose file changes only these trains nothing again.
OPERATIONAL = RESUMABLE_CHANGES - {"train.epochs", "train.patience"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _check_resumable(saved: Config, cfg: Config, run_dir: Path) -> None:
    a, b = _flat(config_to_dict(saved)), _flat(config_to_dict(cfg))
    changed = [k for k in a if k not in RESUMABLE_CHANGES and a[k] != b.get(k)]
    if changed:
        k = changed[0]
        raise UserError(f"cannot resume {run_dir}: {k} was {a[k]!r} and is now {b.get(k)!r}; "
                        f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume")


def train(cfg: Config, progress: bool = True, log=print, resume: str | Path | None = None) -> Path:
    """Train and evaluate one model as `cfg` says; return its run folder.

    Args:
        cfg: a validated Config (see core/config.py).
        progress: show a per-epoch progress bar on a terminal.
        log: where progress lines go (also written to the run's log.txt).
        resume: a run folder to continue from its checkpoint (cfg must be compatible).
    """
    with signals.handled():
        return _train(cfg, progress, log, resume)


def _train(cfg: Config, progress: bool, log, resume: str | Path | None) -> Path:
    dist = setup()
    if not dist.main:
        log = _quiet
    checkpoint = None
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir} is not a run folder (no config.yaml); pass the folder printed as 'run: ...'")
        if is_finished(run_dir):  # its schedule has ended: more epochs would be another run, not this one
            s = load_json(run_dir / "summary.json")
            epochs = len(read_csv(run_dir / "history.csv")) if (run_dir / "history.csv").is_file() else 0
            raise UserError(f"{run_dir} already finished ({s['status']} after {epochs} epoch{'s' * (epochs != 1)}); "
                            "--resume only "
                            "continues a stopped run. To train longer, start a new run with more --epochs "
                            f"(its settings are in {run_dir / 'config.yaml'})")
        if (run_dir / "checkpoint.safetensors").is_file():
            checkpoint = load_checkpoint(run_dir)
        else:  # stopped before its first checkpoint: nothing was learned yet, start again in the same folder
            log(f"{run_dir} has no checkpoint yet: training it from the first step")
        _check_resumable(load_config(run_dir / "config.yaml"), cfg, run_dir)
    root, split = _data_and_split(cfg, log, run_dir / "split.csv" if resume else None)
    if cfg.train.batch_size % dist.world:
        raise UserError(f"train.batch_size {cfg.train.batch_size} must divide by the {dist.world} processes")
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    m = _model_setup(cfg, split, log)
    name, model, model_args, size, input_size = m.name, m.model, m.model_args, m.size, m.input_size
    transfer, phases, crop, mean_std, weights = m.transfer, m.phases, m.crop, m.mean_std, m.weights
    model_text = format_summary(name, summarize(model, size), size)
    run_info = {"split_sha256": manifest_hash(split), "world": dist.world}
    saved_info = {k: checkpoint[1]["progress"].get("run", {}).get(k) for k in run_info} if checkpoint else run_info
    if saved_info != run_info:
        raise UserError(f"cannot resume {run_dir}: its checkpoint was made with {saved_info}, "
                        f"now {run_info} (different data split or number of processes)")

    device = device_for(dist)
    threads = set_threads(cfg.train.threads, dist.local_world)
    precision = resolve_precision(cfg.train.precision, device)
    resolved = dataclasses.replace(  # what config.yaml records: the values used, not "auto"
        cfg, data=dataclasses.replace(cfg.data, path=str(root), image_size=size),
        train=dataclasses.replace(cfg.train, precision=precision),
        model=dataclasses.replace(cfg.model, name=name, input_size=input_size if transfer else 0))
    with signals.deferred():  # a run folder, once it exists, holds what --resume needs
        if not resume:
            run_dir = broadcast(new_run_dir(cfg.out, name, cfg.tag) if dist.main else None, dist)
        log_file = open(run_dir / "log.txt", "a", buffering=1) if dist.main else None
        if dist.main and not resume:
            atomic_write(run_dir / "config.yaml", dump_config(resolved))
            save_split(split, run_dir / "split.csv")
            save_json(run_dir / "env.json", env_info(device))
            atomic_write(run_dir / "model_summary.txt", model_text)

    def tee(msg: str) -> None:
        log(msg)
        if log_file:
            log_file.write(msg + "\n")

    try:
        tee(f"run folder {run_dir}" + (" (resuming)" if resume else ""))
        signals.raise_if_requested()
        if dist.main and not resume:
            _plot_distribution(split, run_dir)
        if not dist.main:
            barrier(dist)  # rank 0 builds the tensor cache first; the others then read it
        loaders = make_loaders(root, split, size, cfg.train.batch_size // dist.world, cfg.train.eval_batch_size,
                               loader=cfg.data.loader, memory_cap_mb=cfg.data.memory_cap_mb, augment=cfg.data.augment,
                               pad=cfg.data.crop_padding, seed=cfg.train.seed, workers=cfg.data.workers,
                               mean_std=mean_std, crop=crop, rank=dist.rank, world=dist.world,
                               device=device if device.type == "cuda" and not transfer else None, log=tee)
        if dist.main:
            barrier(dist)
        if loaders.rejected:
            tee(f"left out {len(loaders.rejected)} files that do not decode (see rejected.csv)")
            if dist.main:
                write_csv(run_dir / "rejected.csv", ["path", "reason"], loaders.rejected)
        tee(f"{len(split.of('train')):,} train / {len(split.of('val')):,} val / {len(split.of('test')):,} test images, "
            f"{len(split.classes)} classes, {size}x{size} px, {loaders.kind} loader, {precision}, {threads} threads"
            + (f", {dist.world} processes" if dist.active else ""))
        note = precision_note(cfg.train.precision, precision, device)
        if note:
            tee(note)
        meta = {"model_name": name, "model_args": model_args, "classes": list(split.classes), "image_size": size,
                "input_size": input_size, "crop": crop, "mean": list(loaders.mean), "std": list(loaders.std),
                "preprocessing": "decode (EXIF, RGB) -> shorter side to image_size / crop, centre crop -> "
                                 "(x/255-mean)/std" + (f" -> resized to {input_size} inside the model"
                                                       if input_size != size else ""),
                "split_sha256": run_info["split_sha256"], **weights}
        model = model.to(device).to(memory_format=torch.channels_last)
        if checkpoint is None:  # a resumed run has these layers in its checkpoint
            _init_from_data(model, loaders, device)
        result, phase_records, evaluator = _run_phases(
            model, phases, loaders, cfg, run_dir, meta, device=device, precision=precision, threads=threads,
            class_weights=_class_weights(split) if cfg.train.class_weights == "balanced" else None,
            log=tee, progress=progress, checkpoint=checkpoint, dist=dist, run_info=run_info)
        if dist.main:
            with signals.deferred():  # evaluation and report complete the folder before a signal ends the run
                _finish(model, result, split, loaders, run_dir, root, meta, cfg, precision, device, tee,
                        phase_records, evaluator)
        barrier(dist)
        signals.raise_if_requested()
    except signals.Interrupted as e:
        if dist.main and is_finished(run_dir):  # it came during the final evaluation or report: nothing to resume
            tee(f"stopped by {e.name} after the run completed")
        else:
            e.run_dir = run_dir
            tee(f"interrupted by {e.name}; continue with: cnnlab train --resume {run_dir}")
        raise
    except Exception as e:  # the folder says it failed and why, so no one mistakes it for a run to finish
        if dist.main:
            log_file.close()
            _record_failure(run_dir, e)
        raise
    finally:
        if log_file:
            log_file.close()
        cleanup(dist)
    return run_dir


def _record_failure(run_dir: Path, error: Exception) -> None:
    import traceback

    message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error} (a bug in cnnlab)"
    with open(run_dir / "log.txt", "a") as log_file:  # the traceback for the log only: Python prints it too
        if not isinstance(error, UserError):
            log_file.write("".join(traceback.format_exception(error)))
        log_file.write(f"status: failed ({message}); continue with: cnnlab train --resume {run_dir}\n")
    old = load_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    save_json(run_dir / "summary.json", {**old, "status": "failed", "message": message})


@dataclasses.dataclass
class _ModelSetup:
    name: str
    model: torch.nn.Module
    model_args: dict
    size: int  # the images' decode side
    input_size: int  # the network's input side (pretrained backbones upscale smaller images)
    transfer: bool
    phases: list
    crop: float
    mean_std: tuple | None
    weights: dict


def _data_and_split(cfg: Config, log, split_csv: Path | None = None) -> tuple[Path, Split]:
    """Resolve the data (saying which), scan it and make or reuse the split."""
    data, line = cfg.data.path, None
    if not data:
        data, line = default_data()
    root, resolved_line = resolve_data(data)
    log(line or resolved_line)
    scan = require_trainable(scan_folder(root))
    for w in scan.warnings:
        log(f"warning: {w}")
    if split_csv or cfg.data.split_file or cfg.model.init:
        split = load_split(split_csv or cfg.data.split_file or Path(cfg.model.init) / "split.csv", scan)
    else:
        split = make_split(scan, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
                           seed=cfg.data.split_seed, limit_per_class=cfg.data.limit_per_class)
    if split.dropped:
        log(f"leakage: left out {len(split.dropped)} training files whose bytes also appear in val/test")
    require_val_and_test(split)  # before any run folder exists
    return root, split


def _model_setup(cfg: Config, split: Split, log) -> _ModelSetup:
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
    model = create_model(name, len(split.classes), input_size, **model_args)  # shape errors surface here
    for ph in phases:
        if isinstance(ph.unfreeze, int) and ph.unfreeze > len(model.blocks()):
            raise UserError(f"train.unfreeze {ph.unfreeze}: {name} has {len(model.blocks())} blocks; "
                            f"use at most {len(model.blocks())} or 'all'")
    weights = _initial_weights(model, name, cfg, split, log) if transfer else {}
    return _ModelSetup(name, model, model_args, size, input_size, transfer, phases, crop, mean_std, weights)


def lr_find(cfg: Config, log=print) -> Path:
    """The learning-rate range test for `cfg`'s model and data (its first phase's trainable weights).

    Writes lr_find.json and lr_find.png into a new folder under cfg.out and returns it.
    """
    from cnnlab.core.figures import save_figure
    from cnnlab.train.lr_find import plot_lr_find

    root, split = _data_and_split(cfg, log)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    m = _model_setup(cfg, split, log)
    if m.phases[0].unfreeze is not None:
        m.model.set_trainable(m.phases[0].unfreeze)
    set_threads(cfg.train.threads)
    folder = new_run_dir(cfg.out, m.name, cfg.tag or "lr-find")
    loaders = make_loaders(root, split, m.size, cfg.train.batch_size, cfg.train.eval_batch_size,
                           loader=cfg.data.loader, memory_cap_mb=cfg.data.memory_cap_mb, augment=cfg.data.augment,
                           pad=cfg.data.crop_padding, seed=cfg.train.seed, workers=cfg.data.workers,
                           mean_std=m.mean_std, crop=m.crop, log=log)
    train_cfg = dataclasses.replace(cfg.train, lr=1e-7)
    model = m.model.to(memory_format=torch.channels_last)
    _init_from_data(model, loaders, torch.device("cpu"))
    result = lr_range_test(model, loaders.train, train_cfg, torch.device("cpu"))
    save_json(folder / "lr_find.json", {"model": m.name, "optimizer": cfg.train.optimizer, **result})
    save_figure(plot_lr_find(result, f"{m.name}, {cfg.train.optimizer}, batch {cfg.train.batch_size}"),
                folder / "lr_find.png")
    log(f"suggested learning rate {result['suggestion']:.3g} (lowest smoothed loss at {result['lr_min_loss']:.3g}, "
        f"steepest descent at {result['lr_steepest']:.3g}); use it with --lr or set train.lr: auto")
    return folder


def _init_from_data(model, loaders, device) -> None:
    """Layers set from the training images before training (FastNet's whitening stem), if the model has any."""
    if hasattr(model, "init_from_data"):
        model.init_from_data(first_images(loaders.train, 5000).to(device))


def _quiet(msg: str) -> None:
    pass


def _load_saved(model, run_dir: Path) -> None:
    """The full model's weights as the run folder holds them (after a finished phase or run)."""
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))


def _initial_weights(model, name: str, cfg: Config, split: Split, log) -> dict:
    """Load the backbone's starting weights (a run with --from, or ImageNet weights); return their record."""
    m = cfg.model
    if m.init:
        run = find_run(m.init)
        if not (run / "model.json").is_file() or not (run / "model.safetensors").is_file():
            raise UserError(f"--from {run}: it has no trained model (model.json + model.safetensors)")
        meta = load_json(run / "model.json")
        if meta["model_name"] != name or list(meta["classes"]) != list(split.classes):
            raise UserError(f"--from {run}: that run trained {meta['model_name']} on classes {meta['classes']}; "
                            f"this run wants {name} on {list(split.classes)}")
        if meta.get("model_args") != {"head": m.head, "hidden": m.head_hidden, "dropout": m.dropout, "bn": m.bn}:
            raise UserError(f"--from {run}: its head settings {meta.get('model_args')} differ from this config's")
        _load_saved(model, run)
        log(f"weights: from run {run}")
        return {"init_run": str(run), "weights_sha256": meta.get("weights_sha256", ""),
                "weights_source": f"run {run}"}
    if not (m.pretrained or m.weights):
        return {"weights_sha256": "", "weights_source": "random initialisation"}
    w = find_weights(name, m.weights)
    load_backbone(model, w.state, name)
    log(f"weights: {w.source} (sha256 {w.sha256[:12]})")
    return {"weights_sha256": w.sha256, "weights_source": w.source}


def _run_phases(model, phases, loaders, cfg, run_dir, meta, *, device, precision, threads, class_weights, log,
                progress, checkpoint, dist, run_info):
    """Run each phase's fit; a resumed run skips the phases it finished. Returns the combined result."""
    done = load_json(run_dir / "phases.json") if (run_dir / "phases.json").is_file() else []
    rows = [r for d in done for r in d["history"]]
    result, evaluator = None, (model, loaders.test)
    for ph in phases:
        if any(d["name"] == ph.name for d in done):
            continue
        if done:  # continue from the weights the finished phases left
            _load_saved(model, run_dir)
        if ph.unfreeze is not None:
            model.set_trainable(ph.unfreeze)
        total, trainable = count_params(model)
        resume = checkpoint if checkpoint and checkpoint[1]["progress"]["run"].get("phase", "scratch") == ph.name \
            else None
        features = None
        if ph.cached and not dist.active:
            ld, features = feature_loaders(model, loaders, views=cfg.train.feature_views,
                                           engine=cfg.train.feature_engine, batch_size=ph.train.batch_size,
                                           eval_batch_size=cfg.train.eval_batch_size, seed=cfg.train.seed,
                                           threads=threads, log=log)
            net, best_file, evaluator = model.head, "head.safetensors", (model.head, ld.test)
        else:
            ld, best_file, evaluator = loaders, "model.safetensors", (model, loaders.test)
            net = DistributedDataParallel(model) if dist.active else model
        train_cfg = ph.train
        if train_cfg.lr == "auto":  # the range test on this phase's trainable weights and data
            found = lr_range_test(net, ld.train, dataclasses.replace(train_cfg, lr=1e-7), device)
            train_cfg = dataclasses.replace(train_cfg, lr=found["suggestion"])
            log(f"lr auto: range test suggests {found['suggestion']:.3g} (lowest smoothed loss at "
                f"{found['lr_min_loss']:.3g})")
            if dist.main and len(phases) == 1:  # config.yaml says what was used (a resume then reuses it)
                used = load_config(run_dir / "config.yaml")
                atomic_write(run_dir / "config.yaml", dump_config(dataclasses.replace(
                    used, train=dataclasses.replace(used.train, lr=found["suggestion"]))))
        log(f"phase {ph.name}: lr {train_cfg.lr:g}, {train_cfg.epochs} epoch{'s' * (train_cfg.epochs != 1)}, "
            f"{trainable:,} of {total:,} parameters trainable")
        result = fit(net, ld, train_cfg, run_dir, device=device, precision=precision, class_weights=class_weights,
                     log=log, progress=progress, resume=resume, dist=dist, run_info={**run_info, "phase": ph.name},
                     phase=ph.name, earlier=rows, best_file=best_file)
        seconds = result.train_seconds + (features["seconds"] if features else 0.0)
        record = {"name": ph.name, "lr": train_cfg.lr, "epochs": len(result.history), "status": result.status,
                  "best_epoch": result.best_epoch, "train_seconds": round(seconds, 3),
                  "params_total": total, "params_trainable": trainable, "features": features,
                  "history": result.history}
        if result.best_epoch == 0 and done:  # nothing better than the earlier phase: keep its weights
            _load_saved(model, run_dir)
            evaluator = (model, loaders.test)
        if result.status not in ("completed", "early_stopped"):
            done.append(record)
            break
        done.append(record)
        if dist.main:
            save_model(model, run_dir, meta)  # the full model after this phase
            save_json(run_dir / "phases.json", done)
        rows = rows + result.history
    if result is None:  # every phase had finished (a resume after the last epoch): the saved model is the result
        _load_saved(model, run_dir)
        evaluator = (model, loaders.test)
    last = done[-1]
    history = [r for d in done for r in d["history"]]
    best = 0
    for d in reversed(done):  # the best epoch of the last phase that found one, counted over all phases
        if d["best_epoch"]:
            best = sum(len(e["history"]) for e in done[:done.index(d)]) + d["best_epoch"]
            break
    combined = FitResult(history, best, last["status"], round(sum(d["train_seconds"] for d in done), 3),
                         result.message if result else "")
    return combined, done, evaluator


def _finish(model, result, split, loaders, run_dir, root, meta, cfg, precision, device, tee, phases,
            evaluator) -> None:
    """Evaluate the best weights on the test split; write summary.json, the plots and the report.

    `evaluator` is (module, test loader): the full model on images, or the head on cached features.
    """
    if not result.history:
        write_csv(run_dir / "history.csv", HISTORY_COLUMNS, [])
    params_total, params_trainable = count_params(model)
    summary = {"status": result.status, "message": result.message,
               "model": {"name": meta["model_name"], "params_total": params_total,
                         "params_trainable": params_trainable, "input_size": getattr(model, "input_size", None),
                         "weights_sha256": meta.get("weights_sha256", ""),
                         "weights_source": meta.get("weights_source", "random initialisation")},
               "phases": [{k: v for k, v in d.items() if k != "history"} for d in phases],
               "classes": list(split.classes), "best_epoch": result.best_epoch, "precision": precision,
               "data": {"root": str(root), "image_size": meta["image_size"], "split_sha256": meta["split_sha256"],
                        "counts": split.counts(), "rejected": len(loaders.rejected)},
               "train": config_to_dict(cfg)["train"],
               "time": {"train_seconds": result.train_seconds,
                        "epoch_seconds": [r["seconds"] for r in result.history]}}
    if result.history:
        _plot_curves(result.history, run_dir, meta["model_name"])
    if result.best_epoch and result.status != "interrupted":
        save_model(model, run_dir, meta)
        preds = predict_loader(evaluator[0], evaluator[1], split.classes, device)
        summary["test"] = write_evaluation(preds, root, run_dir)
        best = result.history[result.best_epoch - 1]
        majority = max(np.bincount(loaders.val.y.numpy(), minlength=len(split.classes))) / max(1, len(loaders.val.y))
        if result.status in ("completed", "early_stopped") and best["val_accuracy"] <= majority + 0.01:
            summary["status"] = "failed_to_learn"
            summary["message"] = (f"best validation accuracy {best['val_accuracy']:.4f} is no better than always "
                                  f"predicting the largest class ({majority:.4f}); not a result: try another "
                                  "learning rate")
        summary["inference"] = inference_speed(model, meta["image_size"], device)
        tee(f"test accuracy {summary['test']['accuracy']:.4f}  macro F1 {summary['test']['f1_macro']:.4f}  "
            f"loss {summary['test']['loss']:.4f}  (best epoch {result.best_epoch})")
    save_json(run_dir / "summary.json", summary)
    write_run_report(run_dir)
    tee(f"status: {summary['status']}" + (f" ({summary['message']})" if summary["message"] else ""))


def _plot_curves(history, run_dir: Path, name: str) -> None:
    from cnnlab.core.figures import save_figure

    save_figure(plot_curves(history, title=name), run_dir / "curves.png")


def _plot_distribution(split: Split, run_dir: Path) -> None:
    from cnnlab.core.figures import plot_class_counts, save_figure

    save_figure(plot_class_counts(split.counts()), run_dir / "class_distribution.png")


def evaluate(run: str | Path, data: str | None = None, include_seen: bool = False, log=print) -> Path:
    """Evaluate a trained run on its own test split, or on all images of `data`.

    Images of `data` whose bytes the run trained or validated on (their sha256 is in its split.csv)
    are left out, or with `include_seen` kept and counted. Writes into `RUN/evaluations/<time>-evaluation/`
    and returns that folder.
    """
    run_dir = find_run(run)
    model, meta = load_model(run_dir)
    classes = tuple(meta["classes"])
    if data:
        root, line = resolve_data(data)
        scan = scan_folder(root)
        unknown = sorted(set(scan.classes) - set(classes))
        if unknown:
            raise UserError(f"{root} has classes the model does not know: {', '.join(unknown)}; the model knows "
                            f"{', '.join(classes)}: pass a folder whose class folders are among them")
        if not scan.items:
            raise UserError(f"no images found in {root}")
        items = [i for i in scan.items if i.split == "test"] or list(scan.items)
        seen_hashes = {r["sha256"] for r in read_csv(run_dir / "split.csv") if r["split"] in ("train", "val")} \
            if (run_dir / "split.csv").is_file() else set()
        hashes = {i.path: sha256_file(root / i.path) for i in items}
        seen = [i for i in items if hashes[i.path] in seen_hashes]
        if seen:
            log(f"warning: {len(seen)} of {len(items)} images in {root} are ones the run trained or validated on "
                "(same bytes as in its split.csv); " + ("kept, so the figures are optimistic" if include_seen else
                                                        "left out (--include-seen keeps them)"))
            if not include_seen:
                items = [i for i in items if hashes[i.path] not in seen_hashes]
        if not items:
            raise UserError(f"every image in {root} is one the run trained or validated on; pass new images, "
                            "or --include-seen to evaluate on them anyway")
        split = Split(tuple(Row(i.path, i.label, "test", hashes[i.path]) for i in items), classes)
    else:
        if not (run_dir / "summary.json").is_file():
            raise UserError(f"{run_dir} has no summary.json, so no test split to evaluate on; finish it with "
                            f"`cnnlab train --resume {run_dir}`, or pass --data FOLDER")
        cfg_raw = load_json(run_dir / "summary.json")
        root, line = Path(cfg_raw["data"]["root"]), f"data: the run's test split in {cfg_raw['data']['root']}"
        scan = scan_folder(root)
        split = load_split(run_dir / "split.csv", scan)
        split = Split(tuple(r for r in split.rows if r.split == "test"), classes)
    log(line)
    rows = list(split.rows)
    y = torch.tensor([classes.index(r.label) for r in rows], dtype=torch.long)
    test = Loader(FileSource(root, rows, meta["image_size"], workers=0, crop=meta.get("crop", 1.0)), y,
                  [r.path for r in rows], 64, meta["mean"], meta["std"])
    preds = predict_loader(model, test, classes)
    if not len(preds.targets):
        raise UserError(f"none of the {len(rows)} images in {root} decode; pass a folder of readable images "
                        f"(`cnnlab audit {root}` lists what is wrong)")
    out = new_run_dir(run_dir / "evaluations", "evaluation")  # a new folder, even for two in one second
    metrics = write_evaluation(preds, root, out)
    if data:
        metrics["seen_images"] = {"count": len(seen), "included": include_seen}
    save_json(out / "metrics.json", metrics)
    log(f"accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['f1_macro']:.4f}  loss {metrics['loss']:.4f}  "
        f"on {metrics['n']:,} images")
    return out


def predict(run: str | Path, images: list[str]) -> list[dict]:
    """Class probabilities for each image file: [{path, prediction, probabilities}] or {path, error}."""
    predictor = Predictor.from_run(run)
    out = []
    for path in _image_files(images):
        p = Path(path)
        if p.is_dir():
            out.append({"path": str(path), "error": "a folder with no image files in it"})
            continue
        if not p.is_file():
            out.append({"path": str(path), "error": "file not found"})
            continue
        try:
            probs = predictor.predict_proba([p])[0]
        except DecodeError as e:
            out.append({"path": str(path), "error": f"not a usable image: {e}"})
            continue
        order = np.argsort(-probs)
        out.append({"path": str(path), "prediction": predictor.classes_[order[0]],
                    "probabilities": {predictor.classes_[i]: round(float(probs[i]), 6) for i in order}})
    return out


def _image_files(paths: list[str]) -> list[str]:
    """The paths as given, a folder replaced by the image files in it (in name order)."""
    from cnnlab.data.decode import is_image_name

    out = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_name(f.name)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            out.extend(found or [str(p)])  # an empty folder stays, to be reported
        else:
            out.append(str(p))
    return out


def _study_runs(folder: Path) -> dict[str, Path]:
    """The newest run folder of each child in a study folder, by the tag in its config.yaml."""
    found: dict[str, Path] = {}
    for cfg_file in sorted((folder / "runs").glob("*/config.yaml")):
        tag = load_config(cfg_file).tag
        found[tag] = cfg_file.parent  # sorted by timestamped name: the newest wins
    return found


def study(path: str | Path, out: str | Path = "studies", sets: list[str] = (), progress: bool = True,
          log=print) -> Path:
    """Run every child of a study file in order into one study folder, then write its report.

    A child whose run folder already has summary.json is skipped; one that stopped mid-way is
    resumed from its checkpoint, so a killed study started again redoes nothing it finished.
    A pretrained child whose weights are not on the machine is reported as such, not fatal.
    """
    from cnnlab.core.runs import slug
    from cnnlab.core.study import load_study

    st = load_study(path, sets)
    for child in st.children:  # every run is checked before the first one trains
        if child.config.data.path and not Path(child.config.data.path).exists() and \
                child.config.data.path not in ("cifar10", "digits"):
            raise UserError(f"study {st.name}, run {child.name}: data {child.config.data.path} not found. "
                            + (st.data_help or "Point it at the image folder with --set data.path=FOLDER"))
        try:
            _check_model(child.config)
        except UserError as e:
            raise UserError(f"study {st.name}, run {child.name}: {e}") from None
    folder = Path(out) / slug(st.name)
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    try:
        before = {c["name"]: c for c in load_json(folder / "study.json")["children"]} \
            if (folder / "study.json").is_file() else {}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{folder / 'study.json'} is damaged; move it away and run the study again (finished runs "
                        "are found from their folders)") from None
    # every child's record from the start, so a study stopped mid-way loses none of them
    state = {"name": st.name, "description": st.description, "file": str(path),
             "children": [before.get(c.name, {"name": c.name, "group": c.group, "run": None, "status": "pending"})
                          for c in st.children]}
    existing = _study_runs(folder)
    for i, child in enumerate(st.children, 1):
        cfg = dataclasses.replace(child.config, out=str(folder / "runs"), tag=child.name)
        requested = json.loads(json.dumps(_flat(config_to_dict(child.config))))  # as study.json will hold it
        run = existing.get(child.name)
        old = before.get(child.name, {})
        entry = {"name": child.name, "group": child.group, "run": str(run) if run else None, "status": "pending",
                 "requested": requested, "superseded": old.get("superseded", [])}
        head = f"[{i}/{len(st.children)}] {child.name}"
        changed = [k for k in sorted(set(requested) | set(old.get("requested", {})))
                   if "requested" in old and old["requested"].get(k) != requested.get(k) and k not in OPERATIONAL]
        why = ", ".join(f"{k} {old['requested'].get(k)!r} -> {requested.get(k)!r}" for k in changed[:4])
        if run and not changed and is_finished(run) and _images_changed(child.config, run):
            why = "its data: the images it would split now differ from those in its split.csv"
        if run and why:  # the study file or the data changed this run: train it again, keep the old folder
            log(f"{head}: changed since {run.name} ({why}); training it again, the old run is kept as superseded")
            entry["superseded"] = [*entry["superseded"], str(run)]
            run = None
        if run and is_finished(run):
            entry["status"] = load_json(run / "summary.json")["status"]
            log(f"{head}: already finished ({entry['status']}), skipped")
        else:
            resume = run  # an unfinished run folder continues in place (from its checkpoint, if any)
            log(f"{head}: " + ("resuming " + str(run) if resume else "training"))
            if resume:  # a run continues with its own resolved config, as `cnnlab train --resume` does
                cfg = load_config(run / "config.yaml")
            state["children"][i - 1] = {**entry, "status": "running"}  # what it trains for, before it trains
            save_json(folder / "study.json", state)
            try:
                run = train(cfg, progress=progress, log=log, resume=resume)
                entry.update(run=str(run), status=load_json(run / "summary.json")["status"])
            except WeightsNotFound as e:
                entry.update(status="weights not available", message=str(e).splitlines()[0])
                log(f"{head}: weights not available on this machine; the report says so")
        state["children"][i - 1] = entry
        save_json(folder / "study.json", state)
    report(folder, log=log)
    return folder


def _images_changed(cfg: Config, run: Path) -> bool:
    """Whether the split `cfg` makes now differs from the one `run` trained on (images added, removed, edited)."""
    _, split = _data_and_split(cfg, _quiet)
    return manifest_hash(split) != (load_json(run / "summary.json").get("data") or {}).get("split_sha256")


def _check_model(cfg: Config) -> None:
    """The model exists and takes its image size (a dry build; pretrained backbones are checked by name)."""
    name = cfg.model.name or DEFAULT_MODEL
    entry = get_entry(name)
    if not is_transfer_name(name):  # pretrained backbones resize their input inside the model
        args = {"layers": list(cfg.model.layers)} if name == "custom" else {}
        size = cfg.data.image_size or entry.default_size
        summarize(create_model(name, 10, size, **args), size)  # one image through it: every layer fits


def _not_reportable(run: Path) -> str:
    """Why `run` cannot be a row of a comparison ('' when it can)."""
    if not run.is_dir():
        return "not found; pass the folder printed as 'run: ...' by cnnlab train"
    if (run / "lr_find.json").is_file():
        return "an lr-find folder, not a training run"
    if not (run / "summary.json").is_file():
        return f"not a finished run (no summary.json); finish it with `cnnlab train --resume {run}`, or leave it out"
    summary = load_json(run / "summary.json")
    if summary.get("status") == "failed":
        return f"failed ({summary.get('message', '')}); see its log.txt"
    return ""


def report(folders: list[str | Path] | str | Path, out: str | Path | None = None, log=print) -> Path:
    """Write the comparison report of a study folder, or of run folders, from their files alone.

    Returns the folder holding report.html and report.md (the study folder, or `out`).
    """
    from cnnlab.report.compare import load_run, write_comparison

    folders = [Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders)]
    if not folders:
        raise UserError("give a study folder or run folders to report on")
    rows, unavailable, notes, title = [], [], [], "cnnlab comparison"
    if len(folders) == 1 and (folders[0] / "study.json").is_file():
        try:
            state = load_json(folders[0] / "study.json")
        except ValueError:
            raise UserError(f"{folders[0] / 'study.json'} is not valid JSON; run the study again with "
                            "`cnnlab study FILE` (it redoes nothing finished) to rewrite it") from None
        out, title = out or folders[0], f"Study {state['name']}"
        notes = [state.get("description", "")]
        for c in state["children"]:
            if c.get("superseded"):
                notes.append(f"{c['name']}: the study file changed it since " + ", ".join(
                    Path(r).name for r in c["superseded"]) + " (kept, superseded); the table shows the new run.")
            run = Path(c["run"]) if c.get("run") else None
            why = _not_reportable(run) if run else c.get("status", "not run")
            if why:
                unavailable.append((c["name"], why))
            else:
                rows.append(load_run(run, c["name"], c["group"]))
    else:
        for run in folders:
            why = _not_reportable(run)
            if why:  # e.g. `cnnlab report runs/*` meeting an lr-find folder or a failed run
                log(f"warning: {run} left out of the report: {why}")
                if len(folders) == 1:
                    raise UserError(f"{run}: {why}")
            else:
                rows.append(load_run(run))
        if not rows:
            raise UserError("none of the folders is a finished run; pass run folders printed as 'run: ...' by "
                            "cnnlab train")
        out = out or "comparison"
    md, html_path = write_comparison(rows, Path(out), title, notes, unavailable)
    log(f"report: {html_path}")
    log(f"open it: file://{html_path.resolve()}")
    ok = [r for r in rows if r["status"] in ("completed", "early_stopped") and r.get("val_accuracy") is not None]
    for data in sorted({r["data"] for r in ok}):  # chosen on validation, and never across different data
        top = max((r for r in ok if r["data"] == data), key=lambda r: r["val_accuracy"])
        where = f" on {data}" if len({r["data"] for r in ok}) > 1 else ""
        log(f"best{where}: {top['name']} (validation {top['val_accuracy']:.2%}, test {top['accuracy']:.2%}); "
            f"serve it with: cnnlab serve {top['folder']}")
    return Path(out)
