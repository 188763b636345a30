"""The one model registry: `@register_model` fills a dict, `create_model` is the only builder.

Entries are plain functions `fn(num_classes, image_size, **kwargs) -> nn.Module`, registered by
the explicit imports in `models/__init__.py`. A duplicate name is a bug and raises. Names of the
form `timm:ARCH` / `tv:ARCH` are any timm or torchvision network (models/pretrained.py).
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


_MODELS: dict[str, ModelEntry] = {}


def register_model(default_size: int, description: str):
    def wrap(fn):
        add_entry(ModelEntry(fn.__name__, fn, default_size, description))
        return fn

    return wrap


def add_entry(entry: ModelEntry) -> None:
    if entry.name in _MODELS:
        raise ValueError(f"model {entry.name!r} is registered twice")
    _MODELS[entry.name] = entry


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        from cnnlab.models.pretrained import dynamic_entry

        entry = dynamic_entry(name)
        if entry is None:
            raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}, "
                            "or timm:NAME / tv:NAME for any timm or torchvision network (see `cnnlab models`)")
        return entry
    return _MODELS[name]


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
