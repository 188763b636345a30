"""`cnnlab train --time-budget`: the plan it makes from measured rates, and a real run that keeps to it."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from squares import write_squares

from cnnlab.cli import main
from cnnlab.core.config import load_config, parse_duration
from cnnlab.data.sources import scan_folder
from cnnlab.data.splits import make_split
from cnnlab.train import budget


@pytest.mark.parametrize("text,seconds", [("300", 300), ("90s", 90), ("5m", 300), ("1.5h", 5400), ("1h30m", 5400),
                                          ("2m30s", 150), ("5x", None), ("", None), ("0", None), ("m", None)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget") / "data"
    write_squares(root, {"train": 100, "test": 20}, 32, 14)
    return root


def _split(root):
    return make_split(scan_folder(root), val_fraction=0.1, test_fraction=0.2, seed=0)


@pytest.mark.parametrize("seconds,chosen,epochs,probed", [
    (400, "fastnet_l", 63, ["fastnet", "fastnet_m", "fastnet_l"]),  # (400 s - 3% - 8 s for the report) / 6 s, down
    (50, "fastnet_m", 13, ["fastnet", "fastnet_m", "fastnet_l"]),  # fastnet_l: 6 epochs, too few
    (30, "fastnet", 21, ["fastnet", "fastnet_m"]),  # fastnet_m: 7 epochs, so fastnet_l is not even probed
])
def test_the_widest_network_that_gets_ten_epochs_is_chosen(squares, monkeypatch, seconds, chosen, epochs, probed):
    """With rates fixed (fastnet 1 s per step, fastnet_m 3 s, fastnet_l 6 s, one step an epoch here, evaluation
    free but the 8 s the report takes, 3% of the budget kept in reserve), the plan takes the widest that gets 10
    epochs, and as many as fit."""
    steps = {"fastnet": 1.0, "fastnet_m": 3.0, "fastnet_l": 6.0}
    probed_names = []

    def probe(name, cfg, num_classes, size, device, precision, batch):
        probed_names.append(name)
        return budget.Rate(name, steps[name], 1e9)  # evaluation free: the epochs are the training steps

    monkeypatch.setattr(budget, "probe", probe)
    cfg = load_config(None, {"data": {"path": str(squares)}, "train": {"time_budget": f"{seconds}s", "batch_size": 512}})
    split = _split(squares)
    assert len(split.of("train")) <= cfg.train.batch_size  # one step an epoch
    planned, record = budget.plan(cfg, split, time.monotonic(), None, "fp32", log=lambda line: None)
    assert planned.model.name == record["model"] == chosen
    assert planned.train.epochs == record["epochs"] == record["steps"] == epochs  # one step an epoch
    assert planned.train.last_epoch_steps == 0 and probed_names == probed


def test_the_last_epoch_is_cut_to_the_steps_that_fit(squares, monkeypatch):
    """At batch 30, 9 steps an epoch (270 training images) of 1 s each and a validation pass of 3 s (30 images at
    10 per second), 100.5 s less the 3% reserve, 8 s for the report and 9 s for the final validation and test passes
    (90 images) hold 6 whole epochs (72 s) and 8.5 s: 5 steps and the validation pass after them."""
    monkeypatch.setattr(budget, "probe", lambda name, *a: budget.Rate(name, 1.0, 10.0))
    cfg = load_config(None, {"data": {"path": str(squares)}, "model": {"name": "fastnet"},
                             "train": {"time_budget": "100.5s", "batch_size": 30}})
    split = _split(squares)
    assert split.sizes() == {"train": 270, "val": 30, "test": 60}
    planned, record = budget.plan(cfg, split, time.monotonic(), None, "fp32", log=lambda line: None)
    assert (planned.train.epochs, planned.train.last_epoch_steps) == (7, 5)
    assert record["steps"] == 59 and record["steps_per_epoch"] == 9


@pytest.mark.parametrize("seconds,steps", [(100, 65), (96, 61), (95.5, 60), (15, 10), (14.9, 9), (5.5, 0)])
def test_steps_that_fit(seconds, steps):
    """10 steps an epoch of 1 s each and 5 s of validation after every epoch, whole or cut short: an epoch is
    15 s; 100 s hold 6 of them and 5 steps with their validation pass; 95.5 s hold 6 and half a step; 5.5 s
    not one step and its validation pass."""
    from cnnlab.train.loop import steps_that_fit

    assert steps_that_fit(seconds, 1.0, 5.0, 10) == steps


def test_an_epoch_cut_to_under_a_tenth_of_its_steps_is_not_begun():
    from cnnlab.train.loop import steps_that_fit

    assert steps_that_fit(95 + 0.9, 0.1, 5.0, 100) == 600  # 6 epochs and 9 steps of 100: not worth their validation pass
    assert steps_that_fit(95 + 1.05, 0.1, 5.0, 100) == 610


def test_a_named_network_keeps_its_name(squares, monkeypatch):
    monkeypatch.setattr(budget, "probe", lambda name, *a: budget.Rate(name, 1.0, 1e9))
    cfg = load_config(None, {"data": {"path": str(squares)}, "model": {"name": "report000_cnn"},
                             "train": {"time_budget": "40s"}})
    planned, record = budget.plan(cfg, _split(squares), time.monotonic(), None, "fp32", log=lambda line: None)
    assert planned.model.name == "report000_cnn" and list(record["rates"]) == ["report000_cnn"]


def test_a_run_keeps_to_its_budget(squares, tmp_path, capsys):
    code = main(["train", "--data", str(squares), "--model", "fastnet", "--time-budget", "25s", "--precision", "fp32",
                 "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    plan = summary["budget"]
    assert plan["seconds"] == 25 and plan["model"] == "fastnet" and plan["rates"]["fastnet"]["epoch_seconds"] > 0
    history = (run / "history.csv").read_text().strip().splitlines()[1:]
    epochs = yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"]
    assert plan["epochs_run"] == len(history) >= 1 and epochs == plan["epochs"]  # config.yaml and summary.json agree
    if summary["status"] == "early_stopped":  # the machine slowed after the plan: the time left held no more steps
        assert "time budget" in summary["message"] and len(history) < epochs
    else:  # ran its plan (on a slow or busy machine one epoch, too few to beat chance: failed_to_learn)
        assert summary["status"] in ("completed", "failed_to_learn") and epochs == len(history)
    assert plan["seconds_at_summary"] <= 25 * 1.15, plan  # the report follows in well under a second
    assert "time budget 25 s: fastnet for" in out


def test_a_budget_too_small_for_one_epoch_says_what_it_needs(squares, tmp_path, capsys):
    code = main(["train", "--data", str(squares), "--model", "fastnet", "--time-budget", "1s", "--out", str(tmp_path),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "leaves no time for one epoch of fastnet" in err and "at least" in err
    assert not list(tmp_path.iterdir())  # planned before the run folder exists


@pytest.mark.parametrize("args,message", [
    (["--time-budget", "5x"], "train.time_budget '5x' is not a duration"),
    (["--time-budget", "5m", "--model", "efficientnet_lite0", "--pretrained"], "plans networks trained from scratch"),
    (["--time-budget", "5m", "--epochs", "3"], "give --epochs or --time-budget, not both"),
    (["--time-budget", "5m", "--set", "train.epochs=3"], "give --epochs or --time-budget, not both"),
])
def test_bad_budgets_are_refused(squares, tmp_path, capsys, args, message):
    code = main(["train", "--data", str(squares), *args, "--out", str(tmp_path), "--no-progress"])
    assert code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_cut_short_last_epoch_trains_only_its_steps(squares, tmp_path, capsys):
    """train.last_epoch_steps (what a budget plans): 2 epochs at batch 10 with the last cut to 2 steps make
    one epoch's steps and 2 more, as the checkpoint's scheduler and optimizer count them."""
    from cnnlab.train.checkpoints import load_checkpoint

    code = main(["train", "--data", str(squares), "--model", "fastnet", "--epochs", "2", "--batch-size", "10",
                 "--precision", "fp32", "--set", "train.last_epoch_steps=2", "--out", str(tmp_path), "--no-progress"])
    assert code == 0, capsys.readouterr()
    (run,) = tmp_path.iterdir()
    train_images = sum(1 for row in (run / "split.csv").read_text().splitlines() if row.split(",")[2:3] == ["train"])
    tensors, meta = load_checkpoint(run)
    assert meta["scheduler"]["last_epoch"] == -(-train_images // 10) + 2
    assert len((run / "history.csv").read_text().strip().splitlines()) == 1 + 2


@pytest.mark.parametrize("fit_now,epochs,last,status", [
    (10**6, 3, 0, "completed"),  # time for far more: the run keeps the cap on its total (3 here), no re-plan
    (5, 3, 5, "completed"),  # after 2 epochs, 5 steps fit: the last epoch is cut to them
    (0, 2, 0, "early_stopped"),  # nothing fits: it stops, saying why
])
def test_fit_re_plans_the_steps_left_after_each_epoch(squares, tmp_path, capsys, monkeypatch, fit_now, epochs, last,
                                                     status):
    """`fit`'s re-plan after epoch 2 of a 3-epoch plan (the cap on a budget's epochs set to 3), with the steps that
    fit in the time left fixed: config.yaml, summary.json and the checkpoint's scheduler say what ran."""
    from cnnlab.train import loop
    from cnnlab.train.checkpoints import load_checkpoint

    monkeypatch.setattr(loop, "MAX_BUDGET_EPOCHS", 3)
    monkeypatch.setattr(loop, "steps_that_fit", lambda *a: fit_now)  # fit's own; the plan keeps the real one
    code = main(["train", "--data", str(squares), "--model", "fastnet", "--time-budget", "1h", "--batch-size", "30",
                 "--precision", "fp32", "--out", str(tmp_path), "--no-progress"])
    assert code == 0, capsys.readouterr()
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    used = yaml.safe_load((run / "config.yaml").read_text())["train"]
    per_epoch = -(-sum(row.split(",")[2:3] == ["train"] for row in (run / "split.csv").read_text().splitlines()) // 30)
    assert summary["budget"]["steps_per_epoch"] == per_epoch > 5
    steps = 2 * per_epoch + (last or per_epoch) if epochs == 3 else 2 * per_epoch
    assert summary["budget"]["epochs_planned"] == 3 and summary["status"] == status
    assert (used["epochs"], used["last_epoch_steps"]) == (3, last)  # an early stop leaves the plan as it was
    assert summary["budget"]["steps_run"] == steps and summary["budget"]["epochs_run"] == epochs
    assert load_checkpoint(run)[1]["scheduler"]["last_epoch"] == steps
    if status == "early_stopped":
        assert "time budget" in summary["message"]


@pytest.mark.parametrize("seconds,left,cap,steps", [
    (31, 20, 99, 20),  # the plan still fits (20 steps), though not with 3 s spare (18): kept, its last epoch run
    (15.5, 10, 99, 10),  # so is the last epoch at the end, rather than cut to the 7 steps that leave 3 s spare
    (50, 20, 99, 30),  # 30 fit with 3 s to spare: grown
    (46, 20, 99, 28),  # 30 fit, but only 28 with 3 s to spare: grown to 28
    (40, 30, 99, 22),  # the plan no longer fits (25 do): shrunk to the 22 that leave 3 s spare
    (7, 10, 99, 2),  # 2 fit, none with the spare kept: shrunk to what fits
    (5.5, 10, 99, 0),  # nothing fits: the run ends
    (1000, 20, 25, 25),  # the cap on the run's total
])
def test_a_re_plan_keeps_a_plan_that_fits_and_grows_only_with_time_to_spare(seconds, left, cap, steps):
    """`fit`'s re-plan, with 10 steps an epoch of 1 s each, 5 s of validation after every epoch and a 3 s
    reserve: the pace's swings must neither drop a planned epoch that still fits nor re-plan back and forth."""
    from cnnlab.train.loop import steps_to_plan

    assert steps_to_plan(seconds, 3.0, 1.0, 5.0, 10, left, cap) == steps


def test_another_epoch_count_on_resume_makes_every_epoch_whole(tmp_path):
    """A cut-short last epoch is the plan of the run's length: `--resume RUN --epochs N` with another N drops it,
    the same length keeps it."""
    from cnnlab import api
    from cnnlab.core.config import dump_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(None, {"train": {"epochs": 10, "last_epoch_steps": 30}})))
    assert api.train_config(None, {"train": {"epochs": 7}}, resume=run).train.last_epoch_steps == 0
    assert api.train_config(None, {"train": {"epochs": 10}}, resume=run).train.last_epoch_steps == 30
    assert api.train_config(None, {}, resume=run).train.last_epoch_steps == 30
