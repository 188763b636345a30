"""Config: typed, validated once, unknown keys and bad values named."""

from __future__ import annotations

import dataclasses

import pytest

from cnnlab.core.config import Config, dump_config, load_config, parse_key, set_dotted
from cnnlab.core.errors import UserError


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: {path: somewhere, augment: [flip]}\ntrain: {lr: 0.01, epochs: 3}\n")
    cfg = load_config(f, {"train": {"epochs": 5}}, ["train.lr=0.05", "model.name=report000_cnn", "train.nesterov=true"])
    assert cfg.train.lr == 0.05 and cfg.train.epochs == 5 and cfg.data.augment == ("flip",)
    assert cfg.model.name == "report000_cnn" and cfg.train.nesterov is True
    plain = load_config(None, {"model": {"name": "report000_cnn"}})  # a network without a recipe: the defaults
    assert dataclasses.replace(plain, model=Config().model) == Config()
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize("sets,message", [
    (["train.lrr=0.1"], "unknown key 'train.lrr'"),
    (["train.epochs=ten"], "train.epochs must be a whole number"),
    (["train.optimizer=adagrad"], "choose one of adam, adamw, sgd"),
    (["train.lr=-1"], "train.lr must be above 0"),
    (["data.augment=[rotate]"], "choose from crop"),
    (["data.augment=[flip, flip_alternate]"], "both flip and flip_alternate"),
    (["nosection"], "section.key=value"),
    (["train..lr=1"], "'train..lr' is not a key"),
    (["=1"], "is not a key"),
    (["data.val_fraction=0.9"], "must be below 1"),
])
def test_bad_values_are_named(sets, message):
    with pytest.raises(UserError, match=message):
        load_config(None, None, sets)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize("setting,shown", [("train.epochs=0", "train.epochs must be at least 1, got 0"),
                                           ("model.dropout=1.5", "model.dropout must be in [0, 1), got 1.5"),
                                           ("data.workers=-2", "data.workers must not be negative, got -2")])
def test_an_invalid_value_is_shown_with_what_to_do(setting, shown):
    with pytest.raises(UserError) as e:
        load_config(None, None, [setting])
    assert shown in str(e.value) and f"--set {setting.split('=')[0]}=VALUE" in str(e.value)


def test_one_reader_of_dotted_keys():
    assert parse_key("train.lr") == ("train", "lr") and parse_key("out") == ("out",)
    for bad in ("", "train.", ".lr", "train..lr"):
        with pytest.raises(UserError, match="is not a key"):
            parse_key(bad)
    tree = {"data": None, "train": {"epochs": 3}}  # an empty section in YAML reads as None
    set_dotted(tree, "data.path", "x")
    set_dotted(tree, "train.lr", 0.1)
    set_dotted(tree, "tag", "t")
    assert tree == {"data": {"path": "x"}, "train": {"epochs": 3, "lr": 0.1}, "tag": "t"}
    with pytest.raises(UserError, match="tag is a value"):
        set_dotted(tree, "tag.x", 1)
    assert load_config(None, None, ["data.path=x", "out=elsewhere"]).out == "elsewhere"
