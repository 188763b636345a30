"""The fit loop: train, validate, keep the best weights, checkpoint, stop early, never save NaN.

Plain functions in torchvision-reference style (`train_one_epoch`, `validate`, `fit`). Every
epoch appends a row to `history.csv`, writes the best weights to `model.safetensors` when the
monitored metric improves, and writes `checkpoint.safetensors` with the whole training state, so
`--resume` continues exactly where a run stopped (also mid-epoch, with `train.checkpoint_steps`).
A non-finite loss stops training within that step with status `diverged`; SIGINT or SIGTERM
(deferred while `fit` runs, see core/signals.py) finish the current step, checkpoint, and stop
with status `interrupted`. Under torchrun, sums are
all-reduced and only rank 0 writes.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cnnlab.core import signals
from cnnlab.core.config import MAX_BUDGET_EPOCHS, TrainConfig
from cnnlab.core.runs import RunFolder, write_csv
from cnnlab.train.checkpoints import restore_training, save_checkpoint, save_train
from cnnlab.train.distributed import DistInfo, all_sum, all_sum_tensor
from cnnlab.train.optim import Lookahead, build_optimizer, build_scheduler, epoch_steps, total_steps, warmup_steps

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "phase"]


@dataclass(frozen=True)
class BestWeights:
    """Where `fit` keeps the best epoch's weights: `save()` writes them (on rank 0 only), `load()` returns
    the state dict they hold for the trained module, to continue a resumed run's comparison."""

    save: Callable[[], None]
    load: Callable[[], dict]


@dataclass(frozen=True)
class FitResult:
    history: list[dict]
    best_epoch: int  # 1-based; 0 when no epoch finished
    status: str  # completed | early_stopped | diverged | interrupted
    train_seconds: float
    message: str = ""
    val_logits: tuple | None = None  # (logits, targets) of the best epoch's validation, when this process ran it


def autocast(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def train_one_epoch(model, loader, optimizer, scheduler, criterion, precision, device, epoch, *, start_step=0,
                    totals=(0.0, 0, 0), progress=True, dist: DistInfo = DistInfo(),
                    checkpoint_every: int = 0, checkpoint=None, scaler=None, steps: int = 0, lookahead=None) -> dict:
    """One pass over `loader` (from wherever it was told to resume).

    Args:
        start_step: the batch the loader was told to resume at (0 for a fresh epoch).
        totals: (loss sum, correct, seen) carried over from the first part of a resumed epoch.
        checkpoint_every: call `checkpoint(step, totals)` every this many steps (0 = never).
        scaler: a GradScaler for fp16 (None or disabled otherwise).
        steps: end the epoch after this many steps (0 = the whole loader): a time budget's last epoch.
        lookahead: a `Lookahead`, which moves the weights toward its slow ones when due (train.lookahead).

    Returns:
        {'status': 'ok' | 'diverged' | 'stopped', 'loss', 'accuracy', 'step', 'totals'}.
    """
    from tqdm import tqdm

    model.train()
    # the loss sum and the right answers stay on the device: reading them each step would make the host wait
    # for the GPU each step (checklist 8); they are read for the bar, a checkpoint and the epoch's end
    sums, seen = torch.tensor(totals[:2], dtype=torch.float64, device=device), totals[2]
    steps = steps or len(loader)  # the whole loader, or a time budget's cut-short last epoch
    # disable=None: a bar on a terminal, nothing when the output goes to a file or a pipe
    bar = tqdm(itertools.islice(loader, max(0, steps - start_step)), desc=f"epoch {epoch}", leave=False,
               disable=None if progress else True, unit="batch", dynamic_ncols=True, initial=start_step, total=steps)
    step = start_step - 1
    for step, (x, y, _) in enumerate(bar, start=start_step):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(x)
            loss = criterion(logits.float(), y)
        value, stopping = read_back(loss, bool(signals.requested()), dist, device)  # a signal: the last step
        if not math.isfinite(value):
            bar.close()
            return {"status": "diverged", "step": step, "loss": value}
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if lookahead is not None:
            lookahead.step(scheduler.last_epoch)
        sums += torch.stack([loss.detach().double() * y.numel(), (logits.argmax(1) == y).sum().double()])
        seen += y.numel()
        if step % 10 == 0 and not bar.disable:
            loss_sum, correct = sums.tolist()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        done = step + 1
        if stopping:
            bar.close()
            return {"status": "stopped", "step": done, "totals": _totals(sums, seen)}
        if checkpoint_every and done % checkpoint_every == 0 and done < steps:
            checkpoint(done, _totals(sums, seen))
    loss_sum, correct, seen = all_sum(list(_totals(sums, seen)), dist, device)
    return {"status": "ok", "loss": loss_sum / max(1, seen), "accuracy": correct / max(1, seen), "step": step + 1}


def read_back(loss: torch.Tensor, stopping: bool, dist: DistInfo, device) -> tuple[float, bool]:
    """A step's one host sync: the loss (the mean over ranks under torchrun), read before the step is taken so
    that a non-finite one is never stepped on, and whether any rank was signalled; one all-reduce for both."""
    if not dist.active:
        return loss.item(), stopping
    check = torch.stack([loss.detach().double(), torch.full((), float(stopping), dtype=torch.float64, device=device)])
    value, flag = all_sum_tensor(check, dist).tolist()
    return value / dist.world, flag > 0


def _totals(sums: torch.Tensor, seen: int) -> tuple[float, int, int]:
    """(loss sum, right answers, images seen) as Python numbers, from the sums kept on the device."""
    loss_sum, correct = sums.tolist()
    return loss_sum, round(correct), seen


@torch.no_grad()
def validate(model, loader, precision, device, dist: DistInfo = DistInfo()) -> tuple[float, float, tuple | None]:
    """Mean cross-entropy (no smoothing, no class weights) and accuracy, summed over ranks; and this rank's
    (logits, targets) as numpy arrays in the loader's order (None for no images), to fit the temperature on."""
    model.eval()
    sums, seen = torch.zeros(2, dtype=torch.float64, device=device), 0  # on the device, as in train_one_epoch
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for x, y, _ in loader:
        x, y = x.to(device), y.to(device)
        with autocast(precision, device):
            logits = model(x).float()
        sums += torch.stack([nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                             (logits.argmax(1) == y).sum().double()])
        seen += y.numel()
        kept.append((logits, y))  # moved off a GPU once, at the end: no sync per batch
    loss_sum, correct, seen = all_sum(list(_totals(sums, seen)), dist, device)
    val = tuple(torch.cat(t).cpu().numpy() for t in zip(*kept)) if kept else None
    return loss_sum / max(1, seen), correct / max(1, seen), val


FEW_STEPS = 50  # a run that learned nothing in fewer optimizer steps than this has not been given a chance to


def learned_nothing(best_val_accuracy: float, val_targets: list[int], steps: int, batch: int,
                    more: str = "more epochs") -> str:
    """Why a run is no result, when its best validation accuracy is no better than always answering the
    largest class of the validation split ("" when it did better), with what to change (`more`: what
    gives it more steps)."""
    largest = max(collections.Counter(val_targets).values(), default=0) / max(1, len(val_targets))
    if best_val_accuracy > largest + 0.01:
        return ""
    advice = (f"it trained only {steps} steps of batch {batch}: give {more} or a smaller batch size"
              if steps < FEW_STEPS else "try another learning rate")
    return (f"best validation accuracy {best_val_accuracy:.4f} is no better than always predicting the largest "
            f"class ({largest:.4f}); not a result: {advice}")


PACE_RESERVE = 0.03  # of a time budget, kept spare when a plan is made or grown: an epoch's pace swings ~15%


def steps_that_fit(seconds: float, step_seconds: float, epoch_seconds: float, steps_per_epoch: int) -> int:
    """The most training steps that end within `seconds` when every epoch, whole or cut short, also costs
    `epoch_seconds` (its validation pass and writes). An epoch that would be cut to under a tenth of its
    steps is not begun: its validation pass would cost more than its steps give."""
    whole = steps_per_epoch * step_seconds + epoch_seconds
    epochs = max(0, int(seconds // whole))
    rest = int(max(0.0, seconds - epochs * whole - epoch_seconds) / step_seconds)
    rest = min(rest, steps_per_epoch - 1) if rest >= 1 and 10 * rest >= steps_per_epoch else 0
    return min(epochs * steps_per_epoch + rest, MAX_BUDGET_EPOCHS * steps_per_epoch)


def steps_to_plan(seconds: float, reserve: float, step_seconds: float, epoch_seconds: float, steps_per_epoch: int,
                  left: int, cap: int) -> int:
    """The steps a time budget's run should still train, `left` planned, `seconds` to its deadline: the plan
    is kept while it fits, so that the pace's swings neither drop its last epoch (and the schedule's decay)
    nor re-plan it back and forth; it grows only into what fits with `reserve` seconds to spare, and shrinks
    to that, or to what fits at all, once it no longer fits. 0: nothing fits, the run ends here."""
    fits = steps_that_fit(seconds, step_seconds, epoch_seconds, steps_per_epoch)
    spare = steps_that_fit(seconds - reserve, step_seconds, epoch_seconds, steps_per_epoch)
    return min(max(spare, left) if left <= fits else (spare or fits), cap)


def planned(cfg: TrainConfig, steps: int, steps_per_epoch: int) -> TrainConfig:
    """`cfg` with the epochs (the last one cut short where it must be) that train `steps` steps."""
    epochs = max(1, math.ceil(steps / steps_per_epoch))
    last = steps - (epochs - 1) * steps_per_epoch
    return dataclasses.replace(cfg, epochs=epochs, last_epoch_steps=last if 0 < last < steps_per_epoch else 0)


def _replanned(optimizer, scheduler, cfg: TrainConfig, steps: int, steps_per_epoch: int):
    """`cfg` with `steps` steps in all and the schedule for them, at the step the old one had reached: the
    warm-up keeps its length in steps (a one-cycle warm-up is a share of the total, which would otherwise
    move), the decay is stretched or shrunk to end at the new last step."""
    warm = warmup_steps(steps_per_epoch, cfg)
    cfg = dataclasses.replace(planned(cfg, steps, steps_per_epoch), warmup_epochs=warm / steps_per_epoch)
    done = scheduler.last_epoch
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scheduler.last_epoch = done - 1
    scheduler.step()
    return cfg, scheduler


def steps_text(cfg: TrainConfig, steps_per_epoch: int) -> str:
    """"3 epochs", or "3 epochs (the last cut to 40 of 88 steps)"."""
    text = f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)}"
    cut = epoch_steps(cfg.epochs, steps_per_epoch, cfg)
    return text + (f" (the last cut to {cut} of {steps_per_epoch} steps)" if cut < steps_per_epoch else "")


def _finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


def fit(model: nn.Module, loaders, cfg: TrainConfig, run_dir: Path, *, device: torch.device, precision: str,
        class_weights: torch.Tensor | None = None, log=print, progress=True, resume: tuple | None = None,
        dist: DistInfo = DistInfo(), run_info: dict | None = None, phase: str = "scratch", earlier: list = (),
        best: BestWeights | None = None, deadline: float | None = None, reserve: float = 0.0) -> FitResult:
    """Train `model` on `loaders.train`, validating on `loaders.val` each epoch.

    Args:
        model: the network (wrapped in DistributedDataParallel under torchrun).
        cfg: the training section of the config.
        run_dir: where history.csv and the checkpoint go.
        precision: "fp32", "bf16" or "fp16" (autocast; fp16 with a GradScaler, whose scale restarts
            on resume).
        class_weights: per-class loss weights, or None.
        resume: (tensors, meta) from `load_checkpoint`, to continue a stopped run.
        dist: this process's place in distributed training.
        run_info: stored in the checkpoint so a resume can check it continues the same run.
        phase: this phase's name in history.csv (scratch | frozen | finetune).
        earlier: history rows of the phases before this one, kept at the top of history.csv.
        best: saves the best weights when an epoch improves on the best so far (None: not saved).
        deadline: a time.monotonic() by which training must end (a time budget): from the second epoch on,
            the steps left are re-planned (`steps_to_plan`) at the pace averaged over the epochs since the first.
        reserve: seconds a re-plan keeps spare before `deadline` when it grows the plan.

    Returns:
        FitResult; the model holds the best epoch's weights afterwards.
    """
    # Over 60 lines on purpose: one epoch loop read top to bottom, as in torchvision's reference script.
    net = model.module if hasattr(model, "module") else model  # what gets saved
    runner = torch.compile(model) if cfg.compile else model  # shares `model`'s parameters
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loaders.train))
    lookahead = Lookahead(optimizer, cfg.lookahead, total_steps(len(loaders.train), cfg)) if cfg.lookahead else None
    criterion = nn.CrossEntropyLoss(weight=class_weights.to(device) if class_weights is not None else None,
                                    label_smoothing=cfg.label_smoothing)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    higher = cfg.monitor == "val_accuracy"
    p = {"epoch": 1, "step": 0, "totals": [0.0, 0, 0], "history": [], "best": -math.inf if higher else math.inf,
         "best_epoch": 0, "stale": 0, "train_seconds": 0.0, "run": run_info or {}}
    best_state = best_val = None  # best_val: the best epoch's validation (logits, targets), if it ran here
    if resume:
        tensors, meta = resume
        restore_training(tensors, meta, net, optimizer, scheduler, scaler)
        p = meta["progress"]
        if p["step"]:
            loaders.train.set_epoch(p["epoch"])
            loaders.train.resume_at(p["step"], tensors.get("rng.loader"))
        if p["best_epoch"] and best is not None:
            best_state = best.load()
        log(f"resumed at epoch {p['epoch']}, step {p['step']}")

    def checkpoint(epoch: int, step: int, totals) -> None:
        if dist.main:
            state = dict(p, epoch=epoch, step=step, totals=list(totals))
            g = loaders.train.generator if step else None
            save_checkpoint(run_dir, net, optimizer, scheduler, state, g.get_state() if g is not None else None, scaler)

    status, message = "completed", ""
    spe, saved_seconds = len(loaders.train), 0.0  # steps per epoch; the last epoch-end checkpoint's seconds
    paced = [0.0, 0, 0.0, 0]  # a time budget's pace since the first epoch: training s, steps, other s, epochs
    with signals.deferred():
        epoch = first = p["epoch"]
        while epoch <= cfg.epochs:
            start, start_step = time.perf_counter(), p["step"]
            if not p["step"]:  # (a run resumed mid-epoch records the epoch's first lr, as a run not stopped does)
                p["epoch_lr"] = optimizer.param_groups[0]["lr"]
                loaders.train.set_epoch(epoch)
            lr = p.get("epoch_lr", optimizer.param_groups[0]["lr"])
            result = train_one_epoch(runner, loaders.train, optimizer, scheduler, criterion, precision, device, epoch,
                                     start_step=p["step"], totals=tuple(p["totals"]), progress=progress and dist.main, dist=dist,
                                     checkpoint_every=cfg.checkpoint_steps,
                                     checkpoint=lambda s, t, e=epoch: checkpoint(e, s, t), scaler=scaler,
                                     steps=epoch_steps(epoch, spe, cfg), lookahead=lookahead)
            trained = time.perf_counter() - start
            p["train_seconds"] += trained
            if result["status"] == "diverged":
                status = "diverged"
                message = (f"loss became {result['loss']} at epoch {epoch}, step {result['step']}; "
                           "try a lower learning rate")
                break
            if result["status"] == "stopped":
                checkpoint(epoch, result["step"], result["totals"])
                status = "interrupted"
                message = f"stopped during epoch {epoch}; continue with: cnnlab train --resume {run_dir}"
                break
            val_loss, val_acc, val = validate(runner, loaders.val, precision, device, dist)
            row = {"epoch": epoch, "lr": lr, "train_loss": result["loss"], "train_accuracy": result["accuracy"],
                   "val_loss": val_loss, "val_accuracy": val_acc, "seconds": 0.0, "phase": phase}
            metric = val_acc if higher else val_loss
            improved = (metric > p["best"]) if higher else (metric < p["best"])
            if improved and _finite(net):
                p.update(best=metric, best_epoch=epoch, stale=0)
                best_state = copy.deepcopy(net.state_dict())
                best_val = None if dist.active else val  # a rank's shard is not the validation split
                if dist.main and best is not None:
                    best.save()
            else:
                p["stale"] += 1
            row["seconds"] = round(time.perf_counter() - start, 3)
            p["history"].append(row)
            p.update(step=0, totals=[0.0, 0, 0])
            if dist.main:
                write_csv(RunFolder(run_dir).history, HISTORY_COLUMNS,
                          ([r[c] for c in HISTORY_COLUMNS] for r in [*earlier, *p["history"]]))
            if deadline is not None and epoch < cfg.epochs and epoch > first:  # a time budget (the first epoch
                # pays one-off costs: kernel choice, compilation): the steps that fit at the pace of the epochs
                # since, averaged (one epoch's pace swings by 15% on a shared machine)
                other = time.perf_counter() - start - trained + saved_seconds  # validation and writes
                paced = [paced[0] + trained, paced[1] + result["step"] - start_step, paced[2] + other, paced[3] + 1]
                step_seconds, other = paced[0] / max(1, paced[1]), paced[2] / paced[3]
                done, left = epoch * spe, total_steps(spe, cfg) - epoch * spe
                more = steps_to_plan(deadline - time.monotonic() - saved_seconds, reserve, step_seconds, other,
                                     spe, left, MAX_BUDGET_EPOCHS * spe - done)  # the cap is on the run's total
                if not more:
                    status = "early_stopped"
                    message = (f"time budget: epoch {epoch + 1} of {cfg.epochs} would end after the budget leaves for "
                               f"the evaluation (epochs take {spe * step_seconds + other:.1f} s); best epoch {p['best_epoch']}")
                elif abs(more - left) >= max(1, spe // 10):  # off by a tenth of an epoch: noise must not re-plan
                    cfg, scheduler = _replanned(optimizer, scheduler, cfg, done + more, spe)
                    if lookahead is not None:
                        lookahead.total = done + more
                    log(f"time budget: {steps_text(cfg, spe)} fit at {spe * step_seconds + other:.1f} s per epoch (planned "
                        f"{steps_text(planned(cfg, done + left, spe), spe)}); the schedule's decay now ends there")
                    if dist.main:
                        save_train(RunFolder(run_dir).config, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                   last_epoch_steps=cfg.last_epoch_steps)
            saving = time.perf_counter()
            checkpoint(epoch + 1, 0, (0.0, 0, 0))
            saved_seconds = time.perf_counter() - saving
            log(("" if phase == "scratch" else f"{phase} ") + f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
                f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {lr:.3g}  {row['seconds']:.1f}s"
                + ("  *" if improved else ""))
            if status == "early_stopped":  # the time budget, above
                break
            if cfg.patience and p["stale"] >= cfg.patience:
                status = "early_stopped"
                message = f"no {cfg.monitor} improvement for {cfg.patience} epochs; best epoch {p['best_epoch']}"
                break
            stop = float(bool(signals.requested()))
            if dist.active:  # every rank stops after the same epoch, or they wait on each other for ever
                stop = all_sum([stop], dist, device)[0]
            if stop:
                status = "interrupted"
                message = f"stopped after epoch {epoch}; continue with: cnnlab train --resume {run_dir}"
                break
            epoch += 1
    if best_state is not None:
        net.load_state_dict(best_state)
    return FitResult(p["history"], p["best_epoch"], status, round(p["train_seconds"], 3), message, best_val)
