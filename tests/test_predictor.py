"""The one Predictor: a run folder and its bundle classify alike, ONNX Runtime's fallback is said with
its reason, the preprocessing is read from model.json only, and each decode failure has its status."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hostile import noise_rgb, png_bomb

from cnnlab.core.errors import UserError
from cnnlab.evaluate.predict import Predictor
from cnnlab.models.checkpoint import OnnxUnavailable, onnx_session


def _test_images(run: Path, root: Path, n: int) -> tuple[list[Path], np.ndarray, list[str]]:
    rows = list(csv.DictReader(open(run / "predictions.csv")))[:n]
    classes = json.loads((run / "model.json").read_text())["classes"]
    ref = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return [root / r["path"] for r in rows], ref, [r["prediction"] for r in rows]


def test_bundle_and_run_give_the_same_probabilities(trained, cifar_root):
    paths, ref, labels = _test_images(trained, cifar_root, 12)
    # fp32 ONNX Runtime on the bundle, by name: auto may take a faster engine (tests/test_engines.py)
    run, bundle = Predictor.load(trained, log=pytest.fail), Predictor.load(trained / "bundle", "onnx", log=pytest.fail)
    assert (run.kind, bundle.kind) == ("pytorch", "onnxruntime")  # auto: a run folder has no model.onnx
    assert run.info == {} and 0 < bundle.info["uncertain_below"] <= 1
    assert run.classes_ == bundle.classes_ == json.loads((trained / "summary.json").read_text())["classes"]
    p_run, p_bundle = run.predict_proba(paths), bundle.predict_proba(paths)
    assert p_run.shape == p_bundle.shape == (len(paths), len(run.classes_)) and p_run.dtype == np.float64
    assert np.abs(p_run - p_bundle).max() <= 1e-5
    assert np.abs(p_run - ref).max() <= 1e-6  # the run's own model is evaluation, exactly
    assert np.abs(p_bundle - ref).max() <= 1e-5
    assert run.predict(paths) == bundle.predict(paths) == labels
    for engine in ("torch", "onnx"):  # either engine on the bundle, bytes or files alike
        p = Predictor.load(trained / "bundle", engine=engine)
        assert p.kind == {"torch": "pytorch", "onnx": "onnxruntime"}[engine]
        assert np.abs(p.predict_bytes(paths[0].read_bytes()) - ref[0]).max() <= 1e-5
        assert np.abs(p.predict_proba(paths) - ref).max() <= 1e-5
    assert Predictor.load(trained).kind == "pytorch"  # a run folder has no ONNX model


def test_a_failed_onnx_runtime_is_a_logged_fallback_or_an_error(trained, cifar_root, monkeypatch):
    paths, ref, _ = _test_images(trained, cifar_root, 4)

    def broken(*args, **kwargs):
        raise OnnxUnavailable("InvalidGraph: broken on purpose")

    monkeypatch.setattr("cnnlab.evaluate.predict.onnx_session", broken)
    monkeypatch.setenv("CNNLAB_CPU_BF16", "0")  # auto's choices all need ONNX Runtime (bf16, measured faster, does not)
    logs: list[str] = []
    p = Predictor.load(trained / "bundle", engine="auto", log=logs.append)
    assert p.kind == "pytorch"
    assert logs == ["engine: ONNX Runtime unavailable (InvalidGraph: broken on purpose); using PyTorch"]
    assert np.abs(p.predict_proba(paths) - ref).max() <= 1e-5  # it still predicts, and right
    with pytest.raises(UserError, match=r"engine onnx: .*InvalidGraph: broken on purpose.*--engine torch"):
        Predictor.load(trained / "bundle", engine="onnx", log=logs.append)
    with pytest.raises(UserError, match=r"has no model.onnx"):  # a run folder has no ONNX model to run
        Predictor.load(trained, engine="onnx")
    with pytest.raises(UserError, match="engine 'tensorrt' is not one of auto, onnx, int8, bf16, torch"):
        Predictor.load(trained / "bundle", engine="tensorrt")
    assert len(logs) == 1


def test_onnx_session_turns_onnx_runtime_errors_into_one_type(tmp_path):
    with pytest.raises(OnnxUnavailable, match="InvalidProtobuf"):
        onnx_session(b"not an onnx model", threads=1)
    with pytest.raises(OnnxUnavailable, match="NoSuchFile"):
        onnx_session(tmp_path / "missing.onnx")


def test_preprocessing_is_read_from_model_json_only(trained, cifar_root, tmp_path):
    """bundle.json's copy of the preprocessing is for people: nonsense there changes no probability."""
    paths, ref, _ = _test_images(trained, cifar_root, 4)
    bundle = tmp_path / "bundle"
    shutil.copytree(trained / "bundle", bundle)
    info = json.loads((bundle / "bundle.json").read_text())
    info["preprocessing"] = {"image_size": 7, "crop": 0.1, "mean": [9, 9, 9], "std": [100, 100, 100]}
    (bundle / "bundle.json").write_text(json.dumps(info))
    p = Predictor.load(bundle, "onnx", log=pytest.fail)
    meta = json.loads((bundle / "model.json").read_text())
    assert p.kind == "onnxruntime"
    assert p.preprocessing["mean"] == meta["mean"] and p.preprocessing["image_size"] == meta["image_size"]
    assert np.abs(p.predict_proba(paths) - ref).max() <= 1e-5


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    noise_rgb((64, 64)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name,data,kind,status", [
    ("empty", b"", "NotAnImage", 415),
    ("text", b"hello, not an image", "NotAnImage", 415),
    ("bomb", png_bomb(100_000, 100_000), "ImageTooLarge", 413),
    ("zero width (Pillow will not open it)", png_bomb(0, 10), "NotAnImage", 415),
    ("truncated png", _png_bytes()[:600], "DecodeError", 422),
])
def test_status_for_maps_each_decode_error_type(name, data, kind, status):
    from cnnlab.data import decode
    from cnnlab.serve.app import _status_for

    with pytest.raises(decode.DecodeError) as caught:
        decode.load_array(data, 32)
    assert type(caught.value).__name__ == kind, (name, caught.value)
    assert _status_for(caught.value) == status, name
    assert _status_for(getattr(decode, kind)("any text at all")) == status  # the type decides, not the message


def test_bundle_module_is_not_imported_back_by_the_predictor():
    code = ("import sys, cnnlab.evaluate.predict, cnnlab.models.checkpoint; "
            "print(sorted(m for m in sys.modules if m.startswith('cnnlab.serve')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_warm_times_the_model_not_a_slow_moment_of_the_machine(tmp_path):
    """A server decides from `seconds` whether to batch on its event loop; one timed call that another process
    held up must not make a fast model look slow for the server's whole life."""
    import time

    import torch

    calls = []

    def forward(x):
        calls.append(len(x))
        if len(calls) == 2:  # the first timed call: the machine is busy elsewhere
            time.sleep(0.2)
        return torch.zeros(len(x), 2)

    meta = {"classes": ["a", "b"], "image_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}
    predictor = Predictor(forward, meta, "torch", tmp_path)
    predictor.warm()
    assert len(calls) > 2 and predictor.seconds < 0.05, (calls, predictor.seconds)
