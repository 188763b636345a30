"""Translate test-time augmentation on top of the built-in flip TTA: accuracy gained, time paid.

    python benchmarks/tta.py [--runs RUN ...]

FastNet's eval mode averages an image and its mirror (2 forward passes). The fast-CIFAR recipes
also average shifted copies. On trained fastnet runs (RUN..., or the one benchmarks/stem_precision.py
trains and reuses), over the whole CIFAR-10 test split in fp32 as served, this compares:
- flip: the model's own eval forward (2 passes);
- flip + 2 shifts, 4 passes: half the flip average, plus a quarter each of the image shifted by one
  pixel up-left and of the mirror of the image shifted one pixel down-right (edges reflected);
- flip + 2 shifts mirrored, 6 passes: as above with each shifted copy also mirrored.
A shift costs forward passes in every validation pass of training, every evaluation and every
served request; the table gives the rate of each variant so the gain can be set against it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from results import SHARED_CIFAR10, update_section  # noqa: E402
from stem_precision import default_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH = 500


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`x` moved by (dy, dx) pixels (at most 1), the edge it uncovers reflected."""
    h, w = x.shape[2:]
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    return padded[:, :, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]


def variants(one, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of each TTA variant; `one` is a single forward pass."""
    flip = 0.5 * (one(x) + one(x.flip(3)))
    up_left, down_right = shifted(x, -1, -1), shifted(x, 1, 1)
    four = 0.5 * flip + 0.25 * (one(up_left) + one(down_right.flip(3)))
    six = 0.5 * flip + 0.25 * (0.5 * (one(up_left) + one(up_left.flip(3)))
                               + 0.5 * (one(down_right) + one(down_right.flip(3))))
    return {"flip (2 passes)": flip, "flip + 2 shifts (4 passes)": four, "flip + 2 shifts mirrored (6 passes)": six}


def rate(one, x: torch.Tensor, passes: int) -> float:
    """Images per second of `passes` forward passes per image, over the first 2,000 images."""
    x = x[:2000]
    start = time.perf_counter()
    for i in range(0, len(x), BATCH):
        for _ in range(passes):
            one(x[i:i + BATCH])
    return len(x) / (time.perf_counter() - start)


@torch.no_grad()
def main() -> None:
    from cnnlab.data.augment import to_model_input
    from cnnlab.evaluate.predict import Predictor

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=Path, nargs="+", help="trained fastnet run folders (default: one trained here)")
    args = ap.parse_args()
    runs = args.runs or [default_run()]
    files = sorted((SHARED_CIFAR10 / "test").glob("*/*"))
    pixels = None
    rows, gains = [], {}
    for run in runs:
        predictor = Predictor.load(run, "torch")
        model = predictor.model.eval()
        if pixels is None:
            pixels = torch.from_numpy(np.stack([predictor.decode(f.read_bytes()) for f in files]))
        x = to_model_input(pixels, predictor.mean, predictor.std)
        targets = torch.tensor([predictor.classes_.index(f.parent.name) for f in files])
        model.tta = False  # one pass; the variants below add the mirror themselves

        def one(v):  # channels-last, as cnnlab's predictor feeds the model
            return model(v.contiguous(memory_format=torch.channels_last))

        parts = [variants(one, x[i:i + BATCH]) for i in range(0, len(x), BATCH)]
        model.tta = True
        assert torch.allclose(parts[0]["flip (2 passes)"], model(x[:BATCH]), atol=1e-5)  # the model's own TTA
        model.tta = False
        accuracy = {k: (torch.cat([p[k] for p in parts]).argmax(1) == targets).double().mean().item() * 100
                    for k in parts[0]}
        speed = {k: rate(one, x, passes) for k, passes in zip(accuracy, (2, 4, 6))}
        base = accuracy["flip (2 passes)"]
        for k in accuracy:
            gains.setdefault(k, []).append(accuracy[k] - base)
        name = run.relative_to(ROOT) if run.is_relative_to(ROOT) else run
        rows.append(f"| `{name}` | " + " | ".join(f"{accuracy[k]:.2f}% ({speed[k]:,.0f} img/s)" for k in accuracy)
                    + " |")
        print(rows[-1], flush=True)
    keys = list(gains)
    spread = [f"{statistics.mean(g):+.2f}" + (f" ± {statistics.stdev(g):.2f}" if len(g) > 1 else "")
              for g in gains.values()]
    body = [f"The {len(files):,} CIFAR-10 test images, fp32, batch {BATCH}; test accuracy and the rate of each "
            "variant's forward passes on this machine.",
            "",
            "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys), *rows,
            f"| gain over flip, mean{' ± sd' if len(runs) > 1 else ''} of {len(runs)} runs | "
            + " | ".join(f"{s} points" for s in spread) + " |"]
    print("\n".join(body))
    update_section("tta", "\n".join(body))


if __name__ == "__main__":
    main()
