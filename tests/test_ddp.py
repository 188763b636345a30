"""Distributed data parallel: two processes train what one process trains, and only rank 0 speaks.

(Its own file: the test runner hands out whole files, the heaviest first, tests/conftest.py's HEAVY_FIRST.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_probe import recording
from safetensors.torch import load_file

import cnnlab.train.loop
from cnnlab.cli import main
from cnnlab.core.config import load_config


def weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


PROBE = Path(__file__).parent / "ddp_probe.py"
# no BatchNorm (its statistics are per process) and no dropout or augmentation (random per process):
# two processes with half batches each must then compute what one process computes
NO_BN = "model.layers=[{conv: {filters: 8, kernel: 3, padding: 1}}, relu, {maxpool: 2}, flatten, {dense: 32}, relu]"


def test_two_process_ddp_matches_one_process(cifar_root, tmp_path, monkeypatch):
    """Two processes with half batches each train what one process trains, to float rounding, the learning
    rate found by `lr: auto` included; every rank holds the same weights after every step."""
    args = ["train", "--data", str(cifar_root), "--model", "custom", "--epochs", "1", "--batch-size", "32",
            "--lr", "auto", "--seed", "0", "--precision", "fp32", "--no-progress", "--set", "data.limit_per_class=40",
            "--set", NO_BN, "--set", "data.augment=[]", "--set", "train.threads=0"]
    steps: list[str] = []  # one process: this one, recording its steps as the probe does each rank's
    monkeypatch.setattr(cnnlab.train.loop, "build_optimizer", recording(cnnlab.train.loop.build_optimizer, steps))
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    monkeypatch.undo()
    (run_one,) = list((tmp_path / "one").iterdir())
    lr1 = json.loads((run_one / "summary.json").read_text())["phases"][0]["lr"]
    said = re.search(r"lr auto: range test suggests ([0-9.e+-]+)", (run_one / "log.txt").read_text())
    assert said and lr1 == pytest.approx(float(said.group(1)), rel=1e-2)  # trained at what it found
    assert 1e-5 < lr1 < 0.1  # and that is an Adam learning rate, not the range's ends
    assert load_config(run_one / "config.yaml").train.lr == lr1  # config.yaml: what was used
    (tmp_path / "p2").mkdir()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(PROBE), str(tmp_path / "p2"), *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    (run_two,) = list((tmp_path / "two").iterdir())  # rank 0 writes
    assert "2 processes" in (run_two / "log.txt").read_text()
    assert sum(line.startswith("run: ") for line in two.stdout.splitlines()) == 1  # only rank 0 speaks
    ranks = [json.loads((tmp_path / "p2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["threads"] == ranks[1]["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert len(ranks[0]["steps"]) == len(steps) > 5
    assert ranks[0]["steps"] == ranks[1]["steps"]  # every rank holds the same weights after every step
    w1, w2 = weights(run_one), weights(run_two)
    assert w1.keys() == w2.keys()
    for k in w1:  # the same global batches and data order: the same training, to float rounding
        # (Adam at the rate lr auto finds, ~2.6e-3, carries rounding into the weights at up to ~2e-5; a DDP that
        # never synced differs by ~1e-2)
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-4), (k, (w1[k] - w2[k]).abs().max())
    # lr auto (checklist 4): the range test's loss is averaged over the ranks, so both stop together and train at
    # the rate one process finds on the same global batches (each rank alone would pick its own and diverge)
    lr2 = json.loads((run_two / "summary.json").read_text())["phases"][0]["lr"]
    assert lr1 == pytest.approx(lr2, rel=1e-6)
    # the temperature is fitted on the whole validation split, not on rank 0's shard of it
    c1, c2 = (json.loads((r / "summary.json").read_text())["calibration"] for r in (run_one, run_two))
    assert c1["fitted_on"] == c2["fitted_on"] and c1["temperature"] == pytest.approx(c2["temperature"], rel=1e-3)
