"""Optimizers and per-step learning-rate schedules, chosen by name from the config."""

from __future__ import annotations

import math

import torch

from cnnlab.core.config import TrainConfig


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer}")  # config validation already names the choices


LOOKAHEAD_EVERY = 5  # optimizer steps between two moves of the slow weights


class Lookahead:
    """Lookahead over an optimizer (Zhang et al. 2019, with airbench's ramp): every 5 steps the slow weights
    move toward the trained ("fast") ones, keeping a share `rate * (step / total)^3` of where they were, and
    the fast weights restart from them; so also at the last step, whatever its number. The ramp leaves
    early training alone and averages out the noise of the last, low-rate steps. The slow weights
    live in the optimizer's state ("lookahead_slow"), so checkpoints and resumes carry them."""

    def __init__(self, optimizer: torch.optim.Optimizer, rate: float, total: int):
        self.optimizer, self.rate, self.total = optimizer, rate, total  # `total`: all steps; a re-plan moves it

    @torch.no_grad()
    def step(self, done: int) -> None:
        """After the optimizer's `done`-th step (1-based, counted over the run)."""
        if done % LOOKAHEAD_EVERY and done < self.total:
            return
        keep = self.rate * min(1.0, done / self.total) ** 3
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                if "lookahead_slow" not in state:
                    state["lookahead_slow"] = p.detach().clone()
                slow = state["lookahead_slow"]
                slow.lerp_(p, 1.0 - keep)
                p.copy_(slow)


def total_steps(steps_per_epoch: int, cfg: TrainConfig) -> int:
    """All the optimizer steps of `cfg.epochs` epochs, the last cut to train.last_epoch_steps where set."""
    return max(1, (cfg.epochs - 1) * steps_per_epoch + epoch_steps(cfg.epochs, steps_per_epoch, cfg))


def epoch_steps(epoch: int, steps_per_epoch: int, cfg: TrainConfig) -> int:
    """The steps epoch `epoch` (1-based) trains: all of them, but in the last epoch of a cut-short plan."""
    if epoch == cfg.epochs and 0 < cfg.last_epoch_steps < steps_per_epoch:
        return cfg.last_epoch_steps
    return steps_per_epoch


def warmup_steps(steps_per_epoch: int, cfg: TrainConfig) -> int:
    """The steps of the linear warm-up: train.warmup_epochs, or for one-cycle (which always rises first) a
    quarter of all steps."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch, 6))
    if cfg.schedule == "onecycle":
        warm = warm or max(1, int(0.25 * total_steps(steps_per_epoch, cfg)))
    return warm


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier on cfg.lr at optimizer step `step` (0-based): warm-up, then the schedule."""
    total = total_steps(steps_per_epoch, cfg)
    warm = warmup_steps(steps_per_epoch, cfg)
    if step < warm:
        return 0.01 + 0.99 * step / warm
    epoch = step / steps_per_epoch
    progress = (step - warm) / max(1, total - warm)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** int(epoch // cfg.step_epochs)
    if cfg.schedule == "exponential":
        return cfg.gamma ** epoch
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "onecycle":
        return max(0.0, 1.0 - progress)  # linear down to zero after the peak
    raise ValueError(f"unknown schedule {cfg.schedule}")


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
