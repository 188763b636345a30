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


FAMILIES = ["resnet18", "densenet121", "googlenet", "vgg16", "mobilenet", "mobilenetv2", "inceptionv3",
            "inceptionresnetv2"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_frozen_then_finetunes_from_a_weights_file(name, hymenoptera_root, tmp_path, capsys):
    imagenet, classifier = build_imagenet_model(name)
    state = {k: v.contiguous() for k, v in imagenet.state_dict().items()}
    if FAMILIES.index(name) % 2:
        weights = tmp_path / f"{name}.pth"
        torch.save(state, weights)
    else:
        weights = tmp_path / f"{name}.safetensors"
        save_file(state, str(weights))
    run = _train(capsys, "--data", str(hymenoptera_root), "--model", name, "--weights", str(weights),
                 "--input-size", "80", "--image-size", "48", "--freeze", "--unfreeze", "1", "--epochs", "1",
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
    assert meta["image_size"] == 48 and model.input_size == 80
