"""Learning-rate schedules: the multiplier at chosen steps, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cnnlab.core.config import TrainConfig
from cnnlab.train.optim import build_optimizer, build_scheduler, lr_factor


@pytest.mark.parametrize("schedule,step,expected", [
    ("constant", 0, 1.0), ("constant", 99, 1.0),
    ("step", 9, 1.0), ("step", 10, 0.1), ("step", 29, 0.01),  # 1 step per epoch, decay every 10 epochs
    ("exponential", 2, 0.01), ("cosine", 0, 1.0), ("cosine", 50, 0.5), ("cosine", 100, 0.0),
    ("onecycle", 0, 0.01), ("onecycle", 25, 1.0), ("onecycle", 100, 0.0),
])
def test_schedule_shapes(schedule, step, expected):
    cfg = TrainConfig(schedule=schedule, epochs=100, step_epochs=10, gamma=0.1)
    assert lr_factor(step, 1, cfg) == pytest.approx(expected, abs=1e-9)


def test_warmup_then_cosine():
    cfg = TrainConfig(schedule="cosine", epochs=10, warmup_epochs=2)
    assert lr_factor(0, 10, cfg) == pytest.approx(0.01)
    assert lr_factor(10, 10, cfg) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(20, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 10, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_scheduler_drives_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(optimizer="sgd", lr=0.5, nesterov=True, schedule="step", step_epochs=1, gamma=0.5, epochs=3)
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=2)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 0.5, 0.25, 0.25, 0.125, 0.125])
    assert opt.param_groups[0]["nesterov"] is True
