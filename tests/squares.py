"""A data set whose answer is known to lie in one place: the class is the colour of a square drawn at
a random spot on coloured noise, so a class-activation map should put its mass inside the square."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 40, 230)}


def write_squares(root: Path, per_class: dict[str, int], size: int = 32, side: int = 10,
                  seed: int = 0) -> dict[str, tuple[int, int, int, int]]:
    """PNG files `root/<split>/<colour>/<n>.png` (per_class: split -> images per class); returns each
    file's square as (left, top, right, bottom) pixels, keyed by its path relative to `root`."""
    rng = np.random.default_rng(seed)
    boxes = {}
    for split, n in per_class.items():
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(60, 196, (size, size, 3)).astype(np.uint8)  # dull noise: no pure colour
                left, top = (int(v) for v in rng.integers(0, size - side + 1, 2))
                pixels[top:top + side, left:left + side] = colour
                Image.fromarray(pixels).save(folder / f"{i}.png")
                boxes[f"{split}/{name}/{i}.png"] = (left, top, left + side, top + side)
    return boxes


def mass_inside(cam: np.ndarray, box: tuple[int, int, int, int], image_size: int) -> float:
    """The share of the map's mass inside `box` (pixels of the `image_size` file, which the decoder passes
    through untouched when it is already the model's size; the map may be drawn larger)."""
    scale = cam.shape[0] / image_size
    left, top, right, bottom = (round(v * scale) for v in box)
    return float(cam[top:bottom, left:right].sum() / max(cam.sum(), 1e-12))
