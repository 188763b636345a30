"""Models: every registered network trains a step; presets match the reports' tables."""

from __future__ import annotations

import pytest
import torch

from cnnlab.cli import main
from cnnlab.core.errors import UserError
from cnnlab.models import create_model, get_entry, list_families, list_models, register_prefix
from cnnlab.models.pretrained import is_transfer_name
from cnnlab.models.summary import summarize

TINY_LAYERS = [{"conv": 8}, "bn", "relu", "maxpool", "flatten", {"dense": 16}, "relu", {"dropout": 0.1}]


@pytest.mark.parametrize("name", [n for n in list_models() if not is_transfer_name(n)])
def test_forward_backward_no_nan(name):
    """The networks trained from scratch; pretrained backbones have tests/test_transfer.py."""
    kwargs = {"layers": TINY_LAYERS} if name == "custom" else {}
    size = min(get_entry(name).default_size, 64)
    model = create_model(name, 7, size, **kwargs)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.reset_head(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3


@pytest.mark.parametrize("name,classes,size,learnable,keras_total", [
    ("report000_cnn", 10, 32, 390_634, None),  # report 000's own sum
    ("report004_deep", 10, 32, 5_770_986, 5_772_970),  # report 004's table total (Keras counts BN statistics)
    ("report004_vgg", 10, 32, 28_334_410, 28_340_298),  # its table repeats a conv count on one BN row
    ("report001_cnn", 9, 256, 33_582_985, None),
    ("report003_cnn", 10, 32, 1_147_914, None),
])
def test_preset_parameter_counts(name, classes, size, learnable, keras_total):
    s = summarize(create_model(name, classes, size), size)
    assert s.params_total == learnable
    if keras_total:
        assert s.keras_total == keras_total


def test_report004_deep_rows_match_the_table():
    rows = summarize(create_model("report004_deep", 10, 32), 32).rows
    convs = [r.params for r in rows if r.kind == "Conv2d"]
    assert convs == [2432, 9248, 18496, 36928, 73856, 147584, 295168, 590080, 1180160, 2359808]
    assert [r.params for r in rows if r.kind == "Linear"] == [525312, 524800, 5130]


def test_summary_cli_prints_table_and_totals(capsys):
    assert main(["summary", "report000_cnn"]) == 0
    out = capsys.readouterr().out
    assert "total params: 390,634" in out and "[128, 4, 4]" in out and "trainable params: 390,634" in out


@pytest.mark.parametrize("layers,message", [
    ([{"convv": 3}, "flatten"], "unknown layer 'convv'"),
    ([{"conv": 8}, {"dense": 10}, "flatten"], "dense layers need flat input"),
    ([{"conv": 8}, "flatten", {"dense": {"units": 4, "in": 999}}], "expects 999 inputs but receives"),
    ([{"conv": 8}, "maxpool", "maxpool", "maxpool", "maxpool", "maxpool", "maxpool", "flatten"], "does not fit"),
    ([{"conv": {"filters": 8, "kernel": 4}}, "flatten"], "odd kernel"),
    ([{"conv": {"filters": 8, "dilation": 2}}, "flatten"], "no setting dilation"),
    ([{"conv": 8}], "needs a 'flatten' or 'gap'"),
    ([{"conv": -3}, "flatten"], "filters must be"),
    (["flatten", {"conv": 8}], "convolution after flatten"),
])
def test_bad_layer_lists_are_named_before_training(layers, message):
    with pytest.raises(UserError, match=message):
        create_model("custom", 10, 32, layers=layers)


def test_unknown_model_names_the_choices():
    with pytest.raises(UserError, match="report000_cnn") as e:
        create_model("resnet9000", 10)
    assert "timm:NAME" in str(e.value) and "tv:NAME" in str(e.value)  # and the families of names
    with pytest.raises(UserError, match="unknown model 'nosuch:x'.*timm:NAME"):
        get_entry("nosuch:x")


def test_prefix_families_resolve_through_the_registry():
    assert [n for n, _ in list_families()] == ["timm:NAME", "tv:NAME"]
    entry = get_entry("tv:resnet18")  # resolved on first use by pretrained.dynamic_entry, registered by prefix
    assert (entry.name, entry.default_size) == ("tv:resnet18", 224)
    with pytest.raises(UserError, match="timm has no model 'nosuch'"):
        get_entry("timm:nosuch")
    with pytest.raises(ValueError, match="twice"):
        register_prefix("timm", lambda name: None, "again")


def test_image_too_small_for_preset():
    with pytest.raises(UserError, match="image size 8"):
        create_model("report004_vgg", 10, 8)


def test_an_empty_build_takes_the_weights_it_is_given_and_initialises_the_rest():
    """create_model(empty=True) + load_state (how a run with ImageNet weights and `load_model` build): the
    backbone holds the file's tensors, dtype cast to the model's, and the new head is initialised, not left
    without values; the same weights in a model built the usual way give the same features."""
    from cnnlab.models.weights import load_backbone

    torch.manual_seed(0)
    usual = create_model("resnet18", 3, 64)
    state = {k: v.half() if v.is_floating_point() else v for k, v in usual.backbone.state_dict().items()}
    model = create_model("resnet18", 3, 64, empty=True)
    assert all(p.is_meta for p in model.parameters())
    load_backbone(model, state, "resnet18")
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    head = model.head[-1]
    assert head.weight.std() > 0 and head.weight.abs().max() <= 1 / 512 ** 0.5  # Linear's own initialisation
    usual.backbone.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval().features(x), usual.eval().features(x))


class _Scaled(torch.nn.Module):
    """A buffer made at build time and kept out of the state dict (persistent=False): no file fills it."""

    def __init__(self, num_classes, image_size):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)
        self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)


class _Computed(_Scaled):
    """Sizes computed from tensors while building, as torchvision's RegNets do (`.tolist()`): no meta build."""

    def __init__(self, num_classes, image_size):
        super().__init__(num_classes, image_size)
        self.widths = torch.arange(3).tolist()


@pytest.mark.parametrize("cls", [_Scaled, _Computed])
def test_an_empty_build_that_only_a_real_build_can_make_is_a_usual_build(cls, monkeypatch):
    """Such models are built with values, and load_state loads into them as load_state_dict does."""
    from cnnlab.models import registry

    monkeypatch.setitem(registry._MODELS, "only_real", registry.ModelEntry("only_real", cls, 8, "a real build"))
    model = create_model("only_real", 2, 8, empty=True)
    assert not model.scale.is_meta and torch.equal(model.scale, torch.full((3,), 2.0))
    assert registry.load_state(model, {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.ones(2)}) == ([], [])
    assert torch.equal(model.fc.weight, torch.zeros(2, 3)) and torch.equal(model.fc.bias, torch.ones(2))


def test_weights_of_another_network_on_an_empty_build_say_so():
    """No key of resnet18's file is convnext_tiny's: the message names the missing tensors, not a layer of
    convnext's that cannot initialise itself."""
    from cnnlab.models.weights import load_backbone

    state = create_model("resnet18", 3, 64, empty=True).state_dict()
    other = {k.removeprefix("backbone."): torch.zeros(v.shape) for k, v in state.items() if k.startswith("backbone.")}
    with pytest.raises(UserError, match=r"tensors missing .*is the file for another network"):
        load_backbone(create_model("tv:convnext_tiny", 3, 64, empty=True), other, "tv:convnext_tiny")


def test_a_weights_file_that_is_not_safetensors_is_one_clear_error(tmp_path):
    """A truncated or foreign model.safetensors (evaluate, serve, --from) says which folder, not a traceback."""
    from cnnlab.models.checkpoint import load_weights

    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=f"cannot load the model in {tmp_path}: SafetensorError"):
        load_weights(create_model("cnn_small", 3, 16, empty=True), tmp_path / "model.safetensors", "cnn_small")
