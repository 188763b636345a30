"""The whitening stem under bf16: how far its output and the model's answers move from fp32.

    python benchmarks/stem_precision.py [--run RUN]

FastNet's first layer whitens 2x2 patches with gains up to ~45 (models/fastnet.py), so it takes
differences of neighbouring pixels that bf16's 8-bit mantissa rounds coarsely (GPU-CHECKLIST item
10). On a trained fastnet run (RUN, or one this benchmark trains with the default recipe under
benchmarks/out/stem and reuses), over the whole CIFAR-10 test split: the stem's relative error per
output channel under bf16 autocast, and the model's top-1 agreement with fp32 and test accuracy
with the stem in bf16 (as it runs today) and kept in fp32. Inference only: what it does to training
is a separate A/B.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from results import SHARED_CIFAR10, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def logits(model, x: torch.Tensor, bf16: bool, stem_fp32: bool) -> torch.Tensor:
    """FastNet's eval forward (flip TTA), written out so that the stem's precision can differ."""
    def one(v):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and not stem_fp32):
            stem = model.whiten(v)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return (model.head(model.stages(nn.functional.gelu(stem)).amax((2, 3))) * model.logit_scale).float()

    return 0.5 * (one(x) + one(x.flip(3)))


def default_run() -> Path:
    """The fastnet run this benchmark trained with the default recipe, trained now if there is none yet."""
    out = ROOT / "benchmarks" / "out" / "stem"
    runs = sorted(p.parent for p in out.glob("*-fastnet/summary.json"))
    if runs:
        return runs[-1]
    proc = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--data", str(SHARED_CIFAR10), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT, check=True)
    return Path(proc.stdout.strip().splitlines()[-1].removeprefix("run: "))


@torch.no_grad()
def main() -> None:
    from cnnlab.data.augment import to_model_input
    from cnnlab.evaluate.predict import Predictor

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, help="a trained fastnet run folder (default: one trained here)")
    args = ap.parse_args()
    run = args.run or default_run()
    predictor = Predictor.load(run, "torch")
    model = predictor.model.eval()
    files = sorted((SHARED_CIFAR10 / "test").glob("*/*"))
    targets = torch.tensor([predictor.classes_.index(f.parent.name) for f in files])
    rows, answers = [], {}
    for start in range(0, len(files), 1000):
        part = files[start:start + 1000]
        x = to_model_input(torch.from_numpy(np.stack([predictor.decode(f.read_bytes()) for f in part])),
                           predictor.mean, predictor.std)
        if start == 0:  # the written-out forward is the model's own
            assert torch.allclose(logits(model, x, False, False), model(x), atol=1e-5)
            w32 = model.whiten(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                w16 = model.whiten(x).float()
            err = ((w16 - w32).pow(2).mean((0, 2, 3)) / w32.pow(2).mean((0, 2, 3))).sqrt()
        for key in ((False, False), (True, False), (True, True)):
            answers.setdefault(key, []).append(logits(model, x, *key))
    z = {key: torch.cat(parts) for key, parts in answers.items()}
    fp32 = z[(False, False)]
    for name, key in (("fp32", (False, False)), ("bf16, stem in bf16 (today)", (True, False)),
                      ("bf16, stem in fp32", (True, True))):
        agree = (z[key].argmax(1) == fp32.argmax(1)).double().mean().item()
        accuracy = (z[key].argmax(1) == targets).double().mean().item()
        drift = ((z[key] - fp32).pow(2).mean().sqrt() / fp32.pow(2).mean().sqrt()).item()
        rows.append(f"| {name} | {agree:.2%} | {accuracy:.2%} | {drift:.4f} |")
    body = [f"Run: `{run.relative_to(ROOT) if run.is_relative_to(ROOT) else run}` (fastnet), the {len(files):,} "
            "CIFAR-10 test images, flip TTA as served.",
            "",
            f"The stem's output under bf16 autocast, relative RMS error per output channel against fp32: "
            f"median {err.median():.4f}, largest {err.max():.4f} (of {len(err)} channels).",
            "",
            "| forward | top-1 agreement with fp32 | test accuracy | logits' relative RMS difference from fp32 |",
            "|---|---|---|---|", *rows]
    print("\n".join(body))
    update_section("stem_precision", "\n".join(body))


if __name__ == "__main__":
    main()
