"""Training throughput: cnnlab's loop against a plain ImageFolder + DataLoader loop, side by side.

    python benchmarks/train_throughput.py [--steps 200] [--models report000_cnn report003_cnn]

For each network, in one process and one after the other: the plain loop a user writes
(torchvision ImageFolder, ToTensor + Normalize, DataLoader with 2 workers, batch 64, Adam, no
augmentation), then cnnlab's loop (uint8 tensor cache, batched crop+flip, channels_last, the same
batch and optimizer) over the same number of steps after a warm-up. Also one whole cnnlab epoch
through `fit` (training, validation, history and checkpoint included), compared with the plain
loop's training-only time for the same 45,000 images. The machine's fp32 limit is measured here
with torch.mm, and the FLOPs per training image counted with torch's FlopCounterMode.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from results import SHARED_CIFAR10, update_section  # noqa: E402
from torch import nn  # noqa: E402

BATCH = 64


def matmul_gflops(n: int = 2048, reps: int = 5, rounds: int = 5) -> float:
    """The machine's fp32 peak as torch.mm sees it: the best of a few rounds (noise only slows)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def train_flops_per_image(model: nn.Module, size: int = 32) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(BATCH, 3, size, size)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    model.zero_grad()
    return fc.get_total_flops() / BATCH


def timed_steps(batches, model, opt, steps: int, warmup: int = 10) -> float:
    """Images/s over `steps` optimizer steps after `warmup` steps (data loading included)."""
    crit = nn.CrossEntropyLoss()
    model.train()
    it = iter(batches)
    n, t0 = 0, None
    for k in range(warmup + steps):
        if k == warmup:
            t0, n = time.perf_counter(), 0
        x, y = next(it)[:2]
        loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
        n += len(y)
    return n / (time.perf_counter() - t0)


def plain_loader(root: Path):
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    ds = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)


def forever(loader):
    epoch = 0
    while True:
        epoch += 1
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_CIFAR10))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--models", nargs="+", default=["report000_cnn", "report003_cnn"])
    ap.add_argument("--no-epoch", action="store_true", help="skip the whole-epoch comparison")
    args = ap.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("CNNLAB_CACHE", str(Path(tempfile.gettempdir()) / "cnnlab-bench-cache"))

    from cnnlab.core.config import TrainConfig
    from cnnlab.data.loaders import make_loaders
    from cnnlab.data.sources import scan_folder
    from cnnlab.data.splits import make_split
    from cnnlab.models import create_model
    from cnnlab.train.loop import fit

    root = Path(args.data)
    split = make_split(scan_folder(root), val_fraction=0.1, seed=0)
    loaders = make_loaders(root, split, 32, BATCH, 512, augment=("crop", "flip"), log=lambda m: None)
    peak = matmul_gflops()
    print(f"fp32 matmul: {peak:.0f} GFLOP/s on {torch.get_num_threads()} threads")
    plain = plain_loader(root)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        flops = train_flops_per_image(create_model(name, 10))
        limit = peak * 1e9 / flops
        torch.manual_seed(0)
        m = create_model(name, 10)
        plain_ips = timed_steps(forever(plain), m, torch.optim.Adam(m.parameters(), 2.5e-4), args.steps)
        torch.manual_seed(0)
        m = create_model(name, 10).to(memory_format=torch.channels_last)
        ours_ips = timed_steps(forever(loaders.train), m, torch.optim.Adam(m.parameters(), 2.5e-4), args.steps)
        epoch_s = plain_epoch_s = None
        if not args.no_epoch:
            with tempfile.TemporaryDirectory() as tmp:
                torch.manual_seed(0)
                m = create_model(name, 10)
                res = fit(m, loaders, TrainConfig(epochs=1, lr=2.5e-4, batch_size=BATCH), Path(tmp),
                          device=torch.device("cpu"), precision="fp32", log=lambda m: None, progress=False)
                epoch_s = res.history[0]["seconds"]
            plain_epoch_s = len(split.of("train")) / plain_ips
        rows.append((name, flops / 1e9, limit, plain_ips, ours_ips, epoch_s, plain_epoch_s))
        print(rows[-1])
    lines = [f"fp32 matmul limit measured in this run: **{peak:.0f} GFLOP/s** (torch.mm 2048x2048, 2 threads). "
             f"{args.steps} timed steps of batch {BATCH} after 10 warm-up steps, Adam.", "",
             "| network | GFLOP / training image | limit (images/s) | plain ImageFolder loop | cnnlab loop | "
             "cnnlab / plain | cnnlab share of limit | cnnlab whole epoch (train+val+checkpoint) | plain, training only |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, gf, limit, p, o, e, pe in rows:
        ep = f"{e:.1f} s" if e else "-"
        pep = f"{pe:.1f} s (extrapolated from its rate)" if pe else "-"
        lines.append(f"| {name} | {gf:.3f} | {limit:,.0f} | {p:,.0f} img/s | {o:,.0f} img/s | {o / p:.2f}x | "
                     f"{o / limit:.0%} | {ep} | {pep} |")
    lines += ["", "The plain loop decodes JPEGs per sample in 2 DataLoader workers, which compete with training "
              "for the 2 cores; it does no augmentation, while cnnlab's loop includes random crop + flip."]
    body = "\n".join(lines)
    print(body)
    update_section("train_throughput", body)


if __name__ == "__main__":
    main()
