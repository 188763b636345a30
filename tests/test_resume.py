"""Nothing lost: kill training anywhere, resume, and end with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnlab.train.checkpoints import CHECKPOINT, load_checkpoint

ARGS = ["--model", "cnn_small", "--epochs", "3", "--batch-size", "16", "--lr", "2e-3", "--seed", "5",
        "--deterministic", "--no-progress", "--set", "data.limit_per_class=40", "--set", "data.val_fraction=0.3",
        "--set", "train.checkpoint_steps=4", "--set", "train.threads=2"]


def cnnlab(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnlab", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})


def finish(proc, timeout=300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def run_folder(out: str) -> Path:
    return Path(out.strip().splitlines()[-1].split("run: ", 1)[1])


def weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    code, text = finish(cnnlab("train", "--data", str(cifar_root), "--out", str(out), *ARGS))
    assert code == 0, text
    run = run_folder(text)
    return run, weights(run), json.loads((run / "summary.json").read_text())


def wait_for_training(run_root: Path, proc, starts: int = 1, limit=120) -> Path:
    """The run folder once training has started for the `starts`-th time (the log names the split sizes)."""
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        for log in run_root.glob("*/log.txt"):
            if log.read_text().count(" train / ") >= starts:
                return log.parent
        time.sleep(0.05)
    if proc.poll() is not None:
        return next(run_root.iterdir())
    raise AssertionError("training did not start")


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(reference, cifar_root, tmp_path):
    ref_run, ref_w, ref_summary = reference
    rng = random.Random(1234)
    root = tmp_path / "runs"
    proc = cnnlab("train", "--data", str(cifar_root), "--out", str(root), *ARGS)
    run = wait_for_training(root, proc)
    kills = 0
    while kills < 6:
        time.sleep(rng.uniform(0.1, 1.5))
        if proc.poll() is not None:
            break
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
        kills += 1
        if (run / CHECKPOINT).exists():
            load_checkpoint(run)  # never unreadable
        assert not list(run.glob("*.tmp")) or all(p.name.startswith(".") for p in run.glob("*.tmp"))
        proc = cnnlab("train", "--resume", str(run), "--no-progress")
        wait_for_training(root, proc, starts=kills + 1)  # kill only once training runs again
    code, text = finish(proc)
    assert code == 0, text
    assert kills >= 2, "the run finished before it could be killed twice; make it longer"
    assert_same_weights(weights(run), ref_w)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["accuracy"] == ref_summary["test"]["accuracy"]
    assert summary["best_epoch"] == ref_summary["best_epoch"]


def test_kill_in_the_middle_of_a_checkpoint_write(reference, cifar_root, tmp_path):
    _, ref_w, _ = reference
    root = tmp_path / "runs"
    code, text = finish(cnnlab("train", "--data", str(cifar_root), "--out", str(root), *ARGS,
                               env={"CNNLAB_FAULT": "kill-in-checkpoint:3"}))
    assert code == -signal.SIGKILL, text
    (run,) = list(root.iterdir())
    assert list(run.glob(".checkpoint.safetensors.fault.tmp"))  # the half-written file is there...
    tensors, meta = load_checkpoint(run)  # ...and the previous checkpoint is intact
    assert meta["progress"]["step"] == 8  # the 2nd write (steps 4, 8, then the 3rd failed)
    code, text = finish(cnnlab("train", "--resume", str(run), "--no-progress"))
    assert code == 0, text
    assert_same_weights(weights(run), ref_w)


def test_sigterm_checkpoints_and_reports_interrupted(reference, cifar_root, tmp_path):
    _, ref_w, _ = reference
    root = tmp_path / "runs"
    proc = cnnlab("train", "--data", str(cifar_root), "--out", str(root), *ARGS)
    run = wait_for_training(root, proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc)
    assert code == 0, text
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "--resume" in summary["message"]
    code, text = finish(cnnlab("train", "--resume", str(run), "--no-progress"))
    assert code == 0, text
    assert json.loads((run / "summary.json").read_text())["status"] in ("completed", "failed_to_learn")
    assert_same_weights(weights(run), ref_w)


def test_incompatible_resume_is_refused(reference, capsys):
    from cnnlab.cli import main

    ref_run = reference[0]
    assert main(["train", "--resume", str(ref_run), "--batch-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "train.batch_size" in err
    assert main(["train", "--resume", str(ref_run), "--model", "report000_cnn"]) == 2
    assert "model.name" in capsys.readouterr().err
    assert main(["train", "--resume", str(ref_run.parent / "nope")]) == 2


def test_two_process_ddp_matches_one_process(cifar_root, tmp_path):
    args = ["--data", str(cifar_root), "--model", "report000_cnn", "--epochs", "4", "--batch-size", "32",
            "--lr", "2e-3", "--seed", "0", "--no-progress", "--set", "data.limit_per_class=100"]
    code, text = finish(cnnlab("train", "--out", str(tmp_path / "one"), *args))
    assert code == 0, text
    one = json.loads((run_folder(text) / "summary.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cnnlab", "train", "--out", str(tmp_path / "two"), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = list((tmp_path / "two").iterdir())
    assert len(runs) == 1  # only rank 0 writes
    two = json.loads((runs[0] / "summary.json").read_text())
    assert "2 processes" in (runs[0] / "log.txt").read_text()
    # same global batch, same data order; BatchNorm sees half batches per rank, so allow 6 points
    assert abs(one["test"]["accuracy"] - two["test"]["accuracy"]) <= 0.06, (one["test"], two["test"])
    assert two["test"]["accuracy"] > 0.2  # and it learned (chance is 0.1)


def test_resume_before_the_first_checkpoint_starts_again_in_place(cifar_root, tmp_path, capsys):
    """A run killed before it ever checkpointed has learned nothing: --resume trains it from step one."""
    from cnnlab.cli import main

    args = ["--data", str(cifar_root), "--model", "cnn_small", "--epochs", "1", "--out", str(tmp_path),
            "--set", "data.limit_per_class=20", "--no-progress"]
    assert main(["train", *args]) == 0
    (run,) = list(tmp_path.iterdir())
    for name in ("checkpoint.safetensors", "summary.json", "model.safetensors", "history.csv", "phases.json"):
        (run / name).unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "summary.json").is_file() and list(tmp_path.iterdir()) == [run]
    assert "no checkpoint yet" in (run / "log.txt").read_text() or "no checkpoint yet" in capsys.readouterr().out
