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

from cnnlab.core.runs import RunFolder
from cnnlab.train.checkpoints import load_checkpoint

ARGS = ["--model", "cnn_small", "--epochs", "3", "--batch-size", "16", "--lr", "2e-3", "--seed", "5",
        "--deterministic", "--precision", "fp32", "--no-progress", "--set", "data.limit_per_class=40", "--set", "data.val_fraction=0.3",
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


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(reference, cifar_root, tmp_path):
    ref_run, ref_w, ref_summary = reference
    rng = random.Random(1234)
    root = tmp_path / "runs"
    proc = cnnlab("train", "--data", str(cifar_root), "--out", str(root), *ARGS)
    run, kills, seen = None, 0, (0, 0)
    while kills < 2:
        # each kill comes after a checkpoint the previous process did not reach, at a random moment after it
        found = wait_for_checkpoint(root, proc, after=seen)
        if found is None:
            break
        run = found
        time.sleep(rng.uniform(0, 0.05))
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
        kills += 1
        seen = checkpoint_position(run)  # never unreadable
        assert not list(run.glob("*.tmp")) or all(p.name.startswith(".") for p in run.glob("*.tmp"))
        proc = cnnlab("train", "--resume", str(run), "--no-progress")
    code, text = finish(proc)
    assert code == 0, text
    assert kills >= 2, "the run finished before it could be killed twice"
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
    code, text = finish(cnnlab("train", "--resume", str(run), "--no-progress"))
    assert code == 0, text
    assert_same_weights(weights(run), ref_w)


def test_sigterm_from_outside_ends_143_and_resumes_to_the_same_weights(reference, cifar_root, tmp_path):
    _, ref_w, _ = reference
    root = tmp_path / "runs"
    proc = cnnlab("train", "--data", str(cifar_root), "--out", str(root), *ARGS)
    run = wait_for_checkpoint(root, proc)  # training has run 4 steps
    assert run is not None, "the run ended before its first checkpoint"
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc)
    assert code == 143, text
    assert f"continue with: cnnlab train --resume {run}" in text
    summary = json.loads((run / "summary.json").read_text())
    if summary["status"] == "interrupted":  # stopped in training; else it came during the final evaluation
        assert "--resume" in summary["message"]
        code, text = finish(cnnlab("train", "--resume", str(run), "--no-progress"))
        assert code == 0, text
    assert json.loads((run / "summary.json").read_text())["status"] in ("completed", "failed_to_learn")
    assert_same_weights(weights(run), ref_w)


def test_incompatible_resume_is_refused(reference, tmp_path, capsys):
    from cnnlab.cli import main

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


PROBE = Path(__file__).parent / "ddp_probe.py"
# no BatchNorm (its statistics are per process) and no dropout or augmentation (random per process):
# two processes with half batches each must then compute what one process computes
NO_BN = "model.layers=[{conv: {filters: 8, kernel: 3, padding: 1}}, relu, {maxpool: 2}, flatten, {dense: 32}, relu]"


def test_two_process_ddp_matches_one_process(cifar_root, tmp_path):
    args = ["train", "--data", str(cifar_root), "--model", "custom", "--epochs", "1", "--batch-size", "32",
            "--lr", "1e-3", "--seed", "0", "--precision", "fp32", "--no-progress", "--set", "data.limit_per_class=40",
            "--set", NO_BN, "--set", "data.augment=[]", "--set", "train.threads=0"]
    (tmp_path / "p1").mkdir()
    (tmp_path / "p2").mkdir()
    one = subprocess.run([sys.executable, str(PROBE), str(tmp_path / "p1"), *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(PROBE), str(tmp_path / "p2"), *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    (run_one,), (run_two,) = list((tmp_path / "one").iterdir()), list((tmp_path / "two").iterdir())  # rank 0 writes
    assert "2 processes" in (run_two / "log.txt").read_text()
    assert sum(line.startswith("run: ") for line in two.stdout.splitlines()) == 1  # only rank 0 speaks
    ranks = [json.loads((tmp_path / "p2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["threads"] == ranks[1]["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    steps = json.loads((tmp_path / "p1" / "rank0.json").read_text())["steps"]
    assert len(ranks[0]["steps"]) == len(steps) > 5
    assert ranks[0]["steps"] == ranks[1]["steps"]  # every rank holds the same weights after every step
    w1, w2 = weights(run_one), weights(run_two)
    assert w1.keys() == w2.keys()
    for k in w1:  # the same global batches and data order: the same training, to float rounding
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5), (k, (w1[k] - w2[k]).abs().max())
    # the temperature is fitted on the whole validation split, not on rank 0's shard of it
    c1, c2 = (json.loads((r / "summary.json").read_text())["calibration"] for r in (run_one, run_two))
    assert c1["fitted_on"] == c2["fitted_on"] and c1["temperature"] == pytest.approx(c2["temperature"], rel=1e-3)


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
