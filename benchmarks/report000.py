"""Report 000's network and recipe on the CIFAR-10 JPEG copy, next to the report's own numbers.

    python benchmarks/report000.py [--lrs 2.5e-4 0.1] [--epochs 20] [--set train.patience=5]
    python benchmarks/report000.py --lrs 0.1 --runs RUN_FOLDER...   # add finished runs to the table

Trains `configs/report000.yaml` (Adam, batch 64, 20 epochs, crop+flip, best epoch by validation
accuracy) once per learning rate and writes the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import SHARED_CIFAR10, update_section  # noqa: E402

REPORT = {2.5e-4: 74.14, 1e-4: 61.56, 1e-3: 66.19, 1e-2: 21.49, 1e-1: 10.54}  # test accuracy, %
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lrs", nargs="*", type=float, help="learning rates to train (default 2.5e-4 without --runs)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--runs", nargs="*", default=[], help="finished run folders to add to the table")
    args = ap.parse_args()
    from cnnlab import api
    from cnnlab.core.config import load_config

    runs = [Path(r) for r in args.runs]
    lrs = args.lrs if args.lrs is not None else ([] if runs else [2.5e-4])
    for lr in lrs:
        cfg = load_config(ROOT / "configs" / "report000.yaml",
                          {"train": {"lr": lr, "epochs": args.epochs}, "out": args.out,
                           "data": {"path": str(SHARED_CIFAR10)}}, args.set)
        runs.append(api.train(cfg, progress=False))
    lines = ["| lr | report 000 test accuracy | cnnlab test accuracy | status | best epoch / epochs run | "
             "macro F1 | training time | s per epoch | run |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = json.loads((run / "summary.json").read_text())
        lr = s["train"]["lr"]
        acc = f"{100 * s['test']['accuracy']:.2f}%" if "test" in s else "-"
        f1 = f"{s['test']['f1_macro']:.4f}" if "test" in s else "-"
        epochs = s["time"]["epoch_seconds"]
        ref = REPORT.get(lr)
        lines.append(f"| {lr:g} | {f'{ref:.2f}%' if ref else '-'} | {acc} | {s['status']} | {s['best_epoch']} / "
                     f"{len(epochs)} | {f1} | {s['time']['train_seconds'] / 60:.1f} min | "
                     f"{sum(epochs) / max(1, len(epochs)):.0f} | `{run.name}` |")
    runs.sort(key=lambda r: json.loads((r / "summary.json").read_text())["train"]["lr"])
    report = api.report(runs, Path(args.out) / "report000-comparison", log=lambda m: None)
    lines += ["", "Test split: the 10,000 test images; validation: 5,000 images carved (stratified) from train. "
              "A `failed_to_learn` row is flagged and is not a result. The comparison report of these runs "
              f"(`cnnlab report`): `{report.relative_to(ROOT) if report.is_relative_to(ROOT) else report}/report.html`."]
    body = "\n".join(lines)
    print(body)
    update_section("report000", body)


if __name__ == "__main__":
    main()
