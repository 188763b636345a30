"""Batched augmentation and normalisation: whole batches as tensor ops, never per-sample Python.

Loaders hand uint8 batches (N, 3, H, W) to `to_model_input`, the one place where pixels become
the model's float input; training adds the random ops in `augment_batch`. Each op draws from the
run's own torch.Generator, so a seed fixes the augmentation too. The random numbers are drawn on
the CPU and moved to the batch's device, so a batch on a GPU is augmented there with the same draws.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def to_model_input(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalised float32 in channels_last (faster convolutions on CPU)."""
    m, s = _scale(tuple(mean), tuple(std), x.device)
    return ((x.float() - m) / s).contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=16)
def _scale(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std as (1, C, 1, 1) tensors in 0-255 units, built once per model (a server calls per request)."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    return m, s


def random_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Reflect-pad by `pad` then cut each sample at its own random offset (two gathers)."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect" if pad < min(h, w) else "replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return mirror(x, torch.rand(x.shape[0], generator=g) < 0.5)


def mirror(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Mirror the samples where `which` (bool, one per sample) is true."""
    return torch.where(which.to(x.device)[:, None, None, None], x.flip(3), x)


def alternating_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of `n` images are mirrored in `epoch`: a seeded half in even epochs, the other half in odd ones.
    Each image shows both its views in any two epochs running, where random flips show half of the images
    the same view twice (the alternating flip of Keller Jordan's airbench)."""
    g = torch.Generator().manual_seed((1 << 62) + seed)  # a stream apart from the loader's (seed, epoch) ones
    first = torch.randint(0, 2, (n,), generator=g, dtype=torch.bool)
    return first ^ bool(epoch % 2)


def cutout(x: torch.Tensor, g: torch.Generator, frac: float = 0.25) -> torch.Tensor:
    """Zero one random square of side `frac` x image side per sample (zero = the mean pixel)."""
    n, _, h, w = x.shape
    size = max(1, int(min(h, w) * frac))
    cy = torch.randint(0, h, (n,), generator=g)[:, None].to(x.device)
    cx = torch.randint(0, w, (n,), generator=g)[:, None].to(x.device)
    ys, xs = torch.arange(h, device=x.device)[None, :], torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= cy - size // 2) & (ys < cy + (size + 1) // 2)
    in_x = (xs >= cx - size // 2) & (xs < cx + (size + 1) // 2)
    hole = in_y[:, :, None] & in_x[:, None, :]
    return x.masked_fill(hole[:, None], 0.0)


def jitter(x: torch.Tensor, g: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """Per-sample brightness and contrast jitter on normalised input."""
    n = x.shape[0]
    contrast = (1 + (torch.rand(n, generator=g) * 2 - 1) * strength).to(x.device)
    bright = ((torch.rand(n, generator=g) * 2 - 1) * strength).to(x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast[:, None, None, None] + mean + bright[:, None, None, None]


def augment_batch(x: torch.Tensor, ops: tuple[str, ...], pad: int, g: torch.Generator,
                  mirrored: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the configured ops, in a fixed order, to a normalised float batch.
    `mirrored`: for "flip_alternate", which samples this epoch mirrors (`alternating_flips`)."""
    if "crop" in ops:
        x = random_crop(x, pad, g)
    if "flip" in ops:
        x = random_flip(x, g)
    if "flip_alternate" in ops:
        x = mirror(x, mirrored)
    if "jitter" in ops:
        x = jitter(x, g)
    if "cutout" in ops:
        x = cutout(x, g)
    return x.contiguous(memory_format=torch.channels_last)
