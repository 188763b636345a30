"""The fit loop: train, validate, keep the best weights, stop early, never save NaN.

Plain functions in torchvision-reference style (`train_one_epoch`, `validate`, `fit`). Every
epoch appends a row to `history.csv` and, when the monitored metric improves, writes the best
weights to `model.safetensors` atomically; at the end the best weights are restored. A
non-finite loss stops training within that step with status `diverged`; Ctrl-C stops it with
status `interrupted`; both keep the last good weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnlab.core.config import TrainConfig
from cnnlab.core.runs import write_csv
from cnnlab.models.checkpoint import save_weights
from cnnlab.train.optim import build_optimizer, build_scheduler

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"]


@dataclass(frozen=True)
class FitResult:
    history: list[dict]
    best_epoch: int  # 1-based; 0 when no epoch finished
    status: str  # completed | early_stopped | diverged | interrupted
    train_seconds: float
    message: str = ""


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(model, loader, optimizer, scheduler, criterion, precision, device, epoch, progress=True) -> dict:
    """One pass over `loader`. Returns loss/accuracy, or status 'diverged' at the first bad loss."""
    from tqdm import tqdm

    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress, unit="batch", dynamic_ncols=True)
    for step, (x, y, _) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(x)
            loss = criterion(logits.float(), y)
        value = loss.item()
        if not math.isfinite(value):
            bar.close()
            return {"status": "diverged", "step": step, "loss": value}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = y.numel()
        loss_sum += value * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    return {"status": "ok", "loss": loss_sum / max(1, seen), "accuracy": correct / max(1, seen)}


@torch.no_grad()
def validate(model, loader, precision, device) -> tuple[float, float]:
    """Mean cross-entropy (no smoothing, no class weights) and accuracy."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y, _ in loader:
        x, y = x.to(device), y.to(device)
        with autocast(precision, device):
            logits = model(x).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.numel()
    return loss_sum / max(1, seen), correct / max(1, seen)


def _finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


def fit(model: nn.Module, loaders, cfg: TrainConfig, run_dir: Path, *, device: torch.device, precision: str,
        class_weights: torch.Tensor | None = None, log=print, progress=True) -> FitResult:
    """Train `model` on `loaders.train`, validating on `loaders.val` each epoch.

    Args:
        cfg: the training section of the config.
        run_dir: where `history.csv` and `model.safetensors` (best weights) are written.
        precision: "fp32" or "bf16" (autocast).
        class_weights: per-class loss weights, or None.

    Returns:
        FitResult; the model holds the best epoch's weights afterwards.
    """
    model.to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loaders.train))
    criterion = nn.CrossEntropyLoss(weight=class_weights.to(device) if class_weights is not None else None,
                                    label_smoothing=cfg.label_smoothing)
    higher = cfg.monitor == "val_accuracy"
    best, best_epoch, best_state, stale = -math.inf if higher else math.inf, 0, None, 0
    history, status, message, train_seconds = [], "completed", "", 0.0
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        loaders.train.set_epoch(epoch)
        try:
            result = train_one_epoch(model, loaders.train, optimizer, scheduler, criterion, precision, device, epoch,
                                     progress)
            train_seconds += time.perf_counter() - start
            if result["status"] == "diverged":
                status = "diverged"
                message = (f"loss became {result['loss']} at epoch {epoch}, step {result['step']}; "
                           "try a lower learning rate")
                break
            val_loss, val_acc = validate(model, loaders.val, precision, device)
        except KeyboardInterrupt:
            status, message = "interrupted", f"stopped by the user during epoch {epoch}"
            break
        row = {"epoch": epoch, "lr": lr, "train_loss": result["loss"], "train_accuracy": result["accuracy"],
               "val_loss": val_loss, "val_accuracy": val_acc, "seconds": 0.0}
        metric = val_acc if higher else val_loss
        improved = (metric > best) if higher else (metric < best)
        if improved and _finite(model):
            best, best_epoch, stale = metric, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            save_weights(model, run_dir / "model.safetensors")
        else:
            stale += 1
        row["seconds"] = round(time.perf_counter() - start, 3)
        history.append(row)
        write_csv(run_dir / "history.csv", HISTORY_COLUMNS, ([r[c] for c in HISTORY_COLUMNS] for r in history))
        log(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {lr:.3g}  {row['seconds']:.1f}s" + ("  *" if improved else ""))
        if cfg.patience and stale >= cfg.patience:
            status = "early_stopped"
            message = f"no {cfg.monitor} improvement for {cfg.patience} epochs; best epoch {best_epoch}"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(history, best_epoch, status, round(train_seconds, 3), message)
