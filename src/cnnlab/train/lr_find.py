"""The learning-rate range test (Leslie Smith; fastai's lr_find): raise the learning rate
exponentially for one short pass, watch the loss, and suggest a rate from where it was lowest.

Single-batch losses are noisy, so the curve is smoothed (bias-corrected moving average) before
anything is read from it, and the suggestion is the minimum of the smoothed curve divided by 10:
the rate where the loss is still falling steadily, not the edge where it blows up. A noisy dip
right before the blow-up cannot move the minimum of a smoothed curve far. The model's weights are
restored afterwards, so the test leaves no trace on the training that follows.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnlab.core.config import Config
from cnnlab.core.env import seed_everything, set_threads
from cnnlab.core.figures import save_figure
from cnnlab.core.runs import RunFolder, new_run_dir, save_json
from cnnlab.data.loaders import make_loaders
from cnnlab.train.distributed import DistInfo
from cnnlab.train.loop import read_back
from cnnlab.train.optim import build_optimizer
from cnnlab.train.setup import build_model, data_and_split, init_from_data


def smooth(losses: list[float], beta: float = 0.9) -> np.ndarray:
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return np.array(out)


def suggest_lr(lrs: list[float], losses: list[float], skip: int = 5) -> dict:
    """The suggestion (min of the smoothed loss / 10) and the steepest-descent rate, from one range test."""
    s = smooth(losses)
    lo = min(skip, max(0, len(s) - 2))
    k = lo + int(np.argmin(s[lo:]))
    grad = np.gradient(s[lo: k + 1], np.log(lrs[lo: k + 1])) if k - lo >= 2 else np.zeros(1)
    steep = lo + int(np.argmin(grad))
    return {"suggestion": float(max(lrs[0], lrs[k] / 10)), "lr_min_loss": float(lrs[k]),
            "lr_steepest": float(lrs[steep]), "smoothed": s.tolist()}


def lr_range_test(model: nn.Module, loader, cfg, device: torch.device, start: float = 1e-7, end: float = 10.0,
                  steps: int = 100, criterion=None, dist: DistInfo = DistInfo()) -> dict:
    """Train `steps` batches with the lr rising from `start` to `end`; stop once the loss explodes.

    Args:
        cfg: the training section (optimizer, momentum, weight decay are the run's own).
        dist: under torchrun, the loss is averaged over the ranks before it is recorded and tested, so
            every rank stops at the same step (one that stopped alone would leave the others waiting in
            the gradients' all-reduce) and every rank suggests the same rate.
    Returns:
        {'lrs', 'losses', 'smoothed', 'suggestion', 'lr_min_loss', 'lr_steepest'}; the model is unchanged.
    """
    saved = copy.deepcopy(model.state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    criterion = criterion or nn.CrossEntropyLoss()
    factor = (end / start) ** (1 / max(1, steps - 1))
    lrs, losses, best = [], [], math.inf
    model.train()
    batches = iter(())
    for i in range(steps):
        try:
            x, y, _ = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y, _ = next(batches)
        lr = start * factor ** i
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = criterion(model(x.to(device)).float(), y.to(device))
        value = read_back(loss, False, dist, device)[0]  # the mean over ranks; one process: its own loss
        if not math.isfinite(value):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lrs.append(lr)
        losses.append(value)
        current = smooth(losses)[-1]
        if i > 10 and current > 4 * best:  # exploded: the rest of the range says nothing
            break
        best = min(best, current)
    model.load_state_dict(saved)
    if len(lrs) < 3:
        return {"lrs": lrs, "losses": losses, "smoothed": losses, "suggestion": start, "lr_min_loss": start,
                "lr_steepest": start}
    return {"lrs": lrs, "losses": losses, **suggest_lr(lrs, losses)}


def plot_lr_find(result: dict, title: str = ""):
    from cnnlab.core.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(result["lrs"], result["losses"], color="#bbb", lw=1, label="loss per batch")
    ax.plot(result["lrs"], result["smoothed"], color="#36c", lw=2, label="smoothed")
    ax.axvline(result["suggestion"], color="#2a8", ls="--", label=f"suggestion {result['suggestion']:.2g}")
    ax.axvline(result["lr_min_loss"], color="#b60", ls=":", label=f"lowest loss at {result['lr_min_loss']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    top = np.percentile(result["losses"], 95) if result["losses"] else 1
    ax.set_ylim(min(result["smoothed"]) * 0.9 if result["smoothed"] else 0, top * 1.1)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def find_lr(cfg: Config, log=print) -> Path:
    """`cnnlab lr-find`: the range test on `cfg`'s model and data (its first phase's trainable weights).

    Writes lr_find.json and lr_find.png into a new folder under cfg.out and returns it.
    """
    root, split = data_and_split(cfg, log)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    m = build_model(cfg, split, log)
    if m.phases[0].unfreeze is not None:
        m.net.set_trainable(m.phases[0].unfreeze)
    set_threads(cfg.train.threads)
    folder = RunFolder(new_run_dir(cfg.out, m.name, cfg.tag or "lr-find"))
    loaders = make_loaders(root, split, m.size, cfg.train.batch_size, cfg.train.eval_batch_size,
                           loader=cfg.data.loader, memory_cap_mb=cfg.data.memory_cap_mb, augment=cfg.data.augment,
                           pad=cfg.data.crop_padding, seed=cfg.train.seed, workers=cfg.data.workers,
                           mean_std=m.mean_std, crop=m.crop, log=log)
    model = m.net.to(memory_format=torch.channels_last)
    init_from_data(model, loaders, torch.device("cpu"))
    result = lr_range_test(model, loaders.train, dataclasses.replace(cfg.train, lr=1e-7), torch.device("cpu"))
    save_json(folder.lr_find, {"model": m.name, "optimizer": cfg.train.optimizer, **result})
    save_figure(plot_lr_find(result, f"{m.name}, {cfg.train.optimizer}, batch {cfg.train.batch_size}"),
                folder.lr_find_plot)
    log(f"suggested learning rate {result['suggestion']:.3g} (lowest smoothed loss at {result['lr_min_loss']:.3g}, "
        f"steepest descent at {result['lr_steepest']:.3g}); use it with --lr or set train.lr: auto")
    return folder.dir
