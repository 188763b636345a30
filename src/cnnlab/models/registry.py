"""The one model registry: `@register_model` fills a dict, `create_model` is the only builder.

Entries are plain functions `fn(num_classes, image_size, **kwargs) -> nn.Module`, registered by
the explicit imports in `models/__init__.py`. A duplicate name is a bug and raises. A family of
names `PREFIX:NAME` is resolved on first use by the function registered for PREFIX with
`register_prefix` (models/__init__.py registers `timm:` and `tv:` from models/pretrained.py), so
this module imports no model module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from cnnlab.core.errors import UserError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    fn: Callable[..., nn.Module]
    default_size: int  # input side in pixels the model was designed for
    description: str


@dataclass(frozen=True)
class Family:
    prefix: str
    resolve: Callable[[str], ModelEntry | None]  # the full name `PREFIX:NAME` -> its entry, None, or UserError
    description: str


_MODELS: dict[str, ModelEntry] = {}
_FAMILIES: dict[str, Family] = {}


def register_model(default_size: int, description: str):
    def wrap(fn):
        add_entry(ModelEntry(fn.__name__, fn, default_size, description))
        return fn

    return wrap


def add_entry(entry: ModelEntry) -> None:
    if entry.name in _MODELS:
        raise ValueError(f"model {entry.name!r} is registered twice")
    _MODELS[entry.name] = entry


def register_prefix(prefix: str, resolve: Callable[[str], ModelEntry | None], description: str) -> None:
    """Names `PREFIX:NAME` are resolved by `resolve(name)` (an entry, None for unknown, or UserError)."""
    if not prefix or ":" in prefix:
        raise ValueError(f"model prefix {prefix!r} must be non-empty and have no ':'")
    if prefix in _FAMILIES:
        raise ValueError(f"model prefix {prefix!r} is registered twice")
    _FAMILIES[prefix] = Family(prefix, resolve, description)


def list_models() -> list[str]:
    """The registered names (families of names: `list_families`)."""
    return sorted(_MODELS)


def list_families() -> list[tuple[str, str]]:
    """(`PREFIX:NAME`, description) of every registered family of names, e.g. ("timm:NAME", "any timm ...")."""
    return [(f"{p}:NAME", f.description) for p, f in sorted(_FAMILIES.items())]


def get_entry(name: str) -> ModelEntry:
    if name in _MODELS:
        return _MODELS[name]
    prefix, colon, _ = name.partition(":")
    family = _FAMILIES.get(prefix) if colon else None
    entry = family.resolve(name) if family else None
    if entry is None:
        families = "".join(f"; or {n}, {d}" for n, d in list_families())
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}{families} "
                        "(see `cnnlab models`)")
    return entry


def create_model(name: str, num_classes: int, image_size: int | None = None, **kwargs) -> nn.Module:
    """Build a registered model for `num_classes` classes at `image_size` pixels (default: its own)."""
    entry = get_entry(name)
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}; give it data (or --num-classes) "
                        "with two or more classes")
    if image_size is not None and image_size < 0:
        raise UserError(f"image size {image_size} is not a size in pixels; use a positive image size "
                        f"(0 = {name}'s own, {entry.default_size})")
    model = entry.fn(num_classes=num_classes, image_size=image_size or entry.default_size, **kwargs)
    model.model_name = name
    return model
