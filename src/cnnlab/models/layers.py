"""Networks from a list of layers, checked for shape before anything trains.

A layer is a name (`bn`, `relu`, `flatten`, `gap`) or a one-key mapping with its settings:

    - conv: {filters: 32, kernel: 5, padding: 2, bias: false}   # or conv: 32 (3x3, same)
    - maxpool: 2            # or avgpool; {size: 2, stride: 2}
    - dropout: 0.5
    - dense: 64             # or {units: 64, in: 2048} to state the expected input
    - activation names: relu, gelu, silu, leaky_relu, tanh, sigmoid

Everything up to the last `flatten`/`gap` is the backbone; the rest plus a final
Linear(num_classes) is the head. Shapes are tracked through the list, so a wrong `in`, a pool
larger than its input, or a dense layer before flattening is reported with its index.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnlab.core.errors import UserError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh,
               "sigmoid": nn.Sigmoid}
LAYER_TYPES = ("conv", "bn", "maxpool", "avgpool", "dropout", "flatten", "gap", "dense", *ACTIVATIONS)


class LayerNet(nn.Module):
    """`backbone` -> flat features -> `head` (whose last layer is the classifier)."""

    def __init__(self, backbone: nn.Sequential, head: nn.Sequential, num_classes: int):
        super().__init__()
        self.backbone, self.head, self.num_classes = backbone, head, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def reset_head(self, num_classes: int) -> None:
        """Replace the final classifier for `num_classes` (transfer learning)."""
        last = self.head[-1]
        self.head[-1] = nn.Linear(last.in_features, num_classes)
        self.num_classes = num_classes

    def explain_layers(self) -> list[str]:
        """The layers a class-activation map may be taken at, in order: each layer's output but a bare
        convolution's or normalisation's (taken before their activation)."""
        return [f"backbone.{i}" for i, m in enumerate(self.backbone) if not isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]


def _parse(spec: Any, where: str) -> tuple[str, dict]:
    if isinstance(spec, str):
        kind, args = spec, {}
    elif isinstance(spec, dict) and len(spec) == 1:
        kind, args = next(iter(spec.items()))
        if kind not in LAYER_TYPES:
            raise UserError(f"{where}: unknown layer {kind!r}; valid layers: {', '.join(LAYER_TYPES)}")
        if args is None:
            args = {}
        elif not isinstance(args, dict):
            shorthand = {"conv": "filters", "maxpool": "size", "avgpool": "size", "dropout": "p", "dense": "units"}
            if kind not in shorthand:
                raise UserError(f"{where}: {kind} takes no value; write it as '{kind}'")
            args = {shorthand[kind]: args}
    else:
        raise UserError(f"{where}: write a layer as a name or a one-key mapping, got {spec!r}")
    if kind not in LAYER_TYPES:
        raise UserError(f"{where}: unknown layer {kind!r}; valid layers: {', '.join(LAYER_TYPES)}")
    return kind, dict(args)


def _take(args: dict, where: str, kind: str, **defaults) -> list:
    unknown = set(args) - set(defaults)
    if unknown:
        raise UserError(f"{where}: {kind} has no setting {', '.join(sorted(unknown))}; valid: {', '.join(defaults)}")
    out = []
    for k, d in defaults.items():
        v = args.get(k, d)
        if v is None and d is None and k not in ("stride", "in", "padding"):
            raise UserError(f"{where}: {kind} needs '{k}'")
        out.append(v)
    return out


def _positive_int(v, where, name):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"{where}: {name} must be a whole number above 0, got {v!r}")
    return v


def build_layers(specs: list, num_classes: int, image_size: int, in_channels: int = 3) -> LayerNet:
    """Build and shape-check a LayerNet from layer specs (see the module docstring)."""
    # Over 60 lines on purpose: one branch per layer kind, a table to read rather than a flow.
    if not specs:
        raise UserError("model.layers is empty; list layers or pick a preset with --model (see `cnnlab models`)")
    parsed = [_parse(s, f"model.layers[{i}]") for i, s in enumerate(specs)]
    flat_at = max((i for i, (k, _) in enumerate(parsed) if k in ("flatten", "gap")), default=None)
    if flat_at is None:
        raise UserError("model.layers needs a 'flatten' or 'gap' layer between the convolutions and the dense layers")
    c, h, w, flat = in_channels, image_size, image_size, None
    backbone, head = [], []
    for i, (kind, args) in enumerate(parsed):
        where = f"model.layers[{i}] ({kind})"
        target = backbone if i <= flat_at else head
        if kind == "conv":
            if flat is not None:
                raise UserError(f"{where}: a convolution after flatten/gap has no image to work on")
            filters, kernel, stride, padding, bias = _take(args, where, kind, filters=None, kernel=3, stride=1,
                                                           padding="same", bias=True)
            filters, kernel, stride = (_positive_int(filters, where, "filters"), _positive_int(kernel, where, "kernel"),
                                       _positive_int(stride, where, "stride"))
            if padding == "same":
                if kernel % 2 == 0:
                    raise UserError(f"{where}: padding 'same' needs an odd kernel; give padding as a number")
                padding = kernel // 2
            elif padding == "valid":
                padding = 0
            elif isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
                raise UserError(f"{where}: padding must be 'same', 'valid' or a number of pixels, got {padding!r}")
            h, w = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
            if h < 1 or w < 1:
                raise UserError(f"{where}: the input is too small for a {kernel}x{kernel} kernel at image size "
                                f"{image_size}; use a larger data.image_size or fewer layers")
            target.append(nn.Conv2d(c, filters, kernel, stride, padding, bias=bool(bias)))
            c = filters
        elif kind == "bn":
            _take(args, where, kind)
            target.append(nn.BatchNorm2d(c) if flat is None else nn.BatchNorm1d(flat))
        elif kind in ("maxpool", "avgpool"):
            if flat is not None:
                raise UserError(f"{where}: pooling after flatten/gap has no image to work on")
            size, stride = _take(args, where, kind, size=2, stride=None)
            size = _positive_int(size, where, "size")
            stride = _positive_int(stride or size, where, "stride")
            if h < size or w < size:
                raise UserError(f"{where}: a {size}x{size} pool does not fit the {h}x{w} feature map at image size "
                                f"{image_size}; use a larger data.image_size or fewer pooling layers")
            h, w = (h - size) // stride + 1, (w - size) // stride + 1
            target.append((nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d)(size, stride))
        elif kind == "dropout":
            (p,) = _take(args, where, kind, p=0.5)
            if not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise UserError(f"{where}: p must be in [0, 1), got {p!r}")
            target.append(nn.Dropout(float(p)) if flat is not None else nn.Dropout2d(float(p)))
        elif kind == "flatten":
            _take(args, where, kind)
            if flat is not None:
                raise UserError(f"{where}: the features are already flat")
            flat = c * h * w
            target.append(nn.Flatten())
        elif kind == "gap":
            _take(args, where, kind)
            if flat is not None:
                raise UserError(f"{where}: the features are already flat")
            flat = c
            target += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        elif kind == "dense":
            if flat is None:
                raise UserError(f"{where}: dense layers need flat input; add 'flatten' or 'gap' before it")
            units, expected, bias = _take(args, where, kind, units=None, **{"in": None}, bias=True)
            units = _positive_int(units, where, "units")
            if expected is not None and expected != flat:
                raise UserError(f"{where}: expects {expected} inputs but receives {flat} at image size {image_size}")
            target.append(nn.Linear(flat, units, bias=bool(bias)))
            flat = units
        else:  # activation
            kw = _take(args, where, kind, **({"slope": 0.01} if kind == "leaky_relu" else {}))
            target.append(ACTIVATIONS[kind](*kw))
    head.append(nn.Linear(flat, num_classes))
    return LayerNet(nn.Sequential(*backbone), nn.Sequential(*head), num_classes)
