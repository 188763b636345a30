"""Time to accuracy beside the published peer: airbench94 (PyPI `airbench==0.1.8`) and cnnlab's default recipe.

    python benchmarks/peer_airbench.py [--seeds 0 1 2] [--epochs E]

Both train on the shared CIFAR-10 JPEG copy, decoded once by cnnlab's one decoder (the same pixels for
both), in fp32, on this machine's cores, one after the other for each seed. Without `--epochs` each runs
its own length (airbench94 9.9 epochs, cnnlab's default recipe 10); with it, both run E epochs.

The peer is installed `--no-deps` into benchmarks/out/peer/site (never a cnnlab dependency) and runs in
its own process with its CUDA-only calls mapped onto the CPU at run time: `.cuda()` is the identity,
`.half()` is fp32 (the published recipe trains in fp16 on a GPU; under CPU bf16 autocast it stalls,
issue 21, so the comparison is in fp32), CUDA events are a wall clock, `synchronize` does nothing.
Its code is not copied or changed. Each side is timed the same way: training (airbench's whole `train94`
call: loading its packed tensors, the network, the whitening initialisation and every step; cnnlab's
summary.json `time.train_seconds`), and the wall time of the whole process (imports, data, training,
test-time-augmented evaluation; cnnlab's report too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import SHARED_CIFAR10, mean_sd, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "out" / "peer"
PEER = "airbench==0.1.8"


def install_peer() -> Path:
    site = WORK / "site"
    if not (site / "airbench" / "__init__.py").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), PEER],
                       check=True)
    return site


def pack_data() -> Path:
    """cifar10/train.pt and test.pt as airbench's loader reads them (uint8 N x 32 x 32 x 3, labels, classes)."""
    import numpy as np
    import torch

    from cnnlab.data.decode import load_array

    folder = WORK / "cifar10"
    if (folder / "test.pt").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    classes = sorted(p.name for p in (SHARED_CIFAR10 / "train").iterdir())  # CIFAR-10's own order
    for split in ("train", "test"):
        images, labels = [], []
        for k, name in enumerate(classes):
            for path in sorted((SHARED_CIFAR10 / split / name).iterdir()):
                images.append(load_array(path, 32, 1.0).transpose(1, 2, 0))
                labels.append(k)
        torch.save({"images": torch.from_numpy(np.stack(images)), "labels": torch.tensor(labels), "classes": classes},
                   folder / f"{split}.pt")
    return folder


class _WallClockEvent:
    """torch.cuda.Event's timing calls on the CPU: record() takes the time, elapsed_time() says ms since."""

    def __init__(self, enable_timing: bool = True):
        self.t = 0.0

    def record(self, *_):
        self.t = time.perf_counter()

    def elapsed_time(self, end) -> float:
        return 1000 * (end.t - self.t)


def peer_run(seed: int, epochs: int | None) -> dict:
    """One airbench94 training in this process (started by `main` as a child), with CUDA mapped to the CPU."""
    import torch

    start = time.perf_counter()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.half = lambda self, *a, **k: self.float()
    torch.nn.Module.half = lambda self: self.float()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Event = _WallClockEvent
    sys.path.insert(0, str(install_peer()))
    import airbench
    from airbench import lib_airbench94, utils

    defaults = list(utils.CifarLoader.__init__.__defaults__)
    defaults[-1] = "cpu"  # the `gpu` argument, read as torch.load's map_location
    utils.CifarLoader.__init__.__defaults__ = tuple(defaults)
    os.chdir(pack_data().parent)  # airbench opens 'cifar10/test.pt' relative to the working folder
    torch.manual_seed(seed)
    length = epochs if epochs is not None else lib_airbench94.hyp["opt"]["train_epochs"]
    trained = time.perf_counter()
    model = airbench.train94(epochs=length, verbose=False)
    train_seconds = time.perf_counter() - trained
    test = utils.CifarLoader("cifar10", train=False, batch_size=2000)
    accuracy = utils.evaluate(model, test, tta_level=lib_airbench94.hyp["net"]["tta_level"])
    return {"accuracy": accuracy, "train_seconds": train_seconds, "epochs": length,
            "wall_seconds": time.perf_counter() - start}


def _child(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out, time.perf_counter() - start


def cnnlab_run(seed: int, epochs: int | None) -> dict:
    runs = WORK / "runs" / f"seed{seed}"
    length = ["--epochs", str(epochs)] if epochs is not None else []
    out, wall = _child(["-m", "cnnlab", "train", "--data", str(SHARED_CIFAR10), "--precision", "fp32", "--seed",
                        str(seed), *length, "--out", str(runs), "--no-progress"])
    run = Path(out.stdout.strip().splitlines()[-1].split("run: ", 1)[1])
    s = json.loads((run / "summary.json").read_text())
    return {"accuracy": s["test"]["accuracy"], "train_seconds": s["time"]["train_seconds"],
            "epochs": len(s["time"]["epoch_seconds"]), "wall_seconds": wall,
            "decoded": "into the cache" in (run / "log.txt").read_text()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, help="both recipes' length in whole epochs (default: each its own)")
    ap.add_argument("--peer-run", type=int, metavar="SEED", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.peer_run is not None:
        print(json.dumps(peer_run(args.peer_run, args.epochs)))
        return
    install_peer()
    pack_data()
    from results import matmul_rates

    args.fp32_rate = matmul_rates(dtypes=("float32",))["float32"]  # this machine's state: the same kind has run at 150-440 GFLOP/s
    results: dict[str, list[dict]] = {"airbench94 (airbench==0.1.8, fp32)": [], "cnnlab default recipe (fastnet, fp32)": []}
    length = [] if args.epochs is None else ["--epochs", str(args.epochs)]
    for seed in args.seeds:  # the section is rewritten after each seed: a long run cut short keeps what it measured
        out, wall = _child([__file__, "--peer-run", str(seed), *length])
        peer = json.loads(out.stdout.strip().splitlines()[-1])
        results["airbench94 (airbench==0.1.8, fp32)"].append({**peer, "wall_seconds": wall})
        results["cnnlab default recipe (fastnet, fp32)"].append(cnnlab_run(seed, args.epochs))
        print(seed, json.dumps({k: v[-1] for k, v in results.items()}), flush=True)
        update_section("peer_airbench", _body(results, args))


def _body(results: dict[str, list[dict]], args) -> str:
    rows = ["| recipe | epochs | test accuracy % | training s | wall s (whole process) |", "|---|---|---|---|---|"]
    for name, rs in results.items():
        rows.append(f"| {name} | {rs[0]['epochs']:g} | {mean_sd([100 * r['accuracy'] for r in rs], 2)} | "
                    f"{mean_sd([r['train_seconds'] for r in rs], 1)} | {mean_sd([r['wall_seconds'] for r in rs], 1)} |")
    peer, mine = results.values()
    done = args.seeds[:len(mine)]
    ratio = statistics.mean(r["train_seconds"] for r in mine) / statistics.mean(r["train_seconds"] for r in peer)
    gap = 100 * (statistics.mean(r["accuracy"] for r in mine) - statistics.mean(r["accuracy"] for r in peer))
    body = [f"Shared CIFAR-10 JPEG copy (50,000 train / 10,000 test; cnnlab holds its validation split out of the "
            f"50,000), fp32, seeds {', '.join(map(str, done))} ({len(done)} of the {len(args.seeds)} asked for), mean "
            "± standard deviation; both with their test-time augmentation; one after the other per seed. fp32 "
            f"matmul (2048 x 2048) just before: {args.fp32_rate:.0f} GFLOP/s.", "", *rows, "",
            f"cnnlab's training time is {ratio:.2f}x airbench94's, at {gap:+.2f} points of test accuracy."]
    if args.epochs is not None:
        body.append(f"Both cut to {args.epochs} epoch(s): not the recipes' own lengths, so not their final accuracy.")
    if any(r["decoded"] for r in mine):
        body.append("cnnlab's first run decoded the JPEG files into its cache (in its wall time); airbench's packed "
                    "tensors were made before its runs, outside their time.")
    return "\n".join(body)


if __name__ == "__main__":
    main()
