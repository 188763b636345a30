"""A run planned to fit a time budget: `cnnlab train --time-budget 5m` (`train.time_budget`).

"The best model this machine can train in five minutes." Before the run folder exists, cnnlab
times a few training steps and an evaluation pass of each candidate network on this machine, in
the run's precision and batch size, on random images of the run's size (a convolution costs the
same whatever the pixels). From those rates, the images in the split and the time already spent
(scanning the data, the probes), it picks:
- the network: when none is named, the widest of fastnet, fastnet_m and fastnet_l that gets at
  least the recipe's 10 epochs (wider is more accurate per epoch and slower); where none does,
  fastnet with the epochs that fit. A named network keeps its name.
- the steps, and with them the epochs and the schedule's length: as many as end training in time
  for the final evaluation (the validation and test passes, the figures and the report), the last
  epoch cut short where a whole one would overrun (train.last_epoch_steps), with 3% of the budget
  kept spare for the pace's swings. The count is fixed again just before the first epoch, once the
  data is loaded, and by `fit` after every epoch from the second on, at the pace it measured: kept
  while it still fits, grown into what fits with the spare kept, shrunk once it no longer fits.
The budget counts from the start of the `cnnlab` command (from the call of `train` in Python). The
plan and the measured rates go into summary.json under "budget".
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from torch import nn

from cnnlab.core.config import Config, TrainConfig, parse_duration
from cnnlab.core.errors import UserError
from cnnlab.data.splits import Split
from cnnlab.models import create_model, get_entry
from cnnlab.models.pretrained import is_transfer_name
from cnnlab.train.checkpoints import save_train
from cnnlab.train.loop import PACE_RESERVE, autocast, planned, steps_text, steps_that_fit
from cnnlab.train.optim import build_optimizer, total_steps

CANDIDATES = ("fastnet", "fastnet_m", "fastnet_l")  # narrow to wide
MIN_EPOCHS = 10  # the fast recipe's own length: a wider network is taken only where it gets this many
FINISH_SECONDS = 8.0  # after the last evaluation pass: inference speed, galleries with maps, figures, report
PROBE_SECONDS = 1.0  # timed training steps per candidate, and as long for evaluation (after one untimed call)


@dataclasses.dataclass(frozen=True)
class Rate:
    model: str
    step_seconds: float  # one training step at the run's batch size
    eval_images_per_second: float  # forward passes as validation runs them (TTA included)

    def epoch_seconds(self, train: int, val: int, batch: int) -> float:
        return math.ceil(train / batch) * self.step_seconds + val / self.eval_images_per_second

    def steps_that_fit(self, counts: dict, batch: int, left: float, per_epoch: int = 0) -> int:
        """Training steps that end in time for the evaluation after them, out of `left` seconds; `per_epoch`:
        steps per epoch (default: the split's training images over the batch)."""
        return steps_that_fit(left - self.after_seconds(counts["val"], counts["test"]), self.step_seconds,
                              counts["val"] / self.eval_images_per_second,
                              per_epoch or math.ceil(counts["train"] / batch))

    def after_seconds(self, val: int, test: int) -> float:
        """After training: the temperature's validation pass, the test pass and FINISH_SECONDS."""
        return (val + test) / self.eval_images_per_second + FINISH_SECONDS


def budget_seconds(cfg: Config) -> float | None:
    return parse_duration(cfg.train.time_budget) if cfg.train.time_budget else None


def plan(cfg: Config, split: Split, started: float, device: torch.device, precision: str, log) -> tuple[Config, dict]:
    """The config with the network and epochs that fit the budget, and the plan for summary.json."""
    budget = budget_seconds(cfg)
    usable = budget * (1 - PACE_RESERVE)  # with the reserve `fit` keeps when it grows the plan
    m = cfg.model
    if m.pretrained or m.weights or m.init or cfg.train.freeze or is_transfer_name(m.name or ""):
        raise UserError("train.time_budget plans networks trained from scratch (the fastnet widths, or a named "
                        "one); for a pretrained network set train.epochs instead")
    counts = split.sizes()
    batch = min(cfg.train.batch_size, counts["train"])
    names = [m.name] if m.name else list(CANDIDATES)
    rates: dict[str, Rate] = {}
    per_epoch = math.ceil(counts["train"] / batch)
    for name in names:  # narrow to wide, stopping at the first that cannot get MIN_EPOCHS: wider is slower still
        size = cfg.data.image_size or get_entry(name).default_size
        rates[name] = probe(name, cfg, len(split.classes), size, device, precision, batch)
        if rates[name].steps_that_fit(counts, batch, usable - (time.monotonic() - started)) < MIN_EPOCHS * per_epoch:
            break
    left = usable - (time.monotonic() - started)  # the probes included
    fits = {n: r.steps_that_fit(counts, batch, left) for n, r in rates.items()}
    wide = [n for n in rates if fits[n] >= MIN_EPOCHS * per_epoch]
    name = wide[-1] if wide else names[0]
    steps = fits[name]
    spent = time.monotonic() - started
    if steps < per_epoch:  # the plan promises one whole epoch at least
        rate = rates[name]
        epoch = rate.epoch_seconds(counts["train"], counts["val"], batch)
        after = rate.after_seconds(counts["val"], counts["test"])
        raise UserError(f"a time budget of {budget:.0f} s leaves no time for one epoch of {name} on this machine "
                        f"({spent:.0f} s spent on the data and the measurement, then about {epoch:.1f} s for one epoch "
                        f"and {after:.0f} s for the evaluation and the report); give train.time_budget at least "
                        f"{math.ceil((spent + epoch + after) / (1 - PACE_RESERVE))}s")
    train = planned(cfg.train, steps, per_epoch)
    record = {"seconds": budget, "model": name, "epochs_planned": train.epochs, "epochs": train.epochs,
              "steps_planned": steps, "steps": steps, "steps_per_epoch": per_epoch, "batch_size": batch,
              "seconds_before_planning": round(spent, 2),
              "rates": {n: {"step_seconds": r.step_seconds, "train_images_per_second": round(batch / r.step_seconds, 1),
                            "eval_images_per_second": round(r.eval_images_per_second, 1),
                            "epoch_seconds": round(r.epoch_seconds(counts["train"], counts["val"], batch), 2)}
                        for n, r in rates.items()}}
    log(f"time budget {budget:.0f} s: {name} for {steps_text(train, per_epoch)} (measured here: "
        + ", ".join(f"{n} {v['epoch_seconds']:.1f} s per epoch" for n, v in record["rates"].items())
        + f"; {spent:.0f} s spent before training)")
    return dataclasses.replace(cfg, model=dataclasses.replace(m, name=name), train=train), record


def steps_now(record: dict, train_cfg: TrainConfig, counts: dict, per_epoch: int, started: float,
              config_path: Path, log) -> TrainConfig:
    """The planned network's steps that still fit now, the data loaded and its loader's `per_epoch` steps
    known (files that failed to decode are left out of it; one epoch at least: the plan said one fits);
    config.yaml is rewritten to say so where they differ from the plan."""
    left = record["seconds"] * (1 - PACE_RESERVE) - (time.monotonic() - started)
    steps = _rate(record).steps_that_fit(counts, record["batch_size"], left, per_epoch) or per_epoch
    if (steps, per_epoch) == (record["steps"], record["steps_per_epoch"]):
        return train_cfg
    train = planned(train_cfg, steps, per_epoch)
    log(f"time budget: {steps_text(train, per_epoch)} fit now that the data is loaded "
        f"(planned {steps_text(train_cfg, per_epoch)})")
    record.update(steps=steps, epochs=train.epochs, steps_per_epoch=per_epoch)
    save_train(config_path, epochs=train.epochs, last_epoch_steps=train.last_epoch_steps)
    return train


def budget_record(record: dict, used: TrainConfig, epochs_run: int, started: float) -> dict:
    """summary.json's "budget": the plan, the epochs and steps as last re-planned (`used`, config.yaml's), and
    what ran (a run ends early only between epochs: all those run were whole but a cut-short last one)."""
    per_epoch = record["steps_per_epoch"]
    steps = total_steps(per_epoch, used)
    return {**record, "epochs": used.epochs, "steps": steps, "epochs_run": epochs_run,
            "steps_run": steps if epochs_run == used.epochs else epochs_run * per_epoch,
            "seconds_at_summary": round(time.monotonic() - started, 1)}


def fit_limits(record: dict, counts: dict, started: float) -> dict:
    """`fit`'s deadline (the monotonic time by which the last epoch must end) and the reserve its re-plans keep."""
    return {"deadline": started + record["seconds"] - _after(record, counts),
            "reserve": PACE_RESERVE * record["seconds"]}


def _after(record: dict, counts: dict) -> float:
    return _rate(record).after_seconds(counts["val"], counts["test"])


def _rate(record: dict) -> Rate:
    """The chosen network's Rate as the record keeps it."""
    rates = record["rates"][record["model"]]
    return Rate(record["model"], rates["step_seconds"], rates["eval_images_per_second"])


def probe(name: str, cfg: Config, num_classes: int, size: int, device: torch.device, precision: str,
          batch: int) -> Rate:
    """Seconds per training step (the run's optimizer, precision and batch) and evaluation images per second."""
    args = {"layers": list(cfg.model.layers)} if name == "custom" else {}  # as train/setup.py builds it
    model = create_model(name, num_classes, size, **args).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad],
                                dataclasses.replace(cfg.train, lr=0.01 if cfg.train.lr == "auto" else cfg.train.lr))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def step():
        with autocast(precision, device):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    step_seconds = _timed(step, device)
    model.eval()
    x = torch.randn(cfg.train.eval_batch_size, 3, size, size, device=device)  # as evaluation batches them
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eval_seconds = _timed(lambda: model(x), device)
    return Rate(name, step_seconds, len(x) / eval_seconds)


def _timed(fn, device: torch.device) -> float:
    """Median seconds of `fn` over about PROBE_SECONDS (at least 2 calls), after one untimed call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: list[float] = []
    while len(times) < 2 or (sum(times) < PROBE_SECONDS and len(times) < 20):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
