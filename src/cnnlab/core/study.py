"""Study files: several runs (models x settings x learning rates) over shared defaults.

    name: report000
    defaults: {data: {path: cifar10}, train: {epochs: 20, batch_size: 64}}
    runs:
      - name: cnn                       # child runs are named cnn-lr0.0001, cnn-lr0.001, ...
        model: {name: report000_cnn}
        lrs: [1e-4, 1e-3, 1e-2, 1e-1]
      - name: resnet18-finetuned
        model: {name: resnet18, pretrained: true}
        train: {epochs: 10, lr: 1e-4}

Each child is a full run config (the defaults with the entry's sections merged over them),
validated when the study is loaded, so a typo stops the study before anything trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cnnlab.core.config import Config, apply_sets, config_from_dict, merge, read_yaml_mapping
from cnnlab.core.errors import UserError

ENTRY_KEYS = {"name", "lrs", "data", "model", "train"}


@dataclass(frozen=True)
class Child:
    name: str  # unique in the study; the report's row label
    group: str  # the entry it came from: runs of one group differ only in learning rate
    config: Config


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    data_help: str  # said when the data is missing (e.g. where to get RealWaste)
    children: tuple[Child, ...]


def _lr_label(lr) -> str:
    return "auto" if lr == "auto" else f"{float(lr):g}"


def _is_lr(lr) -> bool:
    if lr == "auto":
        return True
    try:
        return not isinstance(lr, bool) and math.isfinite(float(lr))
    except (TypeError, ValueError):
        return False


def _lrs(entry: dict, where: str) -> list:
    """The entry's learning rates ([None] when it has none), each a number or "auto"."""
    lrs = entry.get("lrs")
    if lrs is None or lrs == []:
        return [None]
    if not isinstance(lrs, list):
        raise UserError(f"{where}: lrs must be a list of learning rates, e.g. lrs: [1e-3, 1e-2], got {lrs!r}")
    for lr in lrs:
        if not _is_lr(lr):
            raise UserError(f"{where}: lrs has {lr!r}; each learning rate must be a number (e.g. 1e-3) or auto")
    return lrs


def raise_all(mistakes: list[str], shown: int = 3) -> None:
    """One UserError naming every mistake found (the first `shown` in full), so that one edit fixes them all."""
    if len(mistakes) == 1:
        raise UserError(mistakes[0])
    if mistakes:
        more = f"; and {len(mistakes) - shown} more" if len(mistakes) > shown else ""
        raise UserError(f"{len(mistakes)} mistakes: " + "; ".join(mistakes[:shown]) + more)


def load_study(path: str | Path, sets: list[str] = ()) -> Study:
    """Read and validate a study file; `sets` (`train.epochs=2`) apply to every child."""
    p = Path(path)
    raw = read_yaml_mapping(p, "study file", "name, defaults and runs")
    unknown = set(raw) - {"name", "description", "data_help", "defaults", "runs"}
    if unknown:
        raise UserError(f"study file {p}: unknown keys {sorted(unknown)}; use name, description, data_help, "
                        "defaults, runs")
    if not raw.get("runs"):
        raise UserError(f"study file {p} lists no runs")
    if not isinstance(raw["runs"], list):
        raise UserError(f"study file {p}: runs must be a list of entries (- name: ..., model: {{name: ...}}), "
                        f"got {raw['runs']!r}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise UserError(f"study file {p}: defaults must be a mapping of sections (data, model, train), "
                        f"got {defaults!r}")
    forced = apply_sets({}, sets)  # --set values win over the defaults and every entry
    children, seen, mistakes = [], set(), []
    for i, entry in enumerate(raw["runs"]):  # every entry is checked, so that one message names every mistake
        try:
            children += _entry_children(p, i, entry, defaults, forced, seen)
        except UserError as e:
            mistakes.append(str(e))
    raise_all(mistakes)
    return Study(str(raw.get("name") or p.stem), str(raw.get("description") or ""), str(raw.get("data_help") or ""),
                 tuple(children))


def _entry_children(p: Path, i: int, entry, defaults: dict, forced: dict, seen: set) -> list[Child]:
    """The runs of the study file's entry `i` (one per learning rate in its lrs), or a UserError naming it."""
    if not isinstance(entry, dict):
        raise UserError(f"study file {p}: run {i + 1} must be a mapping with keys from {sorted(ENTRY_KEYS)}, "
                        f"got {entry!r}")
    unknown = sorted(str(k) for k in set(entry) - ENTRY_KEYS)
    if unknown:
        raise UserError(f"study file {p}: run {i + 1} has unknown keys {unknown}; use keys from {sorted(ENTRY_KEYS)}")
    for k in ("data", "model", "train"):
        if entry.get(k) is not None and not isinstance(entry[k], dict):
            raise UserError(f"study file {p}: run {i + 1}: {k} must be a mapping of keys "
                            f"(e.g. {k}: {{...}}), got {entry[k]!r}")
    group = str(entry.get("name") or (entry.get("model") or {}).get("name") or f"run{i + 1}")
    base = merge(defaults, {k: entry[k] for k in ("data", "model", "train") if k in entry})
    children = []
    for lr in _lrs(entry, f"study file {p}, run {group}"):
        cfg_raw = merge(merge(base, {"train": {"lr": lr}}) if lr is not None else base, forced)
        name = f"{group}-lr{_lr_label(lr)}" if lr is not None else group
        if name in seen:
            raise UserError(f"study file {p}: two runs are named {name}; give each entry its own name")
        seen.add(name)
        try:
            cfg = config_from_dict(cfg_raw)
        except UserError as e:
            raise UserError(f"study file {p}, run {name}: {e}") from None
        children.append(Child(name, group, cfg))
    return children
