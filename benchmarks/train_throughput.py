"""Training and evaluation throughput: cnnlab's loop against a plain ImageFolder + DataLoader loop.

    python benchmarks/train_throughput.py [--models fastnet fastnet_m fastnet_l report000_cnn]
                                          [--precisions fp32 bf16] [--batch 256] [--epoch]

For each network and precision, in one process and one after the other: the plain loop a user
writes (torchvision ImageFolder, ToTensor + Normalize, DataLoader with 2 workers, no
augmentation), then cnnlab's path (uint8 tensor cache, batched crop+flip, channels_last) with the
same network, batch and optimizer; training steps and then evaluation batches (eval mode, no
grad; FastNet's flip TTA included on both sides), each timed over `--steps` batches or
`--seconds`, whichever ends first, after warm-up. bf16 is `torch.autocast("cpu", bfloat16)` on
both sides. The machine's matmul rates are measured here with torch.mm in fp32 and bf16, and the
FLOPs per training image counted with torch's FlopCounterMode. `--epoch` adds one whole cnnlab
epoch through `fit` (training, validation, history and checkpoint) per network, in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from results import SHARED_CIFAR10, update_section  # noqa: E402
from torch import nn  # noqa: E402


def matmul_gflops(dtype=torch.float32, max_n: int = 2048, seconds: float = 5.0) -> float:
    """The machine's peak as torch.mm sees it: the best of rounds within `seconds` (noise only slows).

    The size grows to `max_n` only while one product stays short: emulated bf16 (CPUs without
    AVX512-BF16 or AMX) takes most of a minute for one 2048 x 2048 product.
    """
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t0 = time.perf_counter()
        a @ b
        if n >= max_n or time.perf_counter() - t0 > 0.2:
            break
        n *= 2
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def train_flops_per_image(model: nn.Module, size: int = 32, batch: int = 16) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, 3, size, size)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    model.zero_grad()
    return fc.get_total_flops() / batch


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def timed(batches, step, steps: int, seconds: float, warmup: int = 2) -> float:
    """Images/s over `steps` calls of step(x, y) after `warmup`, stopping early after `seconds`."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it)[:2])
    n, t0 = 0, time.perf_counter()
    for _ in range(steps):
        x, y = next(it)[:2]
        step(x, y)
        n += len(y)
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def train_step(model, opt, precision):
    crit = nn.CrossEntropyLoss()
    model.train()

    def step(x, y):
        with _autocast(precision):
            loss = crit(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    return step


def eval_step(model, precision):
    model.eval()

    @torch.no_grad()
    def step(x, y):
        with _autocast(precision):
            model(x).float().argmax(1).tolist()

    return step


def plain_loader(root: Path, folder: str, batch: int, shuffle: bool):
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    ds = torchvision.datasets.ImageFolder(str(root / folder), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=2, persistent_workers=True)


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
    ap.add_argument("--models", nargs="+", default=["fastnet", "fastnet_m", "fastnet_l", "report000_cnn"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60, help="timed batches per measurement at most")
    ap.add_argument("--seconds", type=float, default=15.0, help="time per measurement at most")
    ap.add_argument("--epoch", action="store_true", help="also time one whole cnnlab epoch per network (fp32)")
    ap.add_argument("--batch-sizes", nargs="*", type=int, default=[64, 128, 256, 512, 1024],
                    help="cnnlab training rate of the first network (fp32) at each of these batch sizes")
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
    loaders = make_loaders(root, split, 32, args.batch, args.batch, augment=("crop", "flip"), log=lambda m: None)
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    threads = torch.get_num_threads()
    print(f"matmul: fp32 {peaks['fp32']:.3g}, bf16 {peaks['bf16']:.3g} GFLOP/s on {threads} threads")
    plain_train = forever(plain_loader(root, "train", args.batch, True))
    plain_eval = forever(plain_loader(root, "test", args.batch, False))
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        flops = train_flops_per_image(create_model(name, 10))
        for precision in args.precisions:
            rates = {}
            sides = {"plain": (plain_train, plain_eval), "cnnlab": (forever(loaders.train), forever(loaders.test))}
            for side, (train_batches, eval_batches) in sides.items():
                torch.manual_seed(0)
                m = create_model(name, 10)
                if side == "cnnlab":
                    m = m.to(memory_format=torch.channels_last)
                opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-3)
                rates[side] = (timed(train_batches, train_step(m, opt, precision), args.steps, args.seconds),
                               timed(eval_batches, eval_step(m, precision), args.steps, args.seconds))
            rows.append((name, precision, flops / 1e9, rates["plain"], rates["cnnlab"],
                         rates["cnnlab"][0] * flops / 1e9 / peaks[precision]))
            print(rows[-1], flush=True)
    lines = [f"Matmul rates measured in this run (torch.mm, square, up to 2048, {threads} threads): "
             f"**fp32 {peaks['fp32']:.3g} GFLOP/s, bf16 {peaks['bf16']:.3g} GFLOP/s**. Batch {args.batch}, Adam; "
             f"each rate over at most {args.steps} batches or {args.seconds:.0f} s after 2 warm-up batches.", "",
             "| network | precision | GFLOP / training image | train: plain loop | train: cnnlab | cnnlab / plain "
             "| cnnlab share of the matmul rate | eval: plain loop | eval: cnnlab | cnnlab / plain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, precision, gf, (pt, pe), (ot, oe), share in rows:
        lines.append(f"| {name} | {precision} | {gf:.3f} | {pt:,.0f} img/s | {ot:,.0f} img/s | {ot / pt:.2f}x | "
                     f"{share:.0%} | {pe:,.0f} img/s | {oe:,.0f} img/s | {oe / pe:.2f}x |")
    if args.batch_sizes:
        name = args.models[0]
        lines += ["", f"Batch size, {name}, cnnlab's rates (the recipe's batch and the evaluation batch, "
                  "train.eval_batch_size, are chosen from this):", "",
                  "| batch | " + " | ".join(map(str, args.batch_sizes)) + " |",
                  "|---|" + "---|" * len(args.batch_sizes)]
        cells: dict[str, list[str]] = {}
        for bs in args.batch_sizes:
            ld = make_loaders(root, split, 32, bs, bs, augment=("crop", "flip"), log=lambda m: None)
            torch.manual_seed(0)
            m = create_model(name, 10).to(memory_format=torch.channels_last)
            opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], 0.1, momentum=0.9, nesterov=True)
            steps = max(6, args.steps * 256 // bs)
            cells.setdefault("training, fp32", []).append(timed(forever(ld.train), train_step(m, opt, "fp32"), steps,
                                                                args.seconds))
            for precision in args.precisions:  # evaluation as the final test pass (fp32) and validation run it
                cells.setdefault(f"evaluation, {precision}", []).append(
                    timed(forever(ld.test), eval_step(m, precision), steps, args.seconds))
            print(bs, {k: round(v[-1]) for k, v in cells.items()}, flush=True)
        lines += [f"| {what} | " + " | ".join(f"{rate:,.0f} img/s" for rate in rates) + " |"
                  for what, rates in cells.items()]
    if args.epoch:
        lines += ["", "| network | one whole cnnlab epoch, fp32 (45,000 training + 5,000 validation images, "
                  "checkpoint) |", "|---|---|"]
        for name in args.models:
            with tempfile.TemporaryDirectory() as tmp:
                torch.manual_seed(0)
                res = fit(create_model(name, 10), loaders, TrainConfig(epochs=1, lr=1e-3, batch_size=args.batch),
                          Path(tmp), device=torch.device("cpu"), precision="fp32", log=lambda m: None, progress=False)
            lines.append(f"| {name} | {res.history[0]['seconds']:.1f} s |")
    lines += ["", "The plain loop decodes JPEGs per sample in 2 DataLoader workers, which compete with training "
              "for the 2 cores; it does no augmentation, while cnnlab's training includes random crop + flip. "
              "FastNet networks evaluate with flip TTA (two passes) on both sides."]
    body = "\n".join(lines)
    print(body)
    update_section("train_throughput", body)


if __name__ == "__main__":
    main()
