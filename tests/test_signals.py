"""A signal at any moment of `cnnlab train`: exit 130/143 and a folder that is complete or that --resume completes.

Each stage is reached by wrapping the function that runs it so that it signals this very process
first: the signal lands exactly there, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cnnlab.train.loop
import cnnlab.train.run
import cnnlab.train.setup
from cnnlab.cli import main

ARGS = ["--model", "cnn_small", "--image-size", "16", "--epochs", "2", "--batch-size", "16", "--lr", "2e-3", "--seed", "5",
        "--deterministic", "--precision", "fp32", "--no-progress", "--set", "data.limit_per_class=30",
        "--set", "data.val_fraction=0.3", "--set", "train.checkpoint_steps=4"]
COMPLETE = ["config.yaml", "split.csv", "history.csv", "model.safetensors", "model.json", "summary.json",
            "predictions.csv", "report.html"]


def _train(cifar_root, out: Path) -> int:
    return main(["train", "--data", str(cifar_root), "--out", str(out), *ARGS])


@pytest.fixture(scope="module")
def uninterrupted(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert _train(cifar_root, out) == 0
    (run,) = list(out.iterdir())
    return load_file(str(run / "model.safetensors"))


def _signal_first(module, name: str, monkeypatch, sig=signal.SIGTERM, nth: int = 1):
    """Make `module.name` send `sig` to this process on its nth call, then do its work."""
    original, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), sig)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


STAGES = {  # stage: (module, function the signal comes in, which call)
    "scanning the data": (cnnlab.train.setup, "scan_folder", 1),
    "before the first epoch": (cnnlab.train.run, "make_loaders", 1),
    "mid-epoch": (cnnlab.train.loop, "save_checkpoint", 1),  # the first mid-epoch checkpoint (step 4)
    "between epochs": (cnnlab.train.loop, "validate", 1),
    "final evaluation": (cnnlab.train.run, "calibrated_test", 1),
    "report writing": (cnnlab.train.run, "write_run_report", 1),
}


# Ctrl-C shares SIGTERM's handler and its deferral: once mid-epoch, for its exit code and message
CASES = [(stage, signal.SIGTERM) for stage in STAGES] + [("mid-epoch", signal.SIGINT)]


@pytest.mark.parametrize("stage,sig", CASES, ids=[f"{s}-{signal.Signals(g).name}" for s, g in CASES])
def test_a_signal_at_any_stage_leaves_a_finishable_run(stage, sig, uninterrupted, cifar_root, tmp_path, monkeypatch,
                                                        capsys):
    module, name, nth = STAGES[stage]
    calls = _signal_first(module, name, monkeypatch, sig, nth)
    out = tmp_path / "runs"
    code = _train(cifar_root, out)
    err = capsys.readouterr().err
    assert calls, f"{name} was never called: the stage was not reached"
    assert code == 128 + sig, err
    assert "Traceback" not in err and f"interrupted by {signal.Signals(sig).name}" in err
    runs = list(out.iterdir()) if out.exists() else []
    if stage == "scanning the data":  # before a run folder exists: nothing is left behind
        assert runs == []
        return
    (run,) = runs
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    if stage in ("final evaluation", "report writing"):  # the folder completes before the process ends
        assert summary["status"] == "completed"
        assert all((run / f).is_file() for f in COMPLETE)
        assert "--resume" not in err  # nothing is left to resume
    else:
        assert f"cnnlab train --resume {run}" in err
        assert summary.get("status", "interrupted") == "interrupted"
        monkeypatch.undo()
        assert main(["train", "--resume", str(run), "--no-progress"]) == 0, capsys.readouterr().err
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    weights = load_file(str(run / "model.safetensors"))
    assert weights.keys() == uninterrupted.keys()
    for k in weights:
        assert torch.equal(weights[k], uninterrupted[k]), k  # resumed exactly where it stopped
