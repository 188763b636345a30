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
    (400, "fastnet_l", 65, ["fastnet", "fastnet_m", "fastnet_l"]),  # (400 - 8 s for the report) / 6 s, rounded
    (50, "fastnet_m", 14, ["fastnet", "fastnet_m", "fastnet_l"]),  # fastnet_l: 7 epochs, too few
    (30, "fastnet", 22, ["fastnet", "fastnet_m"]),  # fastnet_m: 7 epochs, so fastnet_l is not even probed
])
def test_the_widest_network_that_gets_ten_epochs_is_chosen(squares, monkeypatch, seconds, chosen, epochs, probed):
    """With rates fixed (fastnet 1 s per step, fastnet_m 3 s, fastnet_l 6 s, one step an epoch here, evaluation
    free but the 8 s the report takes), the plan takes the widest that gets 10 epochs, and as many as fit."""
    steps = {"fastnet": 1.0, "fastnet_m": 3.0, "fastnet_l": 6.0}
    probed_names = []

    def probe(name, cfg, num_classes, size, device, precision, batch):
        probed_names.append(name)
        return budget.Rate(name, steps[name], 1e9)  # evaluation free: the epochs are the training steps

    monkeypatch.setattr(budget, "probe", probe)
    cfg = load_config(None, {"data": {"path": str(squares)}, "train": {"time_budget": f"{seconds}s"}})
    split = _split(squares)
    assert len(split.of("train")) <= cfg.train.batch_size  # one step an epoch
    planned, record = budget.plan(cfg, split, time.monotonic(), None, "fp32", log=lambda line: None)
    assert planned.model.name == record["model"] == chosen
    assert planned.train.epochs == record["epochs"] == epochs
    assert probed_names == probed


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
    assert plan["epochs_run"] == len(history) >= 1 and summary["status"] == "completed"
    assert epochs == plan["epochs"] == len(history)  # config.yaml and summary.json: the schedule it ran
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
])
def test_bad_budgets_are_refused(squares, tmp_path, capsys, args, message):
    code = main(["train", "--data", str(squares), *args, "--out", str(tmp_path), "--no-progress"])
    assert code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
