"""Time to accuracy of the fast recipe on the CIFAR-10 JPEG copy: epoch budgets x seeds, from scratch.

    python benchmarks/fast_training.py [--models fastnet] [--epochs 1 2 4 8] [--seeds 0 1 2] [--keep]

Each (network, epoch budget, seed) is one `cnnlab train` in its own process with the network's
recipe (core/recipes.py) and every training image but a 1,000-image validation split, so the
one-cycle schedule fits the budget as a user's run would. "Time to X%" is the training time of
the smallest budget whose mean test accuracy over the seeds reaches X, as the fast-training
literature counts it. Peak memory is the largest resident set of any one run (os.wait4).
`--keep` adds this command's runs to those already in OUT/results.json (a rerun of the same
network, budget and seed replaces the old one), so a longer budget costs only its own runs.

    python benchmarks/fast_training.py --epochs 2 4 --versus "data.augment=[crop, flip_alternate]"

`--versus SETTING` (repeatable) measures a change to the recipe: each (network, budget, seed) runs
as the recipe has it and then with the setting, back to back, so both meet the same machine; the
table (a section of its own, named after the change) gives both and the difference of the means.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import SHARED_CIFAR10, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (74.1, 85.0, 90.0, 90.7)  # report 000; issue 11's targets (90.7 = airbench94_muon on this copy)


def train_once(model: str, epochs: int, seed: int, out: Path, data: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "cnnlab", "train", "--data", str(data), "--model", model, "--epochs", str(epochs),
           "--seed", str(seed), "--out", str(out), "--no-progress", "--set", "data.val_fraction=0.02", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    run = Path(output.strip().splitlines()[-1].removeprefix("run: "))
    s = json.loads((run / "summary.json").read_text())
    return {"model": model, "epochs": epochs, "seed": seed, "accuracy": 100 * s["test"]["accuracy"],
            "train_seconds": s["time"]["train_seconds"], "wall_seconds": wall,
            "peak_mb": usage.ru_maxrss / 1024, "run": run.name}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_CIFAR10))
    ap.add_argument("--models", nargs="+", default=["fastnet"])
    ap.add_argument("--epochs", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "fast"))
    ap.add_argument("--keep", action="store_true", help="add to the runs already in OUT/results.json")
    ap.add_argument("--versus", action="append", default=[], help="a --set to compare with the recipe, run by run")
    args = ap.parse_args()
    os.environ.setdefault("CNNLAB_CACHE", str(Path(tempfile.gettempdir()) / "cnnlab-bench-cache"))
    change = " ".join(args.versus)
    saved = Path(args.out) / (f"versus-{hashlib.sha256(change.encode()).hexdigest()[:12]}.json" if args.versus
                              else "results.json")
    results = json.loads(saved.read_text()) if args.keep and saved.exists() else []
    if any(r.get("set", []) != args.set or r.get("versus", []) != args.versus for r in results):
        raise SystemExit(f"{saved} holds runs made with other --set or --versus options; rerun without --keep")
    variants = {"recipe": args.set} | ({"versus": args.set + args.versus} if args.versus else {})
    for model in args.models:
        for epochs in args.epochs:
            for seed in args.seeds:
                for variant, sets in variants.items():
                    extra = [a for s in sets for a in ("--set", s)]
                    r = train_once(model, epochs, seed, Path(args.out), Path(args.data), extra) | {
                        "set": args.set, "versus": args.versus, "variant": variant}
                    print(json.dumps(r), flush=True)
                    results = [o for o in results if (o["model"], o["epochs"], o["seed"], o.get("variant", "recipe"))
                               != (model, epochs, seed, variant)]
                    results.append(r)
                    saved.write_text(json.dumps(results, indent=1))  # after each run: a stopped benchmark keeps them
    if args.versus:
        update_section(f"fast_training versus {change}", versus_table(results, args.versus))
        return

    lines = ["| network | epochs | test accuracy, mean ± std (min-max) | training time, mean | whole command, mean "
             "| peak memory |", "|---|---|---|---|---|---|"]
    budgets = {}
    models = list(dict.fromkeys(r["model"] for r in results))
    for model in models:
        for epochs in sorted({r["epochs"] for r in results if r["model"] == model}):
            rs = [r for r in results if r["model"] == model and r["epochs"] == epochs]
            acc = [r["accuracy"] for r in rs]
            mean_acc = statistics.mean(acc)
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            t = statistics.mean(r["train_seconds"] for r in rs)
            budgets.setdefault(model, []).append((epochs, mean_acc, t))
            lines.append(f"| {model} | {epochs} | {mean_acc:.2f} ± {sd:.2f}% ({min(acc):.2f}-{max(acc):.2f}, "
                         f"{len(acc)} seeds) | {t:.0f} s | {statistics.mean(r['wall_seconds'] for r in rs):.0f} s | "
                         f"{max(r['peak_mb'] for r in rs):,.0f} MB |")
    lines += ["", "| target | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for target in TARGETS:
        cells = []
        for model in models:
            hit = next(((e, a, t) for e, a, t in budgets[model] if a >= target), None)
            cells.append(f"{hit[2]:.0f} s ({hit[0]} epochs, {hit[1]:.2f}%)" if hit else "not reached")
        lines.append(f"| {target}% | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in results})
    lines += ["", f"Seeds {', '.join(map(str, seeds))}; 49,000 training images, "
              "1,000 validation, the 10,000 test images. Training time is the loop's (training steps plus "
              "validation each epoch); the whole command adds loading the decoded-image cache, evaluation on "
              "the test split with flip TTA, plots and the report."]
    body = "\n".join(lines)
    print(body)
    update_section("fast_training", body)


def versus_table(results: list[dict], versus: list[str]) -> str:
    """The recipe and the recipe with `versus`, per network and budget: means over the seeds both ran."""
    lines = ["| network | epochs | seeds | recipe: test accuracy | with the change | difference (points) "
             "| training s, recipe / with | outside training s, recipe / with |", "|---|---|---|---|---|---|---|---|"]
    for model, epochs in dict.fromkeys((r["model"], r["epochs"]) for r in results):
        pairs = {}
        for r in results:
            if (r["model"], r["epochs"]) == (model, epochs):
                pairs.setdefault(r["seed"], {})[r.get("variant", "recipe")] = r
        pairs = [p for p in pairs.values() if len(p) == 2]
        if not pairs:
            continue

        def mean(variant, key):
            return statistics.mean(p[variant][key] for p in pairs)

        def spread(variant):
            return statistics.stdev(p[variant]["accuracy"] for p in pairs) if len(pairs) > 1 else 0.0

        def outside(variant):
            return statistics.mean(p[variant]["wall_seconds"] - p[variant]["train_seconds"] for p in pairs)

        a, b = mean("recipe", "accuracy"), mean("versus", "accuracy")
        lines.append(f"| {model} | {epochs} | {len(pairs)} | {a:.2f} ± {spread('recipe'):.2f}% | "
                     f"{b:.2f} ± {spread('versus'):.2f}% | {b - a:+.2f} | {mean('recipe', 'train_seconds'):.0f} / "
                     f"{mean('versus', 'train_seconds'):.0f} | {outside('recipe'):.1f} / {outside('versus'):.1f} |")
    change = shlex.join(a for v in versus for a in ("--set", v))
    return "\n".join(lines + ["", f"The change: `{change}`, run after the recipe for each "
                                  "seed. 49,000 training images, 1,000 validation, the 10,000 test images; "
                                  "outside training = the whole command's wall time less the loop's."])


if __name__ == "__main__":
    main()
