"""Stratified train/val/test split manifests, keyed by content so no image sits in two splits.

A manifest is a CSV (`path, class, split, sha256`). Files with identical bytes are one group and
always land in the same split; when the data ships its own test (or val) folder, training copies
of those images are dropped as leakage and reported. The split is seeded, saved with each run,
and reusable with `--split FILE`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from cnnlab.core.errors import UserError
from cnnlab.core.runs import read_csv, write_csv
from cnnlab.data.hashes import file_hashes
from cnnlab.data.sources import Scan

SPLITS = ("train", "val", "test")
COLUMNS = ["path", "class", "split", "sha256"]


@dataclass(frozen=True)
class Row:
    path: str
    label: str
    split: str
    sha256: str


@dataclass(frozen=True)
class Split:
    rows: tuple[Row, ...]
    classes: tuple[str, ...]
    dropped: tuple[str, ...] = ()  # train files removed because val/test hold the same bytes

    def of(self, split: str) -> list[Row]:
        return [r for r in self.rows if r.split == split]

    def sizes(self, without: set[str] | frozenset[str] = frozenset()) -> dict[str, int]:
        """Images per split: {"train": N, "val": N, "test": N}, not counting the paths in `without`."""
        counts = self.counts(without)
        return {s: sum(n[s] for n in counts.values()) for s in SPLITS}

    def counts(self, without: set[str] | frozenset[str] = frozenset()) -> dict[str, dict[str, int]]:
        """Images per class and split, not counting the paths in `without` (files that did not decode)."""
        out = {c: {s: 0 for s in SPLITS} for c in self.classes}
        for r in self.rows:
            out[r.label][r.split] += r.path not in without
        return out


def _carve(groups_by_class: dict[str, list[str]], fractions: dict[str, float], rng: random.Random) -> dict[str, str]:
    """Assign each hash group a split, class by class, in the given proportions."""
    where = {}
    for label in sorted(groups_by_class):
        groups = sorted(groups_by_class[label])
        rng.shuffle(groups)
        n, start = len(groups), 0
        for split, frac in fractions.items():
            k = round(n * frac)
            if n - start - k < 1:  # always leave at least one group for training
                k = max(0, n - start - 1)
            for h in groups[start:start + k]:
                where[h] = split
            start += k
        for h in groups[start:]:
            where[h] = "train"
    return where


def make_split(scan: Scan, *, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
               limit_per_class: int = 0) -> Split:
    """Build a stratified manifest for `scan` (hashing every file's bytes).

    Args:
        scan: the scanned folder.
        val_fraction: share of each class for validation (carved from train when the data ships
            train/ and test/ without val/).
        test_fraction: share of each class for test when the data has no split of its own.
        seed: shuffles the assignment.
        limit_per_class: keep at most this many images per class and shipped split (0 = all),
            chosen before hashing so a quick run on a large folder stays quick.
    """
    rng = random.Random(seed)
    if limit_per_class:
        scan = dataclasses.replace(scan, items=tuple(_limit(list(scan.items), limit_per_class, rng)))
    hashes = file_hashes(scan.root, [i.path for i in scan.items])
    first_label: dict[str, str] = {}
    for i in scan.items:
        first_label.setdefault(hashes[i.path], i.label)
    dropped: list[str] = []
    if scan.has_split:
        shipped = {i.split for i in scan.items}
        # train/ + val/ without test/ (hymenoptera's layout): the shipped val becomes the test
        # split and validation is carved from train, so model selection never sees the test.
        rename = {"val": "test"} if "test" not in shipped and "val" in shipped else {}
        split_of = {i.path: rename.get(i.split, i.split) for i in scan.items}
        fixed = {}  # hash -> split, for images the data itself put in val/test
        for i in scan.items:
            if split_of[i.path] in ("val", "test"):
                fixed.setdefault(hashes[i.path], split_of[i.path])
        train_items = [i for i in scan.items if split_of[i.path] == "train"]
        dropped = [i.path for i in train_items if hashes[i.path] in fixed]
        assign = dict(fixed)
        if "val" not in set(split_of.values()):
            by_class = defaultdict(set)
            for i in train_items:
                if hashes[i.path] not in fixed:
                    by_class[first_label[hashes[i.path]]].add(hashes[i.path])
            assign.update(_carve({k: list(v) for k, v in by_class.items()}, {"val": val_fraction}, rng))
        dropped_set = set(dropped)
        rows = [Row(i.path, i.label, assign.get(hashes[i.path], "train"), hashes[i.path])
                for i in scan.items if i.path not in dropped_set]
        # a val/test file duplicated inside its own split keeps its first split only
        rows = [r for r in rows if r.split == assign.get(r.sha256, "train")]
    else:
        by_class = defaultdict(set)
        for i in scan.items:
            by_class[first_label[hashes[i.path]]].add(hashes[i.path])
        assign = _carve({k: list(v) for k, v in by_class.items()}, {"test": test_fraction, "val": val_fraction}, rng)
        rows = [Row(i.path, i.label, assign[hashes[i.path]], hashes[i.path]) for i in scan.items]
    return Split(tuple(rows), scan.classes, tuple(dropped))


def _limit(items: list, n: int, rng: random.Random) -> list:
    """At most `n` items per (shipped split, class), chosen at random but reproducibly."""
    buckets = defaultdict(list)
    for r in items:
        buckets[(r.split, r.label)].append(r)
    keep = set()
    for key in sorted(buckets):
        chosen = list(buckets[key])
        rng.shuffle(chosen)
        keep.update(r.path for r in chosen[:n])
    return [r for r in items if r.path in keep]


def require_val_and_test(split: Split) -> Split:
    """Refuse a split that leaves validation or test empty: nothing could pick the best epoch, or report."""
    for part, name, key in (("val", "validation", "data.val_fraction"), ("test", "test", "data.test_fraction")):
        if not split.of(part):
            raise UserError(f"the split has no {name} images; use more data or a larger {key}")
    return split


def save_split(split: Split, path: Path) -> Path:
    return write_csv(path, COLUMNS, ([r.path, r.label, r.split, r.sha256] for r in split.rows))


def load_split(path: str | Path, scan: Scan) -> Split:
    """Read a saved manifest and check it against the data folder."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"split file {p} not found; pass a split.csv written by an earlier run")
    try:
        raw = read_csv(p)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"split file {p} cannot be read: {e}") from None
    if not raw or any(c not in raw[0] for c in COLUMNS):
        raise UserError(f"split file {p} needs the columns {', '.join(COLUMNS)}")
    rows, seen = [], {}
    for n, r in enumerate(raw, start=2):
        if r["split"] not in SPLITS:
            raise UserError(f"split file {p} line {n}: split {r['split']!r} is not one of {', '.join(SPLITS)}")
        if not (scan.root / r["path"]).is_file():
            raise UserError(f"split file {p} line {n}: {r['path']} is not in {scan.root}; is --data the same folder?")
        other = seen.setdefault(r["sha256"], r["split"])
        if other != r["split"]:
            raise UserError(f"split file {p} line {n}: {r['path']} has the same bytes as a file in split {other} (leakage)")
        rows.append(Row(r["path"], r["class"], r["split"], r["sha256"]))
    classes = tuple(sorted({r.label for r in rows}))
    if len({r.label for r in rows if r.split == "train"}) < 2:
        raise UserError(f"split file {p} has fewer than two classes in train")
    return Split(tuple(rows), classes)


def manifest_hash(split: Split) -> str:
    h = hashlib.sha256()
    for r in split.rows:
        h.update(f"{r.path}\t{r.label}\t{r.split}\t{r.sha256}\n".encode())
    return h.hexdigest()
