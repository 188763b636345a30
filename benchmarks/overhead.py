"""Everything in a run that is not training: how long, and where it goes.

    python benchmarks/overhead.py [--runs 3] [--epochs 1]

Runs `cnnlab train --data <shared CIFAR-10 JPEG copy> --epochs 1` as a user would, after one run
that builds the decoded-image cache if this machine has none (as any second run finds it). The
headline is the whole command's wall time, timed from outside the process, less the training time
its summary.json records (the epochs with their validation): the median over `--runs` runs. One
more run under cProfile splits that time into the run's stages (the profiler slows Python-heavy
stages, so the split is relative; the headline comes from the runs without it).
"""

from __future__ import annotations

import argparse
import json
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import SHARED_CIFAR10, update_section  # noqa: E402

# (module file, function): what a reader calls that stage; cumulative times, each counted once
STAGES = [
    ("api.py", "train", None),  # the whole run after Python started, imported cnnlab and torch and read the command
    ("train/setup.py", "data_and_split", "scan the folder, hash the files, split"),
    ("train/run.py", "_new_folder", "the run folder: config, split and class-count figure"),
    ("train/run.py", "_loaders", "load the decoded-image cache into the loaders"),
    ("train/setup.py", "init_from_data", "set the whitening stem from the training images"),
    ("train/optim.py", "build_optimizer", "build the optimizer (its first call imports torch._dynamo)"),
    ("evaluate/evaluation.py", "calibrated_test",
     "predict test (fp32, flip TTA); fit the temperature (on the best epoch's validation logits)"),
    ("evaluate/evaluation.py", "write_evaluation", "metrics, predictions.csv, confusion matrix, galleries"),
    ("evaluate/predict.py", "inference_speed", "measure inference speed for summary.json"),
    ("evaluate/run_report.py", "write_run_report", "report.html"),
]


def command(data: Path, epochs: int, out: Path) -> list[str]:
    return ["-m", "cnnlab", "train", "--data", str(data), "--epochs", str(epochs), "--out", str(out), "--no-progress"]


def run_once(args: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    run = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run: "))
    return wall, json.loads((run / "summary.json").read_text())


def stage_seconds(profile: Path) -> dict[str, float]:
    """Cumulative seconds of each of STAGES' functions in a cProfile file."""
    stats = pstats.Stats(str(profile)).stats  # {(file, line, name): (calls, primitive, tottime, cumtime, callers)}
    found = {}
    for (file, _, name), (_, _, _, cumtime, _) in stats.items():
        for suffix, function, _ in STAGES:
            if name == function and file.endswith("cnnlab/" + suffix):
                found[(suffix, function)] = cumtime
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_CIFAR10))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run_once(command(Path(args.data), 1, out))  # builds the cache where this machine has none
        timed = [run_once(command(Path(args.data), args.epochs, out)) for _ in range(args.runs)]
        profile = out / "run.prof"
        p_wall, p_summary = run_once(["-m", "cProfile", "-o", str(profile), *command(Path(args.data), args.epochs, out)])
        found = stage_seconds(profile)
    walls = [w for w, _ in timed]
    trains = [s["time"]["train_seconds"] for _, s in timed]
    others = [w - t for w, t in zip(walls, trains)]
    p_train = p_summary["time"]["train_seconds"]
    rows = [("start Python, import cnnlab and torch, read the command", p_wall - found[("api.py", "train")])]
    rows += [(label, found[(suffix, function)]) for suffix, function, label in STAGES[1:] if (suffix, function) in found]
    listed = sum(seconds for _, seconds in rows)
    rows.append(("the rest (logging, history, curves, checkpoints, summary)", p_wall - p_train - listed))
    body = [
        f"`cnnlab train --data <CIFAR-10 JPEG copy> --epochs {args.epochs}` (fastnet, the default recipe), the "
        "decoded-image cache built before.",
        "",
        "| | median of runs | runs |",
        "|---|---|---|",
        f"| whole command, wall | {statistics.median(walls):.1f} s | {', '.join(f'{w:.1f}' for w in walls)} |",
        f"| training (epochs with their validation) | {statistics.median(trains):.1f} s | "
        f"{', '.join(f'{t:.1f}' for t in trains)} |",
        f"| **everything else** (target: 5 s) | **{statistics.median(others):.1f} s** | "
        f"{', '.join(f'{o:.1f}' for o in others)} |",
        "",
        f"Where everything else goes, from one more run under cProfile ({p_wall:.1f} s wall, {p_train:.1f} s "
        f"training, {p_wall - p_train:.1f} s else; the profiler slows Python-heavy stages):",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {label} | {seconds:.2f} |" for label, seconds in rows],
    ]
    update_section("overhead", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
