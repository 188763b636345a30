"""`cnnlab summary`: a per-layer table (layer, output shape, parameters) like Keras' summary.

Output shapes come from one forward pass of a dummy batch through hooks on the leaf modules.
Besides learnable parameters it counts BatchNorm running statistics, which Keras lists as
"non-trainable params", so totals can be compared with Keras-made tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cnnlab.core.errors import UserError


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple
    params: int


@dataclass(frozen=True)
class ModelSummary:
    rows: tuple[LayerRow, ...]
    params_total: int  # learnable parameters
    params_trainable: int
    bn_running_stats: int  # running mean + var values (Keras counts them as non-trainable params)

    @property
    def keras_total(self) -> int:
        return self.params_total + self.bn_running_stats


def count_params(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def summarize(model: nn.Module, image_size: int, in_channels: int = 3) -> ModelSummary:
    rows, hooks = [], []
    for name, module in model.named_modules():
        if list(module.children()):
            continue

        def hook(mod, inp, out, name=name):
            if any(r.name == name for r in rows):  # a second call (FastNet's mirror-image pass) adds no layer
                return
            rows.append(LayerRow(name, type(mod).__name__, tuple(out.shape[1:]),
                                 sum(p.numel() for p in mod.parameters(recurse=False))))

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, image_size, image_size))
    except RuntimeError as e:  # a layer's kernel or pool does not fit what is left of the image
        name = getattr(model, "model_name", type(model).__name__)
        raise UserError(f"model {name} cannot run on {image_size}x{image_size} images "
                        f"({str(e).strip().splitlines()[0][:200]}); use a larger image size") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    total, trainable = count_params(model)
    bn = sum(m.running_mean.numel() + m.running_var.numel() for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None)
    return ModelSummary(tuple(rows), total, trainable, bn)


def format_summary(name: str, s: ModelSummary, image_size: int) -> str:
    lines = [f"model: {name} (input 3x{image_size}x{image_size})",
             f"{'layer':<22}{'type':<20}{'output shape':<22}{'params':>12}", "-" * 76]
    for r in s.rows:
        lines.append(f"{r.name:<22}{r.kind:<20}{str(list(r.output_shape)):<22}{r.params:>12,}")
    lines += ["-" * 76,
              f"total params: {s.params_total:,}",
              f"trainable params: {s.params_trainable:,}",
              f"non-trainable params: {s.params_total - s.params_trainable:,}",
              f"BatchNorm running statistics: {s.bn_running_stats:,} "
              f"(Keras counts these as params: Keras-style total {s.keras_total:,})"]
    return "\n".join(lines)
