"""Out-of-fold logits of the training images: more answers to fit a temperature on when the validation
split alone holds too few mistakes (hymenoptera's 24 validation images are often all right).

Only a head on cached backbone features is cheap enough for this: k copies of it, each trained from a
fresh initialisation with the run's own recipe on k - 1 folds of the training images, predict the fold
they did not see. Those answers are as unseen as the validation split's, and come from the same recipe
on slightly less data (scikit-learn's CalibratedClassifierCV with ensemble=False does the same). An
image's views (the image and its mirror) stay in one fold, or a head would have seen the mirror of the
image it is asked about.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch

from cnnlab.core.config import TrainConfig
from cnnlab.data.loaders import Loader, Loaders, MemorySource
from cnnlab.train.loop import fit

FOLDS = 5
NO_ANSWERS = (np.zeros((0, 0)), np.zeros(0, dtype=np.int64))


def out_of_fold_logits(head: torch.nn.Module, loaders: Loaders, cfg: TrainConfig, *, device: torch.device,
                       precision: str, class_weights: torch.Tensor | None = None,
                       folds: int = FOLDS) -> tuple[np.ndarray, np.ndarray]:
    """(logits, targets) of every training image, each predicted by a head that never saw it; none when a
    fold did not finish (a signal came, so the run is ending, or the fold diverged).

    `loaders` are feature loaders: train holds one row per image and view, with the view's image path.
    """
    train = loaders.train
    images = sorted(set(train.paths))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    fold_of = {images[i]: k % folds for k, i in enumerate(order)}
    row_fold = torch.tensor([fold_of[p] for p in train.paths])
    first_view = _first_rows(train.paths)
    logits, targets = [], []
    cfg = dataclasses.replace(cfg, compile=False)  # five small heads: compiling each costs more than it saves
    # fit writes a history and checkpoints; the heads' seeds must not move the run's random state
    with tempfile.TemporaryDirectory(prefix="cnnlab-oof-") as scratch, torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else []):
        for k in range(folds):
            rows = torch.nonzero(row_fold != k).squeeze(1)
            held = torch.tensor([i for i in first_view if row_fold[i] == k], dtype=torch.long)
            if not len(rows) or not len(held):
                continue
            torch.manual_seed(cfg.seed * 1_000 + k)
            fold_head = _fresh(head)
            result = fit(fold_head, dataclasses.replace(loaders, train=_subset(train, rows, train=True)), cfg,
                         Path(scratch), device=device, precision=precision, class_weights=class_weights,
                         log=lambda *_: None, progress=False)
            if result.status not in ("completed", "early_stopped"):  # a signal came, or the fold diverged
                return NO_ANSWERS
            fold_head.eval()
            with torch.no_grad():
                for x, y, _ in _subset(train, held, train=False):
                    logits.append(fold_head(x.to(device)).float().cpu())
                    targets.append(y)
    if not logits:
        return NO_ANSWERS
    return torch.cat(logits).double().numpy(), torch.cat(targets).numpy()


def _first_rows(paths: list[str]) -> list[int]:
    """The first row of each image (its unmirrored view: feature loaders put view 0 first)."""
    first: dict[str, int] = {}
    for i, p in enumerate(paths):
        first.setdefault(p, i)
    return sorted(first.values())


def _fresh(head: torch.nn.Module) -> torch.nn.Module:
    """A copy of `head` with every layer initialised anew."""
    fresh = copy.deepcopy(head)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh


def _subset(loader: Loader, rows: torch.Tensor, *, train: bool) -> Loader:
    return Loader(MemorySource(loader.source.x[rows]), loader.y[rows], [loader.paths[i] for i in rows.tolist()],
                  loader.batch_size, None, None, train=train, seed=loader.seed)
