"""The one model registry: `@register_model` fills a dict, `create_model` is the only builder.

Entries are plain functions `fn(num_classes, image_size, **kwargs) -> nn.Module`, registered by
the explicit imports in `models/__init__.py`. A duplicate name is a bug and raises. A family of
names `PREFIX:NAME` is resolved on first use by the function registered for PREFIX with
`register_prefix` (models/__init__.py registers `timm:` and `tv:` from models/pretrained.py), so
this module imports no model module.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Callable

import torch
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


def create_model(name: str, num_classes: int, image_size: int | None = None, *, empty: bool = False,
                 **kwargs) -> nn.Module:
    """Build a registered model for `num_classes` classes at `image_size` pixels (default: its own).

    `empty`: for weights loaded next with `load_state`, the tensors are made on the meta device, without
    values: a random initialisation that the weights replace costs seconds for a large network (vgg16's
    138 million parameters: 4 s here). A model that only a real build makes (`_empty`) is built as usual."""
    entry = get_entry(name)
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}; give it data (or --num-classes) "
                        "with two or more classes")
    if image_size is not None and image_size < 0:
        raise UserError(f"image size {image_size} is not a size in pixels; use a positive image size "
                        f"(0 = {name}'s own, {entry.default_size})")
    args = {"num_classes": num_classes, "image_size": image_size or entry.default_size, **kwargs}
    model = _empty(entry, args) if empty else None
    if model is None:
        model = entry.fn(**args)
    model.model_name = name
    return model


def _empty(entry: ModelEntry, args: dict) -> nn.Module | None:
    """The model with its tensors on the meta device; None where only a real build makes it: a buffer kept
    out of the state dict (nothing would fill it), or a builder that computes from tensors (torchvision's
    RegNets derive their widths with `.tolist()`)."""
    try:
        with torch.device("meta"):
            model = entry.fn(**args)
    except UserError:
        raise
    except Exception:  # noqa: BLE001  (any failure of a meta build: the real build says what is wrong)
        return None
    return None if {n for n, _ in model.named_buffers()} - set(model.state_dict()) else model


def load_state(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """`module.load_state_dict(state, strict=False)`, also for a model built with `create_model(empty=True)`:
    there the file's tensors (cast to the model's dtypes) become the model's, and a layer the state gives
    nothing (a new head) is initialised as a build would. A layer the state fills only in part, or that cannot
    initialise itself, stays without values: its keys are in `missing`, which every caller refuses."""
    if not any(t.is_meta for t in chain(module.parameters(), module.buffers())):
        return module.load_state_dict(state, strict=False)
    own = module.state_dict()
    state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    for name, layer in module.named_modules():
        prefix = f"{name}." if name else ""
        keys = [prefix + k for k, _ in chain(layer.named_parameters(recurse=False), layer.named_buffers(recurse=False))]
        if keys and hasattr(layer, "reset_parameters") and not any(k in state for k in keys):
            layer.to_empty(device="cpu", recurse=False)
            layer.reset_parameters()
    return missing, unexpected
