"""`cnnlab train --time-budget`: does the whole command end within its budget, and what does it reach?

    python benchmarks/time_budget.py [--budgets 2m 5m]

For each budget, `cnnlab train --data <shared CIFAR-10 JPEG copy> --time-budget B` runs as a user
would run it (the default recipe, the network and epochs left to the plan), timed from outside the
process; the table gives the plan (network, epochs, steps: the last epoch may be cut short, and the
steps are re-planned after every epoch from the second on), the measured rates it was made from, the wall
time against the budget (the target is within 10%) and the test accuracy.

With `--fixed`, each budget run is followed by the peer a user would run by hand: the default
`cnnlab train` (fastnet, the recipe) with a fixed number of epochs, the most whole ones that fit in
the budget after the budget run's own time outside training and planning, at the epoch time it
trained at (scaled by the probes' fastnet / network ratio when it trained a wider one). The target:
the budget's accuracy is at least that fixed run's, which must itself end within the budget.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import SHARED_CIFAR10, matmul_rates, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cnnlab"]


def main() -> None:
    from cnnlab.core.config import parse_duration

    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="+", default=["2m", "5m"])
    ap.add_argument("--fixed", action="store_true", help="after each budget, the fixed-epoch fastnet run beside it")
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "out" / "time_budget"
    rates = matmul_rates()  # this machine's state: the same kind has run at half its usual rate
    rows = ["| budget | network | epochs planned / run | steps planned / run (per epoch) | "
            "epoch s (measured before training) | s before training | wall s (whole command) | wall / budget | "
            "test accuracy | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    fixed = ["| budget | budget run: test accuracy, wall s | fixed fastnet run: epochs | its wall s | wall / budget | "
             "its test accuracy | budget - fixed (points) |", "|---|---|---|---|---|---|---|"]
    for text in args.budgets:
        budget = parse_duration(text)
        proc, wall = _train("--time-budget", text, out=out)
        refused = proc.stderr.strip().splitlines()[-1:] if proc.returncode == 2 else []
        if refused and "leaves no time" in refused[0]:  # the plan's answer on this machine now: a row, not the end
            rows.append(f"| {text} | refused: {refused[0].removeprefix('cnnlab: error: ')} | | | | | {wall:.0f} | | | |")
            print(rows[-1], flush=True)
            continue
        if proc.returncode:
            raise SystemExit(f"cnnlab train --time-budget {text} failed:\n{proc.stdout}\n{proc.stderr}")
        s = _summary(proc)
        plan = s["budget"]
        rate = plan["rates"][plan["model"]]["epoch_seconds"]
        rows.append(f"| {text} | {plan['model']} | {plan['epochs_planned']} / {plan['epochs_run']} | "
                    f"{plan['steps_planned']:,} / {plan['steps']:,} ({plan['steps_per_epoch']}) | {rate:.1f} | "
                    f"{plan['seconds_before_planning']:.0f} | {wall:.0f} | {wall / budget:.2f} | "
                    f"{s['test']['accuracy']:.2%} | {s['status']} |")
        print(rows[-1], flush=True)
        if args.fixed:
            epochs = _fixed_epochs(s, wall, budget)
            proc, fixed_wall = _train("--epochs", str(epochs), out=out)
            if proc.returncode:
                raise SystemExit(f"cnnlab train --epochs {epochs} failed:\n{proc.stdout}\n{proc.stderr}")
            accuracy = _summary(proc)["test"]["accuracy"]
            gain = 100 * (s["test"]["accuracy"] - accuracy)
            fixed.append(f"| {text} | {s['test']['accuracy']:.2%}, {wall:.0f} | {epochs} | {fixed_wall:.0f} | "
                         f"{fixed_wall / budget:.2f} | {accuracy:.2%} | {gain:+.2f} |")
            print(fixed[-1], flush=True)
    if args.fixed:
        rows += ["", "Beside each budget, the default `cnnlab train` with fixed epochs: the most whole fastnet epochs "
                 "that fit in the budget less the budget run's time outside training and planning, at the epoch time "
                 "the budget run trained at (scaled by its probes' fastnet / network ratio when it trained a wider "
                 "one).",
                 "", *fixed]
    body = ["The shared CIFAR-10 JPEG copy (45,000 train / 5,000 val / 10,000 test images), the default recipe; "
            "the data cache built before (as any second run finds it).  ",
            f"Matmul just before, 2048 x 2048: fp32 {rates['float32']:.0f} GFLOP/s, bf16 {rates['bfloat16']:.0f} GFLOP/s.",
            "", *rows]
    update_section("time budget", "\n".join(body))


def _fixed_epochs(s: dict, wall: float, budget: float) -> int:
    """The whole fastnet epochs a user who knew this machine's pace would give a fixed run in `budget` seconds."""
    plan, epoch_seconds = s["budget"], s["time"]["epoch_seconds"]
    whole = epoch_seconds[:-1] if plan["steps"] % plan["steps_per_epoch"] else epoch_seconds  # a cut last one
    epoch = sum(whole) / len(whole)
    if plan["model"] != "fastnet":
        epoch *= plan["rates"]["fastnet"]["epoch_seconds"] / plan["rates"][plan["model"]]["epoch_seconds"]
    outside = wall - s["time"]["train_seconds"] - plan["seconds_before_planning"]
    return max(1, int((budget - outside) // epoch))


def _train(*args: str, out: Path) -> tuple[subprocess.CompletedProcess, float]:
    """`cnnlab train` on the shared CIFAR-10 copy with `args`, and its wall seconds timed from outside."""
    start = time.perf_counter()
    proc = subprocess.run([*CLI, "train", "--data", str(SHARED_CIFAR10), *args, "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT)
    return proc, time.perf_counter() - start


def _summary(proc: subprocess.CompletedProcess) -> dict:
    run = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run: "))
    return json.loads((run / "summary.json").read_text())


if __name__ == "__main__":
    main()
