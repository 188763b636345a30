"""One training run, in the order it happens: `train(cfg)`.

resolve the config -> the data and its split -> the model -> the run folder -> the loaders ->
the phases (`fit`) -> the test evaluation -> summary.json and the report.

Everything a user can get wrong is checked before the run folder exists. Once it exists, it holds
what `cnnlab train --resume` needs at every moment; a signal is deferred while a file is being
written and honoured at the next step; a run that fails says so (and why) in its summary.json.
The best weights reach `model.safetensors` from one place, `_save_model`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from cnnlab.core import signals
from cnnlab.core.config import Config, config_to_dict, dump_config, flatten, load_config
from cnnlab.core.env import env_info, precision_note, resolve_precision, seed_everything, set_threads
from cnnlab.core.errors import UserError
from cnnlab.core.figures import plot_class_counts, save_figure
from cnnlab.core.runs import RunFolder, atomic_write, load_json, new_run_dir, read_csv, save_json, write_csv
from cnnlab.data.loaders import Loaders, make_loaders
from cnnlab.data.splits import Split, manifest_hash, save_split
from cnnlab.evaluate.evaluation import calibrated_test, write_evaluation
from cnnlab.evaluate.plots import plot_curves
from cnnlab.evaluate.predict import inference_speed
from cnnlab.evaluate.run_report import write_run_report
from cnnlab.models.checkpoint import save_model, save_weights
from cnnlab.models.summary import count_params, format_summary, summarize
from cnnlab.train.budget import budget_record, budget_seconds, fit_limits, plan as plan_budget, steps_now
from cnnlab.train.checkpoints import load_checkpoint
from cnnlab.train.distributed import DistInfo, barrier, broadcast, cleanup, data_parallel, device_for, setup
from cnnlab.train.features import feature_loaders
from cnnlab.train.loop import HISTORY_COLUMNS, BestWeights, FitResult, fit, learned_nothing, steps_text
from cnnlab.train.lr_find import lr_range_test
from cnnlab.train.out_of_fold import out_of_fold_logits
from cnnlab.train.setup import ModelSetup, build_model, class_weights, data_and_split, init_from_data, load_saved

# What a resumed run may change; everything else must match the checkpointed run.
RESUMABLE_CHANGES = {"train.epochs", "train.last_epoch_steps", "train.patience", "train.checkpoint_steps",
                     "train.threads", "train.compile", "train.eval_batch_size", "data.workers", "data.loader",
                     "data.memory_cap_mb", "out", "tag"}
# How a run is carried out, not what it computes: a study whose file changes only these trains nothing again.
OPERATIONAL = RESUMABLE_CHANGES - {"train.epochs", "train.last_epoch_steps", "train.patience"}


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Everything the phases and the final evaluation read, fixed once the loaders exist."""

    cfg: Config  # as resolved: what config.yaml records
    folder: RunFolder
    root: Path  # the data folder
    split: Split
    model: ModelSetup
    loaders: Loaders
    meta: dict  # model.json: how to rebuild and feed the model
    device: torch.device
    precision: str
    threads: int
    dist: DistInfo
    run_info: dict  # what a checkpoint must match to be resumed here
    checkpoint: tuple | None  # (tensors, meta) of the checkpoint a resumed run continues from
    log: object  # prints and appends to log.txt
    progress: bool
    started: float  # time.monotonic() when `train` was called
    budget: dict | None  # the time budget's plan (train/budget.py), for summary.json


def train(cfg: Config, progress: bool = True, log=print, resume: str | Path | None = None,
          started: float | None = None) -> Path:
    """Train and evaluate one model as `cfg` says; return its run folder (see the module's docstring).
    `started`: the time.monotonic() a time budget counts from (default: now)."""
    # Over 60 lines on purpose: the run's steps in the order they happen, read on one screen.
    started = time.monotonic() if started is None else started
    dist = setup()
    log = log if dist.main else _quiet
    checkpoint = _check_resume(RunFolder(resume), cfg, log) if resume else None
    root, split = data_and_split(cfg, log, RunFolder(resume).split if resume else None)
    if cfg.train.batch_size % dist.world:
        raise UserError(f"train.batch_size {cfg.train.batch_size} must divide by the {dist.world} processes")
    device = device_for(dist)
    threads = set_threads(cfg.train.threads, dist.local_world)
    precision = resolve_precision(cfg.train.precision, device)
    seed_everything(cfg.train.seed, cfg.train.deterministic)  # the kernels the probe below measures
    planned = None  # a resumed run keeps the plan its config.yaml recorded
    if budget_seconds(cfg) and not resume:
        if dist.active:
            raise UserError("train.time_budget plans a run on one process; under torchrun set train.epochs")
        cfg, planned = plan_budget(cfg, split, started, device, precision, log)
        seed_everything(cfg.train.seed, cfg.train.deterministic)  # the probe drew random numbers
    model = build_model(cfg, split, log)
    run_info = {"split_sha256": manifest_hash(split), "world": dist.world}
    saved_info = {k: checkpoint[1]["progress"].get("run", {}).get(k) for k in run_info} if checkpoint else run_info
    if saved_info != run_info:
        raise UserError(f"cannot resume {resume}: its checkpoint was made with {saved_info}, "
                        f"now {run_info} (different data split or number of processes)")
    resolved = dataclasses.replace(  # what config.yaml records: the values used, not "auto"
        cfg, data=dataclasses.replace(cfg.data, path=str(root), image_size=model.size),
        train=dataclasses.replace(cfg.train, precision=precision), model=dataclasses.replace(
            cfg.model, name=model.name, input_size=model.input_size if model.transfer else 0))

    with signals.deferred():  # a run folder, once it exists, holds what --resume needs
        folder = RunFolder(resume) if resume else _new_folder(resolved, split, model, device, dist)
        tee = _Tee(folder, log, dist.main)
    try:
        tee(f"run folder {folder.dir}" + (" (resuming)" if resume else ""))
        signals.raise_if_requested()
        loaders = _loaders(resolved, folder, root, split, model, device, dist, tee)
        n = split.sizes(without={p for p, _ in loaders.rejected})  # the images that decode
        tee(f"{n['train']:,} train / {n['val']:,} val / {n['test']:,} test images, {len(split.classes)} classes, "
            f"{model.size}x{model.size} px, {loaders.kind} loader, "
            f"{precision}, {threads} threads" + (f", {dist.world} processes" if dist.active else ""))
        note = precision_note(cfg.train.precision, precision, device)
        if note:
            tee(note)
        ctx = RunContext(resolved, folder, root, split, model, loaders, _model_meta(model, split, loaders, run_info),
                         device, precision, threads, dist, run_info, checkpoint, tee, progress, started, planned)
        model.net.to(device).to(memory_format=torch.channels_last)
        if checkpoint is None:  # a resumed run has these layers in its checkpoint
            init_from_data(model.net, loaders, device)
        result, phases, evaluator = _run_phases(ctx)
        if dist.main:
            with signals.deferred():  # evaluation and report complete the folder before a signal ends the run
                _finish(ctx, result, phases, evaluator)
        barrier(dist)
        signals.raise_if_requested()
    except signals.Interrupted as e:
        if dist.main and folder.finished():  # it came during the final evaluation or report: nothing to resume
            tee(f"stopped by {e.name} after the run completed")
        else:
            e.run_dir = folder.dir
            tee(f"interrupted by {e.name}")  # the command's last line (stderr) says how to continue
        raise
    except Exception as e:  # the folder says it failed and why, so no one mistakes it for a run to finish
        if dist.main:
            tee.close()
            _record_failure(folder, e)
        raise
    finally:
        tee.close()
        cleanup(dist)
    return folder.dir


def _check_resume(folder: RunFolder, cfg: Config, log) -> tuple | None:
    """The checkpoint to continue from (None: stopped before its first one), after checking `cfg` may."""
    if not folder.config.is_file():
        raise UserError(f"{folder.dir} is not a run folder (no {RunFolder.config}); pass the folder printed as "
                        "'run: ...'")
    if folder.finished():  # its schedule has ended: more epochs would be another run, not this one
        epochs = len(read_csv(folder.history)) if folder.history.is_file() else 0
        raise UserError(f"{folder.dir} already finished ({folder.status()} after {epochs} epoch"
                        f"{'s' * (epochs != 1)}); --resume only continues a stopped run. To train longer, start a "
                        f"new run with more --epochs (its settings are in {folder.config})")
    saved, now = flatten(config_to_dict(load_config(folder.config))), flatten(config_to_dict(cfg))
    changed = [k for k in saved if k not in RESUMABLE_CHANGES and saved[k] != now.get(k)]
    if changed:
        k = changed[0]
        raise UserError(f"cannot resume {folder.dir}: {k} was {saved[k]!r} and is now {now.get(k)!r}; "
                        f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume")
    if folder.checkpoint.is_file():
        return load_checkpoint(folder.dir)
    log(f"{folder.dir} has no checkpoint yet: training it from the first step")
    return None


def _new_folder(resolved: Config, split: Split, model: ModelSetup, device, dist: DistInfo) -> RunFolder:
    """Create the run folder (rank 0) with what --resume needs: the resolved config and the split."""
    folder = RunFolder(broadcast(new_run_dir(resolved.out, model.name, resolved.tag) if dist.main else None, dist))
    if dist.main:
        atomic_write(folder.config, dump_config(resolved))
        save_split(split, folder.split)
        save_json(folder.env, env_info(device))
        atomic_write(folder.model_summary, format_summary(model.name, summarize(model.net, model.size), model.size))
        save_figure(plot_class_counts(split.counts()), folder.class_distribution)
    return folder


class _Tee:
    """Log lines to the caller and, on rank 0, append them to the run's log.txt."""

    def __init__(self, folder: RunFolder, log, main: bool):
        self.log, self.file = log, open(folder.log, "a", buffering=1) if main else None

    def __call__(self, msg: str) -> None:
        self.log(msg)
        if self.file:
            self.file.write(msg + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


def _loaders(cfg: Config, folder: RunFolder, root: Path, split: Split, model: ModelSetup, device, dist: DistInfo, log) -> Loaders:
    """The train/val/test loaders; files that do not decode are left out and listed in rejected.csv."""
    if not dist.main:
        barrier(dist)  # rank 0 builds the tensor cache first; the others then read it
    loaders = make_loaders(root, split, model.size, cfg.train.batch_size // dist.world, cfg.train.eval_batch_size,
                           loader=cfg.data.loader, memory_cap_mb=cfg.data.memory_cap_mb, augment=cfg.data.augment,
                           pad=cfg.data.crop_padding, seed=cfg.train.seed, workers=cfg.data.workers,
                           mean_std=model.mean_std, crop=model.crop, rank=dist.rank, world=dist.world,
                           device=device if device.type == "cuda" and not model.transfer else None, log=log)
    if dist.main:
        barrier(dist)
    if loaders.rejected:
        log(f"left out {len(loaders.rejected)} files that do not decode (see {RunFolder.rejected})")
        if dist.main:
            write_csv(folder.rejected, ["path", "reason"], loaders.rejected)
    return loaders


def _model_meta(model: ModelSetup, split: Split, loaders: Loaders, run_info: dict) -> dict:
    """model.json: what rebuilds the network and feeds it exactly as training did."""
    steps = ("decode (EXIF, RGB) -> shorter side to image_size / crop, centre crop -> (x/255-mean)/std"
             + (f" -> resized to {model.input_size} inside the model" if model.input_size != model.size else ""))
    return {"model_name": model.name, "model_args": model.model_args, "classes": list(split.classes),
            "image_size": model.size, "input_size": model.input_size, "crop": model.crop,
            "mean": list(loaders.mean), "std": list(loaders.std), "preprocessing": steps,
            "split_sha256": run_info["split_sha256"], **model.weights}


def _run_phases(ctx: RunContext) -> tuple[FitResult, list[dict], tuple]:
    """Run each phase's fit (a resumed run skips the phases it finished); return the result over all phases, the
    phases' records and the evaluator: (the model or a head on features, its loaders, the out-of-fold callable
    or None, the best epoch's validation (logits, targets) or None)."""
    model, folder, dist = ctx.model.net, ctx.folder, ctx.dist
    done = load_json(folder.phases) if folder.phases.is_file() else []
    rows = [r for d in done for r in d["history"]]
    result, evaluator = None, (model, ctx.loaders, None, None)
    for ph in ctx.model.phases:
        if any(d["name"] == ph.name for d in done):
            continue
        if done:  # continue from the weights the finished phases left
            load_saved(model, folder)
        if ph.unfreeze is not None:
            model.set_trainable(ph.unfreeze)
        total, trainable = count_params(model)
        saved_phase = ctx.checkpoint[1]["progress"]["run"].get("phase", "scratch") if ctx.checkpoint else None
        features = None
        if ph.cached and not dist.active:  # the head trains on backbone features computed once
            ld, features = feature_loaders(model, ctx.loaders, views=ctx.cfg.train.feature_views,
                                           engine=ctx.cfg.train.feature_engine, batch_size=ph.train.batch_size,
                                           eval_batch_size=ctx.cfg.train.eval_batch_size, seed=ctx.cfg.train.seed,
                                           threads=ctx.threads, log=ctx.log)
            net = model.head
        else:
            ld, net = ctx.loaders, data_parallel(model, ctx.device, dist)
        train_cfg = _phase_lr(ctx, ph, net, ld)
        if ctx.budget:  # the epochs that fit now that the data is loaded
            train_cfg = steps_now(ctx.budget, train_cfg, ctx.split.sizes(), len(ld.train), ctx.started,
                                  ctx.folder.config, ctx.log)
        ctx.log(f"phase {ph.name}: lr {train_cfg.lr:g}, {steps_text(train_cfg, len(ld.train))}, "
                f"{trainable:,} of {total:,} parameters trainable")
        weights = class_weights(ctx.split) if ctx.cfg.train.class_weights == "balanced" else None
        result = fit(net, ld, train_cfg, folder.dir, device=ctx.device, precision=ctx.precision, class_weights=weights,
                     log=ctx.log, progress=ctx.progress, resume=ctx.checkpoint if saved_phase == ph.name else None,
                     dist=dist, run_info={**ctx.run_info, "phase": ph.name}, phase=ph.name, earlier=rows,
                     best=_best_weights(ctx, net),
                     **(fit_limits(ctx.budget, ctx.split.sizes(), ctx.started) if ctx.budget else {}))
        evaluator = (net.module if dist.active else net, ld, None if features is None else functools.partial(
            out_of_fold_logits, net, ld, train_cfg, device=ctx.device, precision=ctx.precision, class_weights=weights),
            result.val_logits)
        if features is not None and result.best_epoch and dist.main:  # the backbone with the best head
            _save_model(ctx)
        seconds = result.train_seconds + (features["seconds"] if features else 0.0)
        done.append({"name": ph.name, "lr": train_cfg.lr, "epochs": len(result.history), "status": result.status,
                     "best_epoch": result.best_epoch, "train_seconds": round(seconds, 3), "params_total": total,
                     "params_trainable": trainable, "features": features, "history": result.history})
        if result.best_epoch == 0 and len(done) > 1:  # nothing better than the earlier phase: keep its weights
            load_saved(model, folder)
            evaluator = (model, ctx.loaders, None, None)
        if result.status not in ("completed", "early_stopped"):
            break
        if dist.main:
            save_json(folder.phases, done)
        rows = rows + result.history
    if result is None:  # every phase had finished (a resume after the last epoch): the saved model is the result
        load_saved(model, folder)
        evaluator = (model, ctx.loaders, None, None)
    return _combined(done, result.message if result else ""), done, evaluator


def _phase_lr(ctx: RunContext, ph, net, loaders):
    """The phase's training config, with lr `auto` replaced by the range test's suggestion on `net`."""
    if ph.train.lr != "auto":
        return ph.train
    found = lr_range_test(net, loaders.train, dataclasses.replace(ph.train, lr=1e-7), ctx.device, dist=ctx.dist)
    ctx.log(f"lr auto: range test suggests {found['suggestion']:.3g} (lowest smoothed loss at "
            f"{found['lr_min_loss']:.3g})")
    if ctx.dist.main and len(ctx.model.phases) == 1:  # config.yaml says what was used (a resume then reuses it)
        used = load_config(ctx.folder.config)
        atomic_write(ctx.folder.config, dump_config(dataclasses.replace(
            used, train=dataclasses.replace(used.train, lr=found["suggestion"]))))
    return dataclasses.replace(ph.train, lr=found["suggestion"])


def _save_model(ctx: RunContext) -> None:
    """The one writer of model.safetensors (with its model.json, which `_finish` completes with the
    temperature): the whole model as it is now."""
    save_model(ctx.model.net, ctx.folder.dir, ctx.meta)


def _best_weights(ctx: RunContext, net: torch.nn.Module) -> BestWeights:
    """Where `fit` keeps the best epoch of `net`: model.safetensors when it trains the whole model; for a
    head on cached features, head.safetensors (its backbone is frozen: rewriting a large backbone at every
    better epoch would cost its size in writes each time), the whole model being written once the phase ends."""
    inner = net.module if isinstance(net, DistributedDataParallel) else net
    if inner is ctx.model.net:
        return BestWeights(lambda: _save_model(ctx), lambda: load_file(str(ctx.folder.weights)))
    return BestWeights(lambda: save_weights(inner, ctx.folder.best_head), lambda: load_file(str(ctx.folder.best_head)))


def _combined(done: list[dict], message: str) -> FitResult:
    """One FitResult over the phases: their histories in order, the best epoch counted over all of them."""
    history = [r for d in done for r in d["history"]]
    best = 0
    for d in reversed(done):  # the best epoch of the last phase that found one
        if d["best_epoch"]:
            best = sum(len(e["history"]) for e in done[:done.index(d)]) + d["best_epoch"]
            break
    return FitResult(history, best, done[-1]["status"], round(sum(d["train_seconds"] for d in done), 3), message)


def _finish(ctx: RunContext, result: FitResult, phases: list[dict], evaluator: tuple) -> None:
    """Evaluate the best weights on the test split; write summary.json, the plots and the report."""
    folder, model, split = ctx.folder, ctx.model.net, ctx.split
    if not result.history:
        write_csv(folder.history, HISTORY_COLUMNS, [])
    params_total, params_trainable = count_params(model)
    summary = {"status": result.status, "message": result.message,
               "model": {"name": ctx.model.name, "params_total": params_total, "params_trainable": params_trainable,
                         "input_size": getattr(model, "input_size", None),
                         "weights_sha256": ctx.meta.get("weights_sha256", ""),
                         "weights_source": ctx.meta.get("weights_source", "random initialisation")},
               "phases": [{k: v for k, v in d.items() if k != "history"} for d in phases],
               "classes": list(split.classes), "best_epoch": result.best_epoch, "precision": ctx.precision,
               "data": {"root": str(ctx.root), "image_size": ctx.model.size, "split_sha256": ctx.meta["split_sha256"]},
               "train": config_to_dict(ctx.cfg)["train"],
               "time": {"train_seconds": result.train_seconds,
                        "epoch_seconds": [r["seconds"] for r in result.history]}}
    if result.history:
        save_figure(plot_curves(result.history, title=ctx.model.name), folder.curves)
    if result.best_epoch and result.status != "interrupted":
        net, ld, out_of_fold, val = evaluator  # out of fold over ImageNet features only: a run's (--from) saw them
        preds, summary["calibration"] = calibrated_test(net, ld.val_all or ld.val, ld.test, split.classes, ctx.device,
                                                        folder.dir, None if ctx.cfg.model.init else out_of_fold, val)
        summary["test"] = write_evaluation(preds, ctx.root, folder.dir, model, ctx.meta)
        ctx.meta["temperature"] = summary["calibration"]["temperature"]
        save_json(folder.model, ctx.meta)  # model.json beside the weights written last: now with the temperature
    dropped = ctx.loaders.dropped()  # streaming meets undecodable files only as it reads them: all are known now
    summary["data"].update(counts=split.counts(without={p for p, _ in dropped}), rejected=len(dropped))
    if len(dropped) > len(ctx.loaders.rejected):
        ctx.log(f"left out {len(dropped)} files that do not decode (see {RunFolder.rejected})")
        write_csv(folder.rejected, ["path", "reason"], dropped)
    if "test" in summary:
        steps = len(result.history) * len(ctx.loaders.train)
        why = learned_nothing(result.history[result.best_epoch - 1]["val_accuracy"], ctx.loaders.val.y.tolist(),
                              steps, ctx.cfg.train.batch_size, "a longer time budget" if ctx.budget else "more epochs")
        if result.status in ("completed", "early_stopped") and why:
            summary["status"], summary["message"] = "failed_to_learn", why
        summary["inference"] = inference_speed(model, ctx.model.size, ctx.device)
        ctx.log(f"test accuracy {summary['test']['accuracy']:.4f}  macro F1 {summary['test']['f1_macro']:.4f}  "
                f"loss {summary['test']['loss']:.4f}  (best epoch {result.best_epoch})")
    if ctx.budget:  # the steps as last re-planned (config.yaml has them)
        used = load_config(folder.config)
        summary["train"] = config_to_dict(used)["train"]
        summary["budget"] = budget_record(ctx.budget, used.train, len(result.history), ctx.started)
    save_json(folder.summary, summary)
    write_run_report(folder.dir)
    ctx.log(f"status: {summary['status']}" + (f" ({summary['message']})" if summary["message"] else ""))


def _record_failure(folder: RunFolder, error: Exception) -> None:
    """summary.json says `failed` with the reason (kept beside what it held); log.txt gets the traceback of a bug."""
    message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error} (a bug in cnnlab)"
    with open(folder.log, "a") as log_file:  # the traceback for the log only: Python prints it too
        if not isinstance(error, UserError):
            log_file.write("".join(traceback.format_exception(error)))
        log_file.write(f"status: failed ({message}); continue with: cnnlab train --resume {folder.dir}\n")
    save_json(folder.summary, {**folder.read_summary(), "status": "failed", "message": message})


def _quiet(msg: str) -> None:
    pass
