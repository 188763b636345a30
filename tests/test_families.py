"""Every report's pretrained family built, trained frozen and fine-tuned from a weights file the test writes.

(Its own file: the test runner hands out whole files, the heaviest first, tests/conftest.py's HEAVY_FIRST.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cnnlab.cli import main
from cnnlab.core.runs import sha256_file
from cnnlab.models.checkpoint import load_model
from cnnlab.models.pretrained import build_imagenet_model


def _train(capsys, *args) -> Path:
    code = main(["train", *args, "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    return Path(out.strip().splitlines()[-1][len("run: "):])


def _imagenet_state(name: str) -> dict[str, torch.Tensor]:
    """A state dict of the family's ImageNet network with values that are cheap to make: its own random
    initialisation takes seconds for vgg16 (138 million parameters); a repeated block of noise takes none."""
    with torch.device("meta"):
        imagenet, _ = build_imagenet_model(name)
    noise = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 0.05
    state = {}
    for key, t in imagenet.state_dict().items():
        if key.endswith("running_var"):
            state[key] = torch.ones(t.shape)
        elif not t.is_floating_point() or key.endswith("running_mean"):
            state[key] = torch.zeros(t.shape, dtype=t.dtype)
        else:
            state[key] = noise.repeat(t.numel() // noise.numel() + 1)[:t.numel()].reshape(t.shape)
    return state


FAMILIES = ["resnet18", "densenet121", "googlenet", "vgg16", "mobilenet", "mobilenetv2", "inceptionv3",
            "inceptionresnetv2"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_frozen_then_finetunes_from_a_weights_file(name, hymenoptera_root, tmp_path, capsys):
    state = _imagenet_state(name)
    if FAMILIES.index(name) % 2:
        weights = tmp_path / f"{name}.pth"
        torch.save(state, weights)
    else:
        weights = tmp_path / f"{name}.safetensors"
        save_file(state, str(weights))
    inside, size = (80, 48) if name.startswith("inception") else (48, 32)  # upscaled inside; the inceptions need 75
    run = _train(capsys, "--data", str(hymenoptera_root), "--model", name, "--weights", str(weights),
                 "--input-size", str(inside), "--image-size", str(size), "--freeze", "--unfreeze", "1", "--epochs", "1",
                 "--batch-size", "8", "--out", str(tmp_path / "runs"), "--set", "data.limit_per_class=6",
                 "--set", "train.feature_engine=torch")
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] in ("completed", "failed_to_learn"), s["message"]
    assert [p["name"] for p in s["phases"]] == ["frozen", "finetune"]
    frozen, finetune = s["phases"]
    assert frozen["params_trainable"] < finetune["params_trainable"] < finetune["params_total"]
    assert s["model"]["params_trainable"] == finetune["params_trainable"]
    assert s["model"]["weights_sha256"] == sha256_file(weights)
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].endswith(",phase") and [r.split(",")[-1] for r in history[1:]] == ["frozen", "finetune"]
    # the first layers were frozen in both phases: still exactly the file's weights
    saved = load_file(str(run / "model.safetensors"))
    first = next(k for k in state if state[k].dim() == 4)
    assert torch.equal(saved[f"backbone.{first}"], state[first])
    model, meta = load_model(run)
    assert meta["image_size"] == size and model.input_size == inside
