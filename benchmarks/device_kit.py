"""What a GPU session needs that the device machine lacks, packed into `.device/` (git-ignored), and
unpacked there.

    python benchmarks/device_kit.py pack [--per-class N]   # here; then name .device in the device tool's carry
    python benchmarks/device_kit.py unpack DEST            # there: the image folders again, under DEST

The device machine has no ../shared and nothing can be fetched there; a call carries at most
64 MiB. CIFAR-10's 60,000 JPEG files (53 MiB of bytes) fit best as one file of their bytes
with a gzipped index of names and offsets (a zip or tar adds 6-30 MB of headers). The device
image has PyTorch, torchvision, timm, scikit-learn, ONNX Runtime and the rest of cnnlab's needs
but torchcam, whose wheel (pure Python) is fetched here with pip. Used by benchmarks/gpu_session.py.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import SHARED_CIFAR10  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".device"
WHEELS = ["torchcam==0.5.0"]  # what the device image lacks (its package list: .library/device/KINDS.md)
LIMIT = 62 * 2**20  # of the 64 MiB a call carries, what the kit may take beside the working tree


def pack(per_class: int) -> None:
    files = sorted(p for p in SHARED_CIFAR10.rglob("*.jpg"))
    if per_class:  # the first N of each split's class folder
        seen: collections.Counter = collections.Counter()
        kept = []
        for p in files:
            seen[p.parent] += 1
            if seen[p.parent] <= per_class:
                kept.append(p)
        files = kept
    KIT.mkdir(exist_ok=True)
    index, offset = [], 0
    with open(KIT / "cifar10.bin", "wb") as out:
        for p in files:
            data = p.read_bytes()
            out.write(data)
            index.append([p.relative_to(SHARED_CIFAR10).as_posix(), offset, len(data)])
            offset += len(data)
    (KIT / "cifar10.json.gz").write_bytes(gzip.compress(json.dumps(index).encode()))
    wheels = KIT / "wheels"
    wheels.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d",
                    str(wheels), *WHEELS], check=True)
    size = sum(f.stat().st_size for f in KIT.rglob("*") if f.is_file())
    print(f"{KIT}: {len(files):,} images ({offset / 2**20:.1f} MiB), {len(list(wheels.iterdir()))} wheel(s); "
          f"{size / 2**20:.1f} MiB in all")
    if size > LIMIT:
        raise SystemExit(f"the kit is {size / 2**20:.1f} MiB, over the {LIMIT / 2**20:.0f} MiB a device call can carry "
                         "beside the working tree: pack fewer images with --per-class")


def unpack(dest: Path) -> None:
    index = json.loads(gzip.decompress((KIT / "cifar10.json.gz").read_bytes()))
    with open(KIT / "cifar10.bin", "rb") as f:
        blob = f.read()
    for name, offset, length in index:
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob[offset:offset + length])
    print(f"{dest}: {len(index):,} images")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--per-class", type=int, default=0, help="images per class and split (default: all)")
    u = sub.add_parser("unpack")
    u.add_argument("dest", type=Path)
    args = ap.parse_args()
    pack(args.per_class) if args.command == "pack" else unpack(args.dest)


if __name__ == "__main__":
    main()
