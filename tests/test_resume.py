"""Nothing lost: kill training anywhere, resume, and end with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnlab.cli import main
from cnnlab.core.runs import RunFolder
from cnnlab.train.checkpoints import load_checkpoint

ARGS = ["--model", "cnn_small", "--image-size", "16", "--epochs", "3", "--batch-size", "16", "--lr", "2e-3", "--seed", "5",
        "--deterministic", "--precision", "fp32", "--no-progress", "--set", "data.limit_per_class=40", "--set", "data.val_fraction=0.3",
        "--set", "train.checkpoint_steps=4", "--set", "train.lookahead=0.6",  # its slow weights must resume too
        "--set", "train.schedule=cosine"]  # and an lr that moves within an epoch


def cnnlab(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnlab", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})


def finish(proc, timeout=300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(cifar_root, tmp_path_factory):
    """The uninterrupted run, in this process: a run is the same in a process of its own (deterministic kernels,
    threads set by the run from the cores it may use), so the interrupted processes must end with its weights."""
    out = tmp_path_factory.mktemp("ref")
    assert main(["train", "--data", str(cifar_root), "--out", str(out), *ARGS]) == 0
    (run,) = list(out.iterdir())
    return run, weights(run), json.loads((run / "summary.json").read_text())


def checkpoint_position(run: Path) -> tuple[int, int]:
    """(epoch, step) of the run's newest checkpoint, (0, 0) before the first."""
    if not (run / RunFolder.checkpoint).is_file():
        return 0, 0
    p = load_checkpoint(run)[1]["progress"]
    return p["epoch"], p["step"]


def wait_for_checkpoint(run_root: Path, proc, after: tuple[int, int] = (0, 0), limit=300) -> Path | None:
    """The run folder once it holds a checkpoint later than `after`; None if the process ended first."""
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        for run in run_root.iterdir() if run_root.is_dir() else ():
            if checkpoint_position(run) > after:
                return run
        time.sleep(0.01)
    if proc.poll() is not None:
        return None
    raise AssertionError(f"no checkpoint after {after} within {limit} s")


def test_killed_then_stopped_from_outside_then_resumed_equals_uninterrupted(reference, cifar_root, tmp_path):
    """SIGKILL at a random moment after a checkpoint (no chance to clean up), resume; SIGTERM from outside after a
    later checkpoint (exit 143, saying how to continue), resume: the uninterrupted run's weights and results."""
    ref_run, ref_w, ref_summary = reference
    rng = random.Random(1234)
    root = tmp_path / "runs"
    proc = cnnlab("train", "--data", str(cifar_root), "--out", str(root), *ARGS)
    run, seen = None, (0, 0)
    for sig in (signal.SIGKILL, signal.SIGTERM):
        # each signal comes after a checkpoint the previous process did not reach, at a random moment after it
        run = wait_for_checkpoint(root, proc, after=seen)
        assert run is not None, f"the run finished before its {signal.Signals(sig).name}"
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(sig)
        code, text = finish(proc)
        seen = checkpoint_position(run)  # never unreadable
        assert not list(run.glob("*.tmp")) or all(p.name.startswith(".") for p in run.glob("*.tmp"))
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL, text
        else:
            assert code == 143, text
            assert f"continue with: cnnlab train --resume {run}" in text
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        if summary.get("status", "interrupted") != "interrupted":  # it came during the final evaluation
            assert sig == signal.SIGTERM and summary["status"] in ("completed", "failed_to_learn"), summary
            break
        if sig == signal.SIGKILL:  # a process of its own, for the SIGTERM next
            proc = cnnlab("train", "--resume", str(run), "--no-progress")
        else:
            assert "--resume" in summary["message"]
            assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_weights(weights(run), ref_w)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["accuracy"] == ref_summary["test"]["accuracy"]
    assert summary["best_epoch"] == ref_summary["best_epoch"]


def test_kill_in_the_middle_of_a_checkpoint_write(reference, cifar_root, tmp_path):
    _, ref_w, _ = reference
    root = tmp_path / "runs"
    probe = Path(__file__).parent / "fault_probe.py"
    proc = subprocess.Popen([sys.executable, str(probe), "3", "train", "--data", str(cifar_root), "--out", str(root),
                             *ARGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    code, text = finish(proc)
    assert code == -signal.SIGKILL, text
    (run,) = list(root.iterdir())
    assert list(run.glob(".checkpoint.safetensors.fault.tmp"))  # the half-written file is there...
    tensors, meta = load_checkpoint(run)  # ...and the previous checkpoint is intact
    assert meta["progress"]["step"] == 8  # the 2nd write (steps 4, 8, then the 3rd failed)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_weights(weights(run), ref_w)
    # the epoch resumed mid-way records its first lr, as the run that was never stopped does
    lrs = [[row.split(",")[1] for row in (r / "history.csv").read_text().splitlines()[1:]] for r in (run, reference[0])]
    assert lrs[0] == lrs[1] and len(set(lrs[0])) == 3, lrs


def test_incompatible_resume_is_refused(reference, tmp_path, capsys):
    finished = reference[0]
    assert main(["train", "--resume", str(finished), "--epochs", "4"]) == 2  # a finished run is not resumed
    assert "already finished (completed after 3 epochs)" in capsys.readouterr().err
    ref_run = tmp_path / "stopped"  # the same run as if stopped by a signal
    shutil.copytree(finished, ref_run)
    summary = json.loads((ref_run / "summary.json").read_text())
    (ref_run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    assert main(["train", "--resume", str(ref_run), "--batch-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "train.batch_size" in err
    assert main(["train", "--resume", str(ref_run), "--model", "report000_cnn"]) == 2
    assert "model.name" in capsys.readouterr().err
    assert main(["train", "--resume", str(ref_run.parent / "nope")]) == 2


def test_resume_before_the_first_checkpoint_starts_again_in_place(reference, tmp_path, capsys):
    """A run killed before it ever checkpointed has learned nothing: --resume trains it from step one, in place,
    to the uninterrupted run's weights."""
    run = tmp_path / "runs" / reference[0].name
    shutil.copytree(reference[0], run)
    for name in ("checkpoint.safetensors", "summary.json", "model.safetensors", "history.csv", "phases.json"):
        (run / name).unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "summary.json").is_file() and list(run.parent.iterdir()) == [run]
    assert "no checkpoint yet" in (run / "log.txt").read_text() or "no checkpoint yet" in capsys.readouterr().out
    assert_same_weights(weights(run), reference[1])
