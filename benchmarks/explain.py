"""Class-activation maps: seconds per image on this CPU, and how well the maps localise.

    python benchmarks/explain.py [--repeats 15] [--per-class 300]

Time: for the first report's network (report000_cnn, 32 px), fastnet (32 px) and EfficientNet-Lite0
(224 px), the median time of one image's map (a forward and a backward pass, with flip TTA both
views), of the map drawn as the PNG that `POST /explain` answers, and of a 12-image gallery per
image, each beside the same network's plain batch-1 inference measured in the same run.
Localisation: fastnet trained (fp32, 8 epochs) on the coloured-square set of tests/squares.py
(32 px, the square 14 px, 19% of the image; the class is its colour): per method, the mean share
of the map's mass inside the square, the share of images whose map holds more than twice the
square's area share, and how often the map's peak is inside; and the same architecture with
random weights (Adebayo et al. 2018), whose maps should not localise, with its Spearman rank
correlation to the trained model's maps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from results import update_section  # noqa: E402
from squares import mass_inside, write_squares  # noqa: E402

from cnnlab.evaluate.explain import METHODS, class_maps, display_side, explain_arrays, overlay, png_bytes  # noqa: E402
from cnnlab.models import create_model  # noqa: E402

NETWORKS = [("report000_cnn", 32), ("fastnet", 32), ("efficientnet_lite0", 224)]


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: kernels chosen, the default layer found
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing(repeats: int) -> list[str]:
    rows = ["| network | input px | layer | inference b=1 ms | map ms | map + PNG ms | map / inference | "
            "gallery ms per image (12 images) |", "|---|---|---|---|---|---|---|---|"]
    for name, size in NETWORKS:
        torch.manual_seed(0)
        model = create_model(name, 10, size).eval()
        x = torch.randn(1, 3, size, size)
        image = np.random.default_rng(0).integers(0, 256, (3, size, size), dtype=np.uint8)
        with torch.no_grad():
            infer = _median_seconds(lambda: model(x), repeats)
        layer = class_maps(model, x, [0])[1]
        one = _median_seconds(lambda: class_maps(model, x, [0], layer=layer), repeats)
        side = display_side(size)
        drawn = _median_seconds(lambda: png_bytes(overlay(image, class_maps(model, x, [0], layer=layer)[0][0], side)),
                                repeats)
        batch = torch.randn(12, 3, size, size)
        gallery = _median_seconds(lambda: class_maps(model, batch, [i % 10 for i in range(12)], layer=layer),
                                  max(3, repeats // 5))
        rows.append(f"| {name} | {size} | {layer} | {1000 * infer:.1f} | {1000 * one:.1f} | {1000 * drawn:.1f} | "
                    f"{one / infer:.1f}x | {1000 * gallery / 12:.1f} |")
    return rows


def localisation(per_class: int) -> list[str]:
    from cnnlab.cli import main as cli
    from cnnlab.evaluate.predict import Predictor

    size, side = 32, 14
    area = side * side / size**2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        boxes = write_squares(root / "data", {"train": per_class, "test": per_class // 3}, size, side, seed=1)
        start = time.perf_counter()
        code = cli(["train", "--data", str(root / "data"), "--model", "fastnet", "--epochs", "8", "--precision",
                    "fp32", "--out", str(root / "runs"), "--no-progress"])
        assert code == 0, "training on the coloured squares failed"
        train_s = time.perf_counter() - start
        (run,) = (root / "runs").iterdir()
        predictor = Predictor.load(run, engine="torch")
        paths = [k for k in boxes if k.startswith("test/")]
        arrays = [predictor.decode(root / "data" / p) for p in paths]
        probs = predictor.predict_arrays(arrays)
        accuracy = float(np.mean([predictor.classes_[i] == p.split("/")[1] for i, p in zip(probs.argmax(1), paths)]))
        targets = list(probs.argmax(1))
        torch.manual_seed(0)
        meta = predictor.meta
        random = create_model(meta["model_name"], len(meta["classes"]), meta["image_size"],
                              **meta.get("model_args", {}))
        rows = [f"fastnet trained on {per_class} images per class in {train_s:.0f} s: test accuracy {accuracy:.2%}; "
                f"the square is {area:.0%} of the image; {len(paths)} test images.", "",
                "| weights | method | layer | mean mass in the square | images with > 2x its area share | "
                "peak in the square | Spearman to trained maps |", "|---|---|---|---|---|---|---|"]
        trained_maps = {}
        for weights, model in (("trained", predictor.model), ("random", random)):
            for method in METHODS:
                maps = explain_arrays(model, arrays, predictor.mean, predictor.std, targets, method)
                mass = np.array([mass_inside(m.cam, boxes[p], size) for m, p in zip(maps, paths)])
                peak = np.mean([mass_inside((m.cam >= m.cam.max()).astype(float), boxes[p], size) > 0.5
                                for m, p in zip(maps, paths)])
                if weights == "trained":
                    trained_maps[method] = maps
                rho = np.nanmean([spearmanr(a.cam.ravel(), b.cam.ravel())[0] for a, b in zip(trained_maps[method], maps)])
                rows.append(f"| {weights} | {method} | {maps[0].layer} | {mass.mean():.3f} | {(mass > 2 * area).mean():.1%} "
                            f"| {peak:.1%} | {rho:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--per-class", type=int, default=300, help="coloured-square training images per class")
    args = ap.parse_args()
    torch.set_num_threads(2)
    body = [f"Threads: {torch.get_num_threads()}. Method: Grad-CAM unless named; times are medians of "
            f"{args.repeats} runs on random input (the map's cost does not depend on the weights).", ""]
    body += timing(args.repeats) + ["", "### Localisation on the coloured-square set", ""] + localisation(args.per_class)
    update_section("explain", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
