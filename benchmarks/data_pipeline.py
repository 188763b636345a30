"""Data pipeline benchmark: build the CIFAR-10 tensor cache, load it again, batched augmentation.

    python benchmarks/data_pipeline.py [--data ../shared/data/cifar10]

Uses a fresh temporary cache so the build is measured from the JPEG files; records peak memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import SHARED_CIFAR10, update_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_CIFAR10))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    os.environ["CNNLAB_CACHE"] = tempfile.mkdtemp(prefix="cnnlab-bench-")
    import torch

    from cnnlab.data.augment import augment_batch, to_model_input
    from cnnlab.data.loaders import cached_arrays
    from cnnlab.data.sources import scan_folder
    from cnnlab.data.splits import make_split

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    scan = scan_folder(Path(args.data))
    split = make_split(scan, val_fraction=0.1, seed=0)
    t_split = time.perf_counter() - t0
    rows = list(split.rows)
    t0 = time.perf_counter()
    x, errors = cached_arrays(scan.root, rows, 32, args.workers, log=lambda m: None)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    x2, _ = cached_arrays(scan.root, rows, 32, args.workers, log=lambda m: None)
    t_load = time.perf_counter() - t0
    assert (x == x2).all() and not any(errors)
    xt = torch.from_numpy(x)
    g = torch.Generator().manual_seed(0)
    batch = 512
    n_aug = 0
    t0 = time.perf_counter()
    for i in range(0, 50_000, batch):
        xb = to_model_input(xt[i:i + batch], (0.5,) * 3, (0.25,) * 3)
        augment_batch(xb, ("crop", "flip"), 4, g)
        n_aug += len(xb)
    t_aug = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    body = f"""
| step | result |
|---|---|
| scan + hash + stratified split of {len(rows):,} files | {t_split:.1f} s |
| decode all {len(rows):,} JPEGs into the uint8 cache ({args.workers} processes) | {t_build:.1f} s ({len(rows) / t_build:,.0f} images/s) |
| load the cache again | {t_load:.2f} s |
| batched augmentation (uint8 -> normalised float, random crop pad 4 + flip, batch {batch}) | {n_aug / t_aug:,.0f} images/s |
| peak resident memory of this process | {peak_mb:,.0f} MB |

The cache holds {x.nbytes / 2**20:.0f} MB of pixels (N x 3 x 32 x 32 uint8).
"""
    print(body)
    update_section("data_pipeline", body)


if __name__ == "__main__":
    main()
