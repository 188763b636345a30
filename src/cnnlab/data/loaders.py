"""Loaders: a decoded uint8 tensor cache in memory, or streaming from files when data is large.

The memory path decodes every image once into `(N, 3, S, S)` uint8, saved in the user cache
keyed by the files' content hashes and the size, so a second run loads CIFAR-10 in about a
second. The streaming path decodes per batch in worker processes, for data larger than
`data.memory_cap_mb`. Both yield the same batches: normalised float32, channels_last, with
training augmentation applied batch-wise. Files that fail to decode are left out, never a crash
mid-epoch, and recorded with the reason: the memory path when it decodes, the streaming path in
the main process as batches come back from the workers; `Loaders.dropped()` lists them all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnlab.core.env import cache_dir
from cnnlab.core.errors import UserError
from cnnlab.core.workers import process_map
from cnnlab.data.augment import alternating_flips, augment_batch, to_model_input
from cnnlab.data.decode import DecodeError, load_array
from cnnlab.data.splits import Row, Split, require_val_and_test

CACHE_VERSION = "1"  # bump when decoding or resizing changes, so old caches are not reused


def _decode_one(path: Path, size: int, crop: float) -> tuple[np.ndarray | None, str]:
    """(image, '') or (None, why it cannot be used) for one file."""
    try:
        return load_array(path, size, crop), ""
    except DecodeError as e:
        return None, str(e) or "cannot be decoded"
    except OSError as e:
        return None, f"cannot read ({e.strerror or type(e).__name__})"


def _decode_chunk(args: tuple[str, list[str], int, float]) -> tuple[np.ndarray, list[str]]:
    root, paths, size, crop = args
    out = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    errors = []
    for k, p in enumerate(paths):
        image, error = _decode_one(Path(root) / p, size, crop)
        if image is not None:
            out[k] = image
        errors.append(error)
    return out, errors


def decode_all(root: Path, paths: list[str], size: int, workers: int, crop: float = 1.0) -> tuple[np.ndarray, list[str]]:
    """Decode `paths` in parallel: (N, 3, size, size) uint8 and one error string per file ('' = ok)."""
    chunk = max(64, math.ceil(len(paths) / max(1, workers * 8)))
    jobs = [(str(root), paths[i:i + chunk], size, crop) for i in range(0, len(paths), chunk)]
    parts = process_map(_decode_chunk, jobs, workers)
    if not parts:
        return np.zeros((0, 3, size, size), np.uint8), []
    return np.concatenate([p[0] for p in parts]), [e for p in parts for e in p[1]]


def cached_arrays(root: Path, rows: list[Row], size: int, workers: int, log=print,
                  crop: float = 1.0) -> tuple[np.ndarray, list[str]]:
    """Images for `rows` from the content-keyed cache, decoding (and saving) on a miss."""
    key = hashlib.sha256(f"v{CACHE_VERSION}|{size}|".encode() + (f"crop{crop}|".encode() if crop != 1 else b""))
    for r in sorted(rows, key=lambda r: r.path):
        key.update(f"{r.path}\t{r.sha256}\n".encode())
    folder = cache_dir() / "tensors" / key.hexdigest()[:24]
    order = sorted(range(len(rows)), key=lambda i: rows[i].path)
    if (folder / "images.npy").is_file():
        images = np.load(folder / "images.npy", allow_pickle=False)
        errors = json.loads((folder / "errors.json").read_text())
    else:
        log(f"decoding {len(rows):,} images at {size}x{size} into the cache (once) ...")
        images, errors = decode_all(root, [rows[i].path for i in order], size, workers, crop)
        tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "images.npy", images)
        (tmp / "errors.json").write_text(json.dumps(errors))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    # back from path order to the caller's order
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
    return images[inverse], [errors[i] for i in inverse]


class Loader:
    """Batches `(x, y, index into paths)`: seeded order and augmentation, resumable, shardable.

    The order of an epoch is a permutation drawn from a generator seeded by (seed, epoch), and the
    same generator then drives augmentation, so an epoch is reproducible from its number alone and
    `resume_at` can continue it mid-way from a saved generator state. With `world` > 1 each rank
    takes every world-th sample of the same permutation (cut to equal length, so all ranks take
    the same number of steps).
    """

    def __init__(self, source, y: torch.Tensor, paths: list[str], batch_size: int, mean, std, *, train=False,
                 augment=(), pad=4, seed=0, rank=0, world=1):
        self.source, self.y, self.paths, self.batch_size = source, y, list(paths), batch_size
        self.mean, self.std, self.train, self.augment, self.pad = mean, std, train, augment, pad
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0
        self.generator = None  # the current epoch's generator (its state goes into checkpoints)
        self._resume: tuple[int, torch.Tensor | None] = (0, None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, step: int, generator_state: torch.Tensor | None) -> None:
        """Make the next iteration start at batch `step` with the generator as it was saved."""
        self._resume = (step, generator_state)

    def _order(self, g: torch.Generator) -> torch.Tensor:
        n = len(self.y)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        if self.world > 1:
            order = order[: n - n % self.world] if self.train else order
            order = order[self.rank::self.world]
        return order

    def __len__(self) -> int:
        n = len(self.y)
        if self.world > 1:
            n = (n - n % self.world) // self.world if self.train else len(range(self.rank, n, self.world))
        return math.ceil(n / self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = self._order(g)
        start, state = self._resume
        self._resume = (0, None)
        if state is not None:
            g.set_state(state)
        self.generator = g
        batches = [order[i:i + self.batch_size] for i in range(start * self.batch_size, len(order), self.batch_size)]
        train_flips = self.train and "flip_alternate" in self.augment  # evaluation loaders carry `augment` too
        mirrored = alternating_flips(len(self.y), self.seed, self.epoch) if train_flips else None
        for x8, idx in self.source.batches(batches):
            if len(idx) == 0:
                continue
            # mean None: the source already holds model input (cached backbone features)
            xb = to_model_input(x8, self.mean, self.std) if self.mean is not None else x8
            if self.train and self.augment:
                xb = augment_batch(xb, self.augment, self.pad, g, None if mirrored is None else mirrored[idx])
            yield xb, self.y[idx], idx


def first_images(loader: Loader, n: int) -> torch.Tensor:
    """Up to `n` of the loader's images as model input, without augmentation (data-driven init)."""
    x8, _ = next(iter(loader.source.batches([torch.arange(min(n, len(loader.y)))])))
    return to_model_input(x8, loader.mean, loader.std)


class MemorySource:
    """uint8 images held in memory."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def batches(self, index_lists):
        for idx in index_lists:
            yield self.x[idx], idx


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path, rows: list[Row], size: int, crop: float):
        self.root, self.rows, self.size, self.crop = root, rows, size, crop

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        image, error = _decode_one(self.root / self.rows[i].path, self.size, self.crop)
        return (None if image is None else torch.from_numpy(image)), i, error  # a failed file: None and why


def _collate(batch):
    """(images, their indices, [(index, reason)] of the files dropped from this batch)."""
    keep = [b for b in batch if b[0] is not None]
    dropped = [(b[1], b[2]) for b in batch if b[0] is None]
    if not keep:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), dropped
    return torch.stack([b[0] for b in keep]), torch.tensor([b[1] for b in keep], dtype=torch.long), dropped


class FileSource:
    """Images decoded from files per batch in DataLoader worker processes.

    A file that fails to decode is left out of its batch; the workers send back its index and
    reason with the batch, and `dropped` (path -> reason) collects them in this process.
    """

    def __init__(self, root: Path, rows: list[Row], size: int, workers: int, crop: float = 1.0):
        self.dataset, self.workers = _FileDataset(root, rows, size, crop), workers
        self.dropped: dict[str, str] = {}

    def batches(self, index_lists):
        lists = [idx.tolist() for idx in index_lists]
        if not lists:
            return
        for x, idx, dropped in torch.utils.data.DataLoader(self.dataset, batch_sampler=lists,
                                                           num_workers=self.workers, collate_fn=_collate):
            for i, reason in dropped:
                self.dropped.setdefault(self.dataset.rows[i].path, reason)
            yield x, idx


@dataclass
class Loaders:
    train: object
    val: object
    test: object
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    kind: str  # memory | stream
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out when built
    val_all: object = None  # with several processes, the whole validation split (val is this rank's shard)

    def dropped(self) -> list[tuple[str, str]]:
        """(path, reason) of every file left out so far, once each: found when the loaders were built
        (memory path) or while streaming batches of train, val or test. Streaming finds a file when a
        batch reaches it, so ask again after the epochs (and after the test pass)."""
        out = dict(self.rejected)
        for loader in (self.train, self.val, self.test):
            for path, reason in getattr(getattr(loader, "source", None), "dropped", {}).items():
                out.setdefault(path, reason)
        return list(out.items())


def _mean_std(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to ~20,000 images, summed in chunks (no full float64 copy)."""
    sample = x[:: max(1, len(x) // 20_000)]
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(sample), 1024):
        chunk = sample[i:i + 1024].double().cpu() / 255.0
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    n = max(1, sample.numel() // max(1, x.shape[1]))
    mean = total / n
    std = ((squares - n * mean.square()) / max(1, n - 1)).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def make_loaders(root: Path, split: Split, size: int, batch_size: int, eval_batch_size: int, *, loader="auto",
                 memory_cap_mb=4096, augment=(), pad=4, seed=0, workers=2, mean_std=None, crop=1.0, rank=0,
                 world=1, device=None, log=print) -> Loaders:
    """Build train/val/test loaders for a split at `size` x `size` pixels.

    Args:
        mean_std: fixed (mean, std) normalisation, e.g. a pretrained backbone's; None computes
            it from the training images.
        crop: centre-crop fraction of the decode (a pretrained backbone's crop_pct; 1 = none).
        rank, world: this process's shard of train and val under distributed training.
        device: where the in-memory images live (a GPU: decoded once, then batched and augmented there).
    """
    classes = split.classes
    class_index = {c: k for k, c in enumerate(classes)}
    need_mb = len(split.rows) * 3 * size * size / 2**20
    kind = loader if loader != "auto" else ("memory" if need_mb <= memory_cap_mb else "stream")
    if kind == "memory" and need_mb > memory_cap_mb and loader == "memory":
        log(f"warning: {need_mb:,.0f} MB of decoded images is over data.memory_cap_mb={memory_cap_mb}")
    require_val_and_test(split)
    rejected, parts = [], {}  # split -> (source, labels, paths)
    if kind == "memory":
        rows = list(split.rows)
        images, errors = cached_arrays(root, rows, size, workers, log, crop)
        rejected = [(r.path, e) for r, e in zip(rows, errors) if e]
        ok = np.array([not e for e in errors], dtype=bool)
        x_all = torch.from_numpy(images).to(device or "cpu")
        for s in ("train", "val", "test"):
            idx = np.flatnonzero(np.array([r.split == s for r in rows]) & ok).tolist()
            parts[s] = (MemorySource(x_all[idx]), torch.tensor([class_index[rows[i].label] for i in idx]),
                        [rows[i].path for i in idx])
        if len(parts["train"][1]) == 0:
            raise UserError("no training image could be decoded; run `cnnlab audit` on the data")
        mean, std = mean_std or _mean_std(parts["train"][0].x)
    else:
        for s in ("train", "val", "test"):
            rows = split.of(s)
            parts[s] = (FileSource(root, rows, size, workers, crop), torch.tensor([class_index[r.label] for r in rows]),
                        [r.path for r in rows])
        if mean_std is None:
            train_rows = split.of("train")
            probe_rows = train_rows[:: max(1, len(train_rows) // 2000)]
            probe, errors = decode_all(root, [r.path for r in probe_rows], size, workers, crop)
            rejected = [(r.path, e) for r, e in zip(probe_rows, errors) if e]
            mean_std = _mean_std(torch.from_numpy(probe[[not e for e in errors]]))
        mean, std = mean_std

    def make(s, train, whole=False):
        source, y, paths = parts[s]
        shard = (rank, world) if s != "test" and not whole else (0, 1)  # rank 0 predicts the whole test split
        return Loader(source, y, paths, batch_size if train else eval_batch_size, mean, std, train=train,
                      augment=augment, pad=pad, seed=seed, rank=shard[0], world=shard[1])

    return Loaders(make("train", True), make("val", False), make("test", False), classes, mean, std, size, kind,
                   rejected, make("val", False, whole=True) if world > 1 else None)
