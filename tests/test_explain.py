"""Class-activation maps: where they fall, that they depend on what the network learned, that they are
computed on the function the model serves, and `cnnlab explain` as a user calls it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr
from squares import COLOURS, mass_inside, write_squares

from cnnlab import api
from cnnlab.cli import main
from cnnlab.data.augment import to_model_input
from cnnlab.data.decode import load_array
from cnnlab.evaluate.explain import METHODS, class_maps, explain_arrays, target_layer
from cnnlab.evaluate.predict import Predictions, Predictor
from cnnlab.models import create_model
from cnnlab.models.checkpoint import load_model

SIZE, SIDE = 32, 14  # the square covers 19% of the image
AREA = SIDE * SIDE / SIZE**2


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """fastnet (flip TTA built in, the default recipe) trained on coloured squares: (run, data root, boxes)."""
    root = tmp_path_factory.mktemp("squares")
    boxes = write_squares(root / "data", {"train": 150, "test": 30}, SIZE, SIDE)
    code = main(["train", "--data", str(root / "data"), "--model", "fastnet", "--epochs", "8", "--precision", "fp32",
                 "--out", str(root / "runs"), "--no-progress"])
    assert code == 0
    (run,) = (root / "runs").iterdir()
    return run, root / "data", {k: v for k, v in boxes.items() if k.startswith("test/")}


def _maps(model, predictor, data, paths, targets=None):
    arrays = [predictor.decode(data / p) for p in paths]
    if targets is None:
        targets = list(predictor.predict_arrays(arrays).argmax(1))
    return explain_arrays(model, arrays, predictor.mean, predictor.std, targets)


def test_maps_fall_inside_the_square(squares):
    """The localisation check: the class is the square's colour, so the map's mass belongs in the square."""
    run, data, boxes = squares
    predictor = Predictor.load(run, engine="torch")
    paths = list(boxes)
    maps = _maps(predictor.model, predictor, data, paths)
    assert maps[0].layer == "stages.1"  # FastNet's default: its last stage with a 7 x 7 grid at 32 px
    mass = np.array([mass_inside(m.cam, boxes[p], SIZE) for m, p in zip(maps, paths)])
    peak_inside = np.mean([mass_inside((m.cam >= m.cam.max()).astype(float), boxes[p], SIZE) > 0.5
                           for m, p in zip(maps, paths)])
    assert (mass > 2 * AREA).mean() >= 0.75, f"mass inside the square per image: {np.round(mass, 2)}"
    assert peak_inside >= 0.9


def test_a_fastnet_run_exports_with_its_tta(squares, tmp_path, capsys):
    """`export --check` of the default network (flip TTA built in): the ONNX graph must hold the TTA, or every
    probability differs from evaluation's and the check fails. The mirror pass shares its weights with the
    first, which the exporter writes as aliases the int8 quantizer cannot read without ONNX Runtime's
    pre-processing: the bundle must still hold an int8 model."""
    run, data, boxes = squares
    code = main(["export", str(run), "--out", str(tmp_path / "bundle"), "--check"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "bundle" / "model.onnx").is_file()
    int8 = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["engines"]["int8"]
    assert "error" not in int8 and (tmp_path / "bundle" / "model.int8.onnx").is_file(), int8


def test_maps_of_the_trained_model_differ_from_random_weights(squares):
    """Adebayo et al. (2018): a map that does not change when the weights are randomised says nothing about
    what was learned. The same architecture with random weights must give other maps, that do not localise."""
    run, data, boxes = squares
    predictor = Predictor.load(run, engine="torch")
    paths = list(boxes)
    targets = list(predictor.predict_proba([data / p for p in paths]).argmax(1))
    torch.manual_seed(0)
    meta = predictor.meta
    random = create_model(meta["model_name"], len(meta["classes"]), meta["image_size"], **meta.get("model_args", {}))
    trained = _maps(predictor.model, predictor, data, paths, targets)
    shuffled = _maps(random, predictor, data, paths, targets)
    rho = [spearmanr(a.cam.ravel(), b.cam.ravel())[0] for a, b in zip(trained, shuffled)]
    assert np.nanmean(rho) < 0.6, f"rank correlation of trained and random maps: {np.round(rho, 2)}"
    random_mass = np.array([mass_inside(m.cam, boxes[p], SIZE) for m, p in zip(shuffled, paths)])
    assert (random_mass > 2 * AREA).mean() < 0.5


def test_flip_tta_map_of_a_mirrored_image_is_the_mirrored_map(squares):
    """FastNet serves the average over an image and its mirror, so its map of the mirrored image is the
    mirror of its map; a map taken on one view only, or the mirror's not turned back, breaks this."""
    run, data, boxes = squares
    predictor = Predictor.load(run, engine="torch")
    assert predictor.model.tta
    arrays = [predictor.decode(data / p) for p in list(boxes)[:8]]
    x = to_model_input(torch.from_numpy(np.stack(arrays)), predictor.mean, predictor.std)
    targets = list(predictor.predict_arrays(arrays).argmax(1))
    maps, _ = class_maps(predictor.model, x, targets)
    mirrored, _ = class_maps(predictor.model, x.flip(3), targets)
    np.testing.assert_allclose(mirrored, maps[..., ::-1], atol=1e-5)
    assert predictor.model.tta and not predictor.model.training  # restored


def test_explaining_changes_nothing_and_agrees_with_predict(squares):
    """BatchNorm keeps its running statistics (the map is taken in eval mode even of a model left in train
    mode, as after training), no gradient is left on the weights, and the probabilities are `predict`'s."""
    run, data, boxes = squares
    path = data / next(iter(boxes))
    predictor = Predictor.load(run, engine="torch")
    model = load_model(run)[0].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explain_arrays(model, [predictor.decode(path)] * 4, predictor.mean, predictor.std, [0, 1, 2, 0])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model.tta and all(p.grad is None for p in model.parameters())
    explanation, probs = predictor.explain(path)
    np.testing.assert_allclose(probs, Predictor.load(run).predict_proba([path])[0], atol=1e-6)
    assert explanation.target == int(probs.argmax()) and explanation.cam.shape == (SIZE, SIZE)


def test_frozen_backbone_and_upscaling_inside_the_model_do_not_distort_the_map():
    """A pretrained network resizes a 32 px input to its own size inside: its map is drawn on the 32 px input
    and equals the map of the already-resized image; a backbone with every weight frozen still gets one."""
    torch.manual_seed(0)
    inside = create_model("efficientnet_lite0", 3, 64, bn="frozen").eval()  # resizes to 64 inside
    outside = create_model("efficientnet_lite0", 3, 64, bn="frozen").eval()
    outside.load_state_dict(inside.state_dict())
    for p in inside.parameters():
        p.requires_grad_(False)  # the frozen phase: no weight needs a gradient
    x = torch.rand(2, 3, 32, 32)
    big = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    layer = target_layer(inside, 32)
    small_map, _ = class_maps(inside, x, [0, 2], layer=layer)
    big_map, _ = class_maps(outside, big, [0, 2], layer=layer)
    assert small_map.shape == (2, 32, 32) and small_map.max() > 0
    shrunk = torch.nn.functional.interpolate(torch.from_numpy(big_map)[:, None], size=(32, 32), mode="area")[:, 0]
    for a, b in zip(small_map, shrunk.numpy()):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98


@pytest.mark.parametrize("name,size,layer", [
    ("fastnet", 32, "stages.1"), ("fastnet_l", 32, "stages.1"),
    ("report000_cnn", 32, "backbone.10"),  # the ReLU of the third conv block, 8 x 8 (the pool after it: 4 x 4)
    ("cnn_small", 32, "backbone.13"),  # the ReLU of the fourth conv, 8 x 8 (the pool after it: 4 x 4)
    ("efficientnet_lite0", 224, "backbone.bn2"),  # the last block, 7 x 7
    ("resnet18", 224, "backbone.layer4.1"),
    ("tv:resnet18", 224, "backbone.layer4.1"),
])
def test_the_default_layer_is_the_deepest_with_a_fine_enough_grid(name, size, layer):
    model = create_model(name, 4, size)
    assert target_layer(model, size) == layer
    assert target_layer(model, size, "head") == "head"  # an override is taken as given


def test_every_method_gives_a_map_of_the_input_size():
    model = create_model("report000_cnn", 3, 32)
    x = torch.randn(2, 3, 32, 32)
    for method in METHODS:
        maps, _ = class_maps(model, x, [0, 1], method)
        assert maps.shape == (2, 32, 32) and np.isfinite(maps).all(), method
        np.testing.assert_allclose(maps.reshape(2, -1).max(1), 1.0, err_msg=method)  # each map peaks at 1: none empty


def test_galleries_map_the_class_said_and_the_true_one(squares, tmp_path, monkeypatch):
    """misclassified.png maps each mistake's said and true classes; confident.png each right answer's class and
    runner-up (the class lists handed to the mapper are checked; the panels follow them)."""
    from cnnlab.evaluate import galleries

    run, data, boxes = squares
    predictor = Predictor.load(run, engine="torch")
    by_class = [[p for p in boxes if p.split("/")[1] == c] for c in predictor.classes_]
    paths = [by_class[k % 3][k // 3] for k in range(8)]  # the classes in turn: no two maps' classes alike by chance
    truth = np.array([predictor.classes_.index(p.split("/")[1]) for p in paths])
    probs = np.full((8, 3), 0.1)
    said = (truth + np.array([1, 2, 0, 0, 1, 0, 0, 0])) % 3  # images 0, 1 and 4 are mistakes
    probs[np.arange(8), said] = 0.8
    probs[np.arange(8), (said + 1) % 3] = 0.1 + np.linspace(0.0, 0.05, 8)  # a runner-up for each
    probs /= probs.sum(1, keepdims=True)
    preds = Predictions(paths, truth, probs, tuple(predictor.classes_), 0.0, np.log(probs))
    asked, real = [], galleries.explain_arrays
    monkeypatch.setattr(galleries, "explain_arrays", lambda *a: asked.append((a[1], list(a[4]))) or real(*a))
    written = galleries.write_galleries(predictor.model, predictor.meta, preds, data, tmp_path)
    assert [p.name for p in written] == ["misclassified.png", "confident.png"]
    wrong, right = [0, 1, 4], [2, 3, 5, 6, 7]
    assert len(asked) == 2  # one call a gallery, for both maps of each image: its images twice, then the classes
    for (arrays, targets), picked, other in zip(asked, (wrong, right), (truth, (said + 1) % 3)):
        n = len(picked)
        assert len(arrays) == 2 * n and all(a is b for a, b in zip(arrays[:n], arrays[n:]))
        for i in picked:  # each image's two maps: of the class it said and of the other class, whatever the order
            image = load_array(data / paths[i], predictor.meta["image_size"], predictor.meta.get("crop", 1.0))
            (at,) = [k for k in range(n) if np.array_equal(arrays[k], image)]
            assert (targets[at], targets[n + at]) == (said[i], other[i])


def _explain_cli(capsys, *args):
    code = main(["explain", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explain_cli_writes_a_png_per_image_and_prints_every_probability(squares, tmp_path, capsys):
    run, data, boxes = squares
    red, blue = data / "test/red/0.png", data / "test/blue/0.png"
    code, out, err = _explain_cli(capsys, run, red, blue, "--out", tmp_path / "maps")
    assert code == 0, err
    pngs = sorted((tmp_path / "maps").iterdir())
    assert [p.name for p in pngs] == ["0-1.png", "0.png"]  # two files named 0.png: neither overwritten
    for p in pngs:
        with Image.open(p) as im:
            assert im.width > 2 * 192 and im.format == "PNG"  # the image and its map, side by side
    lines = out.splitlines()
    assert lines[0].startswith(f"{red}: map of ")
    probabilities = dict(zip(lines[1].split()[::2], map(float, lines[1].split()[1::2])))
    assert set(probabilities) == set(COLOURS) and abs(sum(probabilities.values()) - 1) < 1e-3
    predicted = api.predict(run, [str(red)])[0]["probabilities"]
    assert probabilities == pytest.approx(predicted, abs=1e-4)
    # the Python API has the same verb, and --class maps another class
    folder, results = api.explain(run, [str(red)], target="green", out=tmp_path / "green")
    assert results[0]["explained"] == "green" and (folder / "0.png").is_file()


def test_explain_cli_default_folder_is_inside_the_run(squares, capsys):
    run, data, _ = squares
    code, out, _ = _explain_cli(capsys, run, data / "test/green")  # a folder: its images
    assert code == 0
    folder = out.strip().splitlines()[-1].removeprefix("explanations: ")
    assert folder.startswith(str(run / "explanations")) and len(list((run / "explanations").glob("*/*.png"))) >= 30


@pytest.mark.parametrize("args,message", [
    (["--class", "purple"], "class 'purple' is not one of the model's classes: blue, green, red"),
    (["--method", "magic"], "explanation method 'magic' is not one of gradcam"),
    (["--layer", "stages.9"], "layer 'stages.9' is not a module of FastNet"),
])
def test_explain_cli_bad_choices_are_one_line_and_write_nothing(squares, tmp_path, capsys, args, message):
    run, data, _ = squares
    code, out, err = _explain_cli(capsys, run, data / "test/red/0.png", "--out", tmp_path / "maps", *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "maps").exists()


def test_explain_cli_reports_unreadable_files_and_explains_the_rest(squares, tmp_path, capsys):
    run, data, _ = squares
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a JPEG")
    code, out, err = _explain_cli(capsys, run, broken, tmp_path / "missing.png", data / "test/red/1.png",
                                  "--out", tmp_path / "maps")
    assert code == 2 and "2 of 3 images could not be explained" in err and "broken.jpg" in err
    assert [p.name for p in (tmp_path / "maps").iterdir()] == ["1.png"]
    code, _, err = _explain_cli(capsys, run, broken, "--out", tmp_path / "none")
    assert code == 2 and not (tmp_path / "none").exists()  # nothing explained: no folder


def test_explain_needs_a_finished_run(tmp_path, capsys):
    code, _, err = _explain_cli(capsys, tmp_path, "x.png")
    assert code == 2 and "not a run folder" in err
