"""Learning-rate schedules: the multiplier at chosen steps, by hand; Lookahead's weights, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cnnlab.core.config import TrainConfig
from cnnlab.train.optim import Lookahead, build_optimizer, build_scheduler, lr_factor


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


@pytest.mark.parametrize("new_epochs", [16, 5])
def test_a_time_budget_replan_keeps_the_warmup_and_moves_the_end(new_epochs):
    """Re-planned from 9 to `new_epochs` epochs after 3 (of 88 steps each): one-cycle's warm-up stays 198 steps
    (a quarter of the first plan; a quarter of the new total would put step 264 back into a warm-up or far past
    it), the rate at step 264 is the new schedule's, and the decay reaches zero at the new last step."""
    from cnnlab.train.loop import _replanned

    cfg = TrainConfig(optimizer="sgd", lr=0.2, epochs=9, schedule="onecycle")
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = build_scheduler(opt, cfg, 88)
    for _ in range(264):
        opt.step()
        sched.step()
    before = opt.param_groups[0]["lr"]
    new, sched = _replanned(opt, sched, cfg, new_epochs * 88, 88)
    assert new.epochs == new_epochs and new.last_epoch_steps == 0 and round(new.warmup_epochs * 88) == 198
    after = opt.param_groups[0]["lr"]
    assert after == pytest.approx(0.2 * (1 - (264 - 198) / (new_epochs * 88 - 198)))
    assert (after > before) == (new_epochs > 9)  # a longer run decays more slowly from here, a shorter one faster
    for _ in range(new_epochs * 88 - 264 - 1):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 / (new_epochs * 88 - 198), abs=1e-9)  # one step from 0


def test_lookahead_moves_the_weights_every_fifth_step_and_at_the_last():
    """A weight that plain SGD moves by +1 a step, over 12 steps, with Lookahead at 0.8: the slow copy is taken
    at step 5 (nothing to average yet), then keeps 0.8 * (10/12)^3 of itself at step 10 and 0.8 at step 12."""
    w = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([w], lr=1.0)
    lookahead = Lookahead(optimizer, 0.8, total=12)
    seen = []
    for done in range(1, 13):
        w.grad = torch.full((1,), -1.0)
        optimizer.step()
        lookahead.step(done)
        seen.append(round(w.item(), 6))
    keep10 = 0.8 * (10 / 12) ** 3
    at10 = 5 + 5 * (1 - keep10)  # slow at 5, fast at 10
    at12 = at10 + 2 * (1 - 0.8)  # slow at `at10`, fast 2 steps on
    assert seen[:9] == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # untouched between the moves
    assert seen[9] == pytest.approx(at10) and seen[10] == pytest.approx(at10 + 1)
    assert seen[11] == pytest.approx(at12)
    # the slow weights are optimizer state: a checkpoint of the optimizer carries them
    assert optimizer.state_dict()["state"][0]["lookahead_slow"].item() == pytest.approx(at12)
