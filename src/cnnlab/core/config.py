"""Run configuration: frozen dataclasses, one per stage, validated once when loaded.

A config file is YAML with the sections `data`, `model` and `train` (plus `out` and `tag`);
`--set train.lr=0.05` style overrides are applied on top. Every key is type-checked against the
dataclass field and unknown keys are rejected with the list of valid ones, so a typo never
silently falls back to a default. Variants (sweeps) are `dataclasses.replace` copies.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnnlab.core.errors import UserError
from cnnlab.core.runs import RunFolder


@dataclass(frozen=True)
class DataConfig:
    # image folder, .zip/.tar(.gz) archive, or a dataset name (cifar10, digits); "" = CIFAR-10 where cnnlab
    # finds it, else an error; auto = the same, else the bundled digits (data/sources.py:default_data)
    path: str = ""
    image_size: int = 0  # square input side in pixels; 0 = the model's default, else the data's
    val_fraction: float = 0.1  # carved from train when the data ships train/ and test/
    test_fraction: float = 0.2  # with val_fraction 0.2 gives 60/20/20 when the data has no split
    split_file: str = ""  # reuse a split.csv from an earlier run
    split_seed: int = 0
    loader: str = "auto"  # auto | memory | stream
    memory_cap_mb: int = 4096  # decoded uint8 data above this streams from disk instead
    # crop, flip (random), flip_alternate (each image mirrored every other epoch), cutout, jitter (batched tensor ops)
    augment: tuple[str, ...] = ("crop", "flip")
    crop_padding: int = 4  # pixels of reflect padding for the random crop
    limit_per_class: int = 0  # keep at most this many images per class and split; 0 = all
    workers: int = 2  # decoding processes for the cache build and the streaming loader


@dataclass(frozen=True)
class ModelConfig:
    name: str = ""  # a registry name (`cnnlab models`); "" picks the default for the data
    layers: tuple[Any, ...] = ()  # layer list for name "custom" (see models/layers.py)
    # pretrained backbones (resnet18, efficientnet_lite0, timm:NAME, tv:NAME, ...; models/pretrained.py)
    pretrained: bool = False  # load ImageNet weights (found offline; models/weights.py)
    weights: str = ""  # an explicit .safetensors / .pth state dict for the backbone (implies pretrained)
    init: str = ""  # start from this run folder's trained model (e.g. fine-tune a frozen run)
    input_size: int = 0  # the backbone's input side; 0 = its pretrained size. Smaller images are upscaled inside
    head: str = "linear"  # linear | mlp (GAP -> Dense(head_hidden, relu) -> Dropout -> Dense, as the reports)
    head_hidden: int = 256
    dropout: float = 0.0  # before the last layer of the head
    bn: str = "frozen"  # frozen: backbone BatchNorm stays in inference mode | train: unfrozen blocks' BN update


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float | str = 1e-3  # or "auto": a learning-rate range test picks it (train/lr_find.py)
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0
    epochs: int = 10
    last_epoch_steps: int = 0  # the last epoch stops after this many steps (0 = a whole epoch): a time budget's plan
    batch_size: int = 64
    schedule: str = "constant"  # constant | step | exponential | cosine | onecycle
    warmup_epochs: float = 0.0  # linear warm-up from lr/100, in epochs (fractions allowed)
    step_epochs: int = 10  # step schedule: decay every this many epochs
    gamma: float = 0.1  # step / exponential decay factor (per step period / per epoch)
    label_smoothing: float = 0.0
    # 0 = off; else Lookahead (train/optim.py): every 5 steps the weights restart from slow ones that keep up to
    # this share of themselves (reached at the last step, ramped up from 0 as (step / steps)^3); airbench's 0.77
    lookahead: float = 0.0
    class_weights: str = "none"  # none | balanced (inverse class frequency)
    patience: int = 0  # early stopping: epochs without improvement; 0 = off
    monitor: str = "val_loss"  # val_loss | val_accuracy: picks the best epoch
    seed: int = 0
    deterministic: bool = False
    precision: str = "auto"  # auto (bf16 on GPUs and on CPUs with AMX/AVX512-BF16) | fp32 | bf16 | fp16 (GPU)
    threads: int = 0  # intra-op threads; 0 = all cores
    compile: bool = False  # torch.compile the training and validation passes (pays on GPUs; slower on small CPUs)
    eval_batch_size: int = 128  # evaluation ran 20-60% faster at 128 than at 512 on 2 cores (cache-sized activations)
    checkpoint_steps: int = 0  # also checkpoint every this many steps inside an epoch; 0 = at epoch ends only
    # e.g. 5m, 90s, 1h30m: the whole run, evaluation included, planned to end within it: cnnlab measures its
    # training rate here and picks the epochs (and, when no model is named, the fastnet width; train/budget.py)
    time_budget: str = ""
    # two phases for pretrained backbones: frozen (train.lr, train.epochs), then fine-tuning
    freeze: bool = False  # phase 1: backbone frozen, only the new head trains
    unfreeze: str = ""  # fine-tune the last N blocks or "all"; "" = no fine-tuning after a frozen phase
    finetune_lr: float = 0.0  # fine-tuning learning rate after a frozen phase; 0 = train.lr / 10
    finetune_epochs: int = 0  # 0 = train.epochs
    feature_cache: bool = True  # frozen phase: compute backbone features once and train the head on them
    feature_views: int = 2  # cached training views per image: 1 (as is) or 2 (plus its mirror image)
    feature_engine: str = "auto"  # auto (ONNX Runtime when it agrees with PyTorch) | onnx | torch


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs"  # root folder of run folders
    tag: str = ""  # appended to the run folder's name


CHOICES = {
    "data.loader": ("auto", "memory", "stream"),
    "train.optimizer": ("adam", "adamw", "sgd"),
    "train.schedule": ("constant", "step", "exponential", "cosine", "onecycle"),
    "train.class_weights": ("none", "balanced"),
    "train.monitor": ("val_loss", "val_accuracy"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.feature_engine": ("auto", "onnx", "torch"),
    "model.head": ("linear", "mlp"),
    "model.bn": ("frozen", "train"),
}
AUGMENTATIONS = ("crop", "flip", "flip_alternate", "cutout", "jitter")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config: {key} must be a list, got {value!r}")
        item_tp = typing.get_args(tp)[0]
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):  # the first member type that takes the value
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member, key)
            except UserError:
                continue
        raise UserError(f"config: {key} has an unusable value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"config: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"config: {key} must be a whole number, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"config: {key} must be a whole number, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"config: {key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"config: {key} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config: {key} must be text, got {value!r}")
        return "" if value is None else str(value)
    return value


def _build(cls: type, raw: dict, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"config: {prefix or 'the file'} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise UserError(f"config: unknown key '{full}'; use one of the valid keys: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}"""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


MAX_BUDGET_EPOCHS = 100  # the most epochs a time budget plans (train/budget.py) or grows a run to (train/loop.py)


def parse_duration(text: str) -> float | None:
    """Seconds in "300", "90s", "5m", "1.5h", "1h30m" (None when it is not a positive duration)."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", str(text))
    if not parts or not any(parts.groups()):
        return None
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    total = 3600 * hours + 60 * minutes + seconds
    return total if total > 0 else None


def validate(cfg: Config) -> Config:
    """Reject values no run could use, naming the field and the valid choices."""
    for key, choices in CHOICES.items():
        value = get_dotted(cfg, key)
        if value not in choices:
            raise UserError(f"config: {key} is {value!r}; choose one of {', '.join(choices)}")
    for aug in cfg.data.augment:
        if aug not in AUGMENTATIONS:
            raise UserError(f"config: data.augment has {aug!r}; choose from {', '.join(AUGMENTATIONS)}")
    if {"flip", "flip_alternate"} <= set(cfg.data.augment):
        raise UserError("config: data.augment has both flip and flip_alternate, which would undo each other's "
                        "mirror; keep one")
    t, d = cfg.train, cfg.data
    checks = [
        (t.lr == "auto" or (isinstance(t.lr, float) and t.lr > 0), f"train.lr must be above 0, or auto, got {t.lr!r}"),
        (t.epochs >= 1, "train.epochs must be at least 1"),
        (t.batch_size >= 1, "train.batch_size must be at least 1"),
        (t.eval_batch_size >= 1, "train.eval_batch_size must be at least 1"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
        (0 <= t.lookahead < 1, "train.lookahead must be in [0, 1) (0 = off)"),
        (t.weight_decay >= 0, "train.weight_decay must not be negative"),
        (t.patience >= 0, "train.patience must not be negative"),
        (t.warmup_epochs >= 0, "train.warmup_epochs must not be negative"),
        (t.last_epoch_steps >= 0, "train.last_epoch_steps must not be negative (0 = a whole last epoch)"),
        (t.step_epochs >= 1, "train.step_epochs must be at least 1"),
        (0 < t.gamma <= 1, "train.gamma must be in (0, 1]"),
        (t.threads >= 0, "train.threads must not be negative"),
        (t.checkpoint_steps >= 0, "train.checkpoint_steps must not be negative"),
        (not t.time_budget or parse_duration(t.time_budget) is not None,
         f"train.time_budget {t.time_budget!r} is not a duration; write it as 300, 90s, 5m, 1.5h or 1h30m"),
        (0 < d.val_fraction < 1, "data.val_fraction must be between 0 and 1"),
        (0 < d.test_fraction < 1, "data.test_fraction must be between 0 and 1"),
        (d.val_fraction + d.test_fraction < 1, "data.val_fraction + data.test_fraction must be below 1"),
        (d.image_size >= 0, "data.image_size must not be negative (0 = automatic)"),
        (d.crop_padding >= 0, "data.crop_padding must not be negative"),
        (d.limit_per_class >= 0, "data.limit_per_class must not be negative"),
        (d.memory_cap_mb >= 1, "data.memory_cap_mb must be at least 1"),
        (d.workers >= 0, "data.workers must not be negative"),
        (t.unfreeze in ("", "all") or t.unfreeze.isdigit(), "train.unfreeze must be a number of blocks or 'all'"),
        (t.finetune_lr >= 0, "train.finetune_lr must not be negative (0 = train.lr / 10)"),
        (t.finetune_epochs >= 0, "train.finetune_epochs must not be negative (0 = train.epochs)"),
        (t.feature_views in (1, 2), "train.feature_views must be 1 or 2"),
        (cfg.model.input_size >= 0, "model.input_size must not be negative (0 = the backbone's own)"),
        (cfg.model.head_hidden >= 1, "model.head_hidden must be at least 1"),
        (0 <= cfg.model.dropout < 1, "model.dropout must be in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            key = message.split()[0]
            shown = "" if "got" in message or " + " in message else f", got {get_dotted(cfg, key)!r}"
            raise UserError(f"config: {message}{shown}; fix it in the config file or with --set {key}=VALUE")
    return cfg


def parse_key(key: str) -> tuple[str, ...]:
    """The one reader of dotted keys: `train.lr` -> ('train', 'lr'), `out` -> ('out',); UserError for a bad key.

    Only the form is checked here (no empty parts); whether the key exists is checked when the config is built.
    """
    parts = tuple(part.strip() for part in str(key).split("."))
    if not all(parts):
        raise UserError(f"config key {key!r} is not a key; write it as section.name, e.g. train.lr (or out, tag)")
    return parts


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """`tree[section][name] = value` for the dotted `key` (parse_key), adding missing or empty sections in place.

    UserError where a part of the key already holds a value instead of a section (`train.lr.x`).
    """
    *sections, name = parse_key(key)
    node = tree
    for i, part in enumerate(sections):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"config key {key!r}: {'.'.join(sections[:i + 1])} is a value, not a section of keys")
    node[name] = value


def get_dotted(cfg: Any, key: str) -> Any:
    """The value at a dotted key of a Config (`get_dotted(cfg, "train.lr")`)."""
    node = cfg
    for part in parse_key(key):
        node = getattr(node, part)
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.05` -> ('train.lr', 0.05): the key checked by parse_key, the value read as YAML."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: write it as section.key=value, e.g. train.lr=0.01")
    key, _, value = text.partition("=")
    try:
        parse_key(key)
    except UserError as e:
        raise UserError(f"--set {text!r}: {e}") from None
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def apply_sets(tree: dict, sets: list[str] | tuple[str, ...]) -> dict:
    """Apply `--set section.key=value` strings to a raw config tree in place (and return it)."""
    for text in sets:
        key, value = parse_override(text)
        try:
            set_dotted(tree, key, value)
        except UserError as e:
            raise UserError(f"--set {text!r}: {e}") from None
    return tree


def read_yaml_mapping(path: str | Path, what: str, holds: str) -> dict:
    """A YAML file that must hold a mapping; every way it can be wrong is a UserError naming it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} not found" + ("; it is a folder, pass the YAML file in it" if p.is_dir()
                                                   else "; check the path"))
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{what} {p} is not valid YAML{where}: {problem}; fix the syntax there") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {p} is not a text file; pass a YAML file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} {p} must hold a mapping with {holds}, not a {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: dict | None = None, sets: list[str] = (),
                from_init: bool = False) -> Config:
    """Read a YAML config, apply nested `overrides` and `--set` strings, validate, return Config.

    Args:
        path: YAML file or None for the defaults.
        overrides: nested dict merged over the file (the CLI's flags).
        sets: `section.key=value` strings applied last.
        from_init: a new run's config (train, lr-find; not a resume, not a saved config.yaml read again): with
            model.init (--from RUN), the keys in CONTINUED that nothing here names come from RUN's config.yaml.
    """
    raw = read_yaml_mapping(path, "config file", "data/model/train sections") if path else {}
    tree = apply_sets(merge(raw, overrides or {}), sets)
    init = tree.get("model", {}).get("init") if from_init and isinstance(tree.get("model"), dict) else None
    if init:
        saved = RunFolder(str(init)).saved_config("--from")
        tree = merge({s: {k: saved[s][k] for k in keys if k in saved.get(s, {})} for s, keys in CONTINUED.items()},
                     tree)
    return config_from_dict(tree)


CONTINUED = {"data": ("path", "image_size"), "model": ("name", "input_size", "head", "head_hidden", "dropout", "bn")}


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, section by section, as new dicts (neither argument is changed)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif isinstance(v, dict):
            out[k] = merge({}, v)
        else:
            out[k] = v
    return out


def config_to_dict(cfg: Config) -> dict:
    def plain(x):
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_from_dict(raw: dict) -> Config:
    """Validate a raw config dict; the model's recipe (core/recipes.py) fills what it leaves out."""
    from cnnlab.core.recipes import recipe_for

    return validate(_build(Config, merge(recipe_for(raw), raw), ""))
