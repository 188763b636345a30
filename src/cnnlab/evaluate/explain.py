"""Class-activation maps: which pixels the network's answer for a class rests on.

The methods are torchcam's (`METHODS`). It was chosen over pytorch-grad-cam and captum in a one-off
comparison on fastnet and report000_cnn (2026-12-01, not a recorded benchmark): the three libraries'
Grad-CAM maps agreed to a correlation of 0.9999; pytorch-grad-cam took about twice torchcam's time
for a batch of maps and pulls in OpenCV (153 MB installed); captum, as fast, offers Grad-CAM only;
torchcam needs nothing beyond torch, numpy and Pillow, has the methods people ask for by name
(Grad-CAM, Grad-CAM++, XGradCAM, LayerCAM, Smooth Grad-CAM++, Score-CAM) and had a release in 2026.

A map is computed on the function the model serves:
- in eval mode, so BatchNorm uses its running statistics (a frozen pretrained backbone's included)
  and nothing in the model changes;
- a model with flip test-time augmentation built in (`model.tta`, FastNet) averages its logits over
  the image and its mirror; its map sums the two views' maps, the mirror's turned back, which is
  what Grad-CAM of that average is (for the other methods, the same construction);
- a network that resizes its input inside (pretrained backbones at 224 px on 32 px images) gets
  its map drawn on the input it was given: maps are upsampled from the target layer to the input.
The target layer is chosen per family: each model offers its candidates (`explain_layers()`: FastNet
its stages, a layer list its layers, a pretrained network its backbone's blocks), and the default is
the deepest whose output is still a grid of at least 6 x 6 cells: the last block of every timm and
torchvision backbone at 224 px (7 x 7), and for the small networks on 32 px images the stage before
the last (FastNet's last stage is 3 x 3, too coarse to say where in the image the evidence is: in a
trial on coloured 10 px squares its maps held less than half as much of their mass in the square as
the stage before; benchmarks/explain.py records the default layer's scores).
"""

from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchcam import methods

from cnnlab.core.errors import UserError
from cnnlab.data.augment import to_model_input

METHODS = {"gradcam": methods.GradCAM, "gradcam++": methods.GradCAMpp, "xgradcam": methods.XGradCAM,
           "layercam": methods.LayerCAM, "smoothgradcam++": methods.SmoothGradCAMpp, "scorecam": methods.ScoreCAM}
DEFAULT_METHOD = "gradcam"
MIN_GRID = 6  # cells a side: a 3 x 3 grid cannot say where the evidence is; 6 x 6 (a stride-32 backbone at 192 px) can


@dataclass(frozen=True)
class Explanation:
    """One image's map: `image` (uint8 3 x S x S, what the model saw), `cam` (float S x S in [0, 1]) for the
    class `target`, with the method and layer that made it."""

    image: np.ndarray
    cam: np.ndarray
    target: int
    method: str
    layer: str


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"explanation method {method!r} is not one of {', '.join(METHODS)}")
    return method


def target_layer(model: torch.nn.Module, image_size: int, layer: str | None = None) -> str:
    """The module whose activations are mapped: `layer` (a name of `model.named_modules()`) or the default:
    of the layers the model's family offers (`model.explain_layers()`; any module for another model), the
    deepest whose output is a grid of at least `MIN_GRID` cells a side, else the finest grid there is."""
    names = dict(model.named_modules())
    if layer:
        if layer not in names:
            offered = _offered(model)[-5:]
            raise UserError(f"layer {layer!r} is not a module of {type(model).__name__}; name one of "
                            f"`model.named_modules()`, e.g. {', '.join(offered)}")
        return layer
    grids = _grids(model, image_size, _offered(model))
    if not grids:
        raise UserError(f"{type(model).__name__} has no layer with a spatial output to map; pass a layer name")
    fine = [name for name, side in grids if side >= MIN_GRID]
    return fine[-1] if fine else max(grids, key=lambda g: g[1])[0]


def _offered(model: torch.nn.Module) -> list[str]:
    if hasattr(model, "explain_layers"):
        return model.explain_layers()
    return [n for n, m in model.named_modules() if n and not isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]


def _grids(model: torch.nn.Module, image_size: int, offered: list[str]) -> list[tuple[str, int]]:
    """(name, grid side) of each offered module whose output is an (N, C, H, W) grid larger than 1 x 1, in the
    order they finish on one forward pass; a module called more than once counts at its last call."""
    seen: dict[str, int] = {}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(lambda mod, i, out, name=name: _note(seen, name, out))
             for name in offered]
    try:
        with _served(model), torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=_device(model)))
    finally:
        for h in hooks:
            h.remove()
    return list(seen.items())


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _note(seen: dict, name: str, out) -> None:
    if isinstance(out, torch.Tensor) and out.dim() == 4 and min(out.shape[-2:]) > 1:
        seen.pop(name, None)  # re-inserted: the order is that of the last call
        seen[name] = min(out.shape[-2:])


@contextlib.contextmanager
def _served(model: torch.nn.Module):
    """The model in eval mode (and TTA off: the views are taken by hand), restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    tta = getattr(model, "tta", None)
    model.eval()
    if tta is not None:
        model.tta = False
    try:
        yield bool(tta)
    finally:
        for m, training in modes:
            m.training = training
        if tta is not None:
            model.tta = tta


@contextlib.contextmanager
def _any_kernels():
    """Deterministic mode off while mapping: after a `--deterministic` training it is still on, and CUDA has no
    deterministic backward for the adaptive pooling of most backbones (the map is not trained on anyway)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)


def class_maps(model: torch.nn.Module, x: torch.Tensor, targets: list[int], method: str = DEFAULT_METHOD,
               layer: str | None = None) -> tuple[np.ndarray, str]:
    """Maps (N, S, S) in [0, 1] of class `targets[i]` for normalised inputs `x` (N, 3, S, S), and the layer used."""
    check_method(method)
    name = target_layer(model, x.shape[-1], layer)
    with _served(model) as tta, _any_kernels():
        views = [False, True] if tta else [False]
        total = torch.zeros(len(x), *x.shape[-2:])
        for mirrored in views:
            cam = _view_map(model, x.flip(3) if mirrored else x, targets, method, name)
            total += cam.flip(2) if mirrored else cam  # the mirror's map turned back onto the image
    peak = total.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (total / peak).numpy(), name


def _view_map(model, x: torch.Tensor, targets: list[int], method: str, name: str) -> torch.Tensor:
    """One view's unnormalised map, upsampled to the input's size."""
    x = x.detach().float().to(_device(model)).requires_grad_(True)  # so a frozen backbone passes gradients too
    with METHODS[method](model, name, input_shape=tuple(x.shape[1:])) as extractor, torch.enable_grad():
        cam = extractor(list(map(int, targets)), model(x), normalized=False)[0].detach().float().cpu()
    cam = torch.nan_to_num(cam.clamp_min(0))  # a method's ReLU; Score-CAM's softmax weights may leave -0 or NaN
    return F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].clamp_min(0)


def explain_arrays(model: torch.nn.Module, arrays: list[np.ndarray], mean, std, targets: list[int],
                   method: str = DEFAULT_METHOD, layer: str | None = None) -> list[Explanation]:
    """Maps for decoded images (uint8 3 x S x S, as `Predictor.decode` gives them) and one class each."""
    if not arrays:
        return []
    x = to_model_input(torch.from_numpy(np.stack(arrays)), mean, std)
    cams, name = class_maps(model, x, targets, method, layer)
    return [Explanation(a, c, int(t), method, name) for a, c, t in zip(arrays, cams, targets)]


def overlay(image: np.ndarray, cam: np.ndarray, side: int | None = None, alpha: float = 0.5) -> np.ndarray:
    """HxWx3 uint8: the image (3 x S x S) at `side` pixels (default `display_side(S)`) with the map over it in
    the jet colours."""
    picture = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    side = side or display_side(picture.width)
    picture = picture.resize((side, side), Image.Resampling.BICUBIC)
    heat = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    colours = _jet()[np.asarray(heat)]
    return (np.asarray(picture, np.float32) * (1 - alpha) + colours * alpha).round().clip(0, 255).astype(np.uint8)


@functools.cache
def _jet() -> np.ndarray:
    """matplotlib's jet colours as a 256 x 3 table, made once (looking a colormap up copies it)."""
    from matplotlib import colormaps  # the colour table only; no figure

    return (colormaps["jet"](np.arange(256) / 255.0)[:, :3] * 255).astype(np.float32)


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG at zlib level 1: a 192 px map encoded in 8 ms instead of 12 here (the default level 6)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def display_side(image_size: int) -> int:
    """How large a map is drawn: small images enlarged to at least 192 px, so the grid can be seen."""
    return max(image_size, 192)
