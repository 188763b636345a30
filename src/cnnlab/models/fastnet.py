"""The fast networks for small images: few, wide 3x3 stages chosen for accuracy per FLOP.

The ideas are the published ones of the fast CIFAR-10 recipes (airbench, ResNet-9 "DAWNBench"):
a fixed 2x2 patch-whitening first layer initialised from the training images, three stages of
conv-pool-BN-GELU-conv-BN-GELU, global max pooling, a linear head with scaled-down logits, and
flip test-time augmentation built into the model's eval mode, so validation, test, export and
serving all see the same function. The recipe that trains them lives in core/recipes.py.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.models.registry import register_model


class _Stage(nn.Sequential):
    def __init__(self, cin: int, cout: int, momentum: float):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout, momentum=momentum),
            nn.GELU(), nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, momentum=momentum),
            nn.GELU())


class FastNet(nn.Module):
    """Whitening stem -> 3 stages -> global max pool -> linear; eval averages x and its mirror."""

    def __init__(self, num_classes: int, widths=(64, 256, 256), tta: bool = True, bn_momentum: float = 0.4,
                 logit_scale: float = 1 / 9):
        super().__init__()
        self.num_classes, self.tta, self.logit_scale = num_classes, tta, logit_scale
        stem = 24  # 12 whitening directions of the 2x2x3 patches, each with both signs
        self.whiten = nn.Conv2d(3, stem, 2, bias=True)
        self.whiten.weight.requires_grad_(False)  # fixed once set from the data; its bias trains
        chans = (stem, *widths)
        self.stages = nn.Sequential(*[_Stage(chans[i], chans[i + 1], bn_momentum) for i in range(len(widths))])
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)  # scale fixed at 1: the next conv learns it anyway

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(nn.functional.gelu(self.whiten(x)))
        return self.head(x.amax((2, 3))) * self.logit_scale  # global max pool (AdaptiveMaxPool2d has no
        # deterministic CUDA backward, so --deterministic would refuse it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.tta:
            return self._logits(x)
        return 0.5 * (self._logits(x) + self._logits(x.flip(3)))

    def explain_layers(self) -> list[str]:
        """The layers a class-activation map may be taken at, in order: each stage's output."""
        return [f"stages.{i}" for i in range(len(self.stages))]

    def reset_head(self, num_classes: int) -> None:
        """A new classifier for `num_classes` (fine-tuning a trained FastNet on other classes)."""
        self.head = nn.Linear(self.head.in_features, num_classes, bias=False)
        self.num_classes = num_classes

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to whiten 2x2 patches of `x` (normalised training images, N x 3 x H x W)."""
        c, k = x.shape[1], 2
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov.double())
        filters = (eigvec.T / (eigval.clamp_min(0) + eps).sqrt()[:, None]).float().view(-1, c, k, k)
        n = self.whiten.out_channels // 2
        self.whiten.weight.copy_(torch.cat([filters[-n:], -filters[-n:]]))  # the n largest directions, +/-
        self.whiten.bias.zero_()


FAST_PRESETS = {  # name: (stage widths, description); forward GFLOPs per 32 px image in brackets
    "fastnet": ((32, 64, 128), "fast CNN, the default for small images: whitening stem, 3 stages 32/64/128, "
                               "flip TTA (0.04 GFLOPs)"),
    "fastnet_m": ((64, 128, 256), "fast CNN, medium: 3 stages 64/128/256 (0.13 GFLOPs)"),
    "fastnet_l": ((64, 256, 256), "fast CNN, large: 3 stages 64/256/256, airbench94's widths (0.24 GFLOPs)"),
}


def _register(name: str, widths: tuple, description: str) -> None:
    def build(num_classes, image_size, tta=True):
        return FastNet(num_classes, widths, tta=tta)

    build.__name__ = name
    register_model(default_size=32, description=description)(build)


for _name, (_widths, _description) in FAST_PRESETS.items():
    _register(_name, _widths, _description)
