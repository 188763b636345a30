"""The faster engines: the bundle's int8 model and its measurements, int8 (and bf16 where the CPU has it)
agreeing with fp32, auto's choice by the 0.3-point rule, and a clear error for an engine that cannot run."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cnnlab.core.env import cpu_has_bf16
from cnnlab.core.errors import UserError
from cnnlab.evaluate.engines import KINDS, choose_engine, runnable_here
from cnnlab.evaluate.predict import Predictor


def _test_set(run: Path, root: Path) -> tuple[list[Path], list[str], np.ndarray, list[str]]:
    """Every test image of the run: paths, targets, evaluation's probabilities, class names."""
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    classes = json.loads((run / "model.json").read_text())["classes"]
    ref = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return [root / r["path"] for r in rows], [r["target"] for r in rows], ref, classes


def _info(bundle: Path) -> dict:
    return json.loads((bundle / "bundle.json").read_text())


def _with_engines(trained: Path, tmp_path: Path, engines: dict) -> Path:
    """A copy of the bundle whose bundle.json (not hashed: it holds the hashes) records `engines`."""
    bundle = tmp_path / "b"
    shutil.copytree(trained / "bundle", bundle)
    info = _info(bundle)
    info["engines"] = engines
    (bundle / "bundle.json").write_text(json.dumps(info))
    return bundle


def _auto_kind(bundle: Path) -> str:
    """What auto must run on `bundle` here, by the rule (tested on its own below)."""
    return KINDS[choose_engine(_info(bundle)["engines"], runnable_here)[0]]


def _m(accuracy: float, latency_ms: float) -> dict:
    return {"accuracy": accuracy, "agreement": 0.99, "latency_ms": latency_ms, "throughput": 1000 / latency_ms}


def test_bundle_has_the_int8_model_its_hash_and_every_engine_measured(trained):
    bundle = trained / "bundle"
    info = _info(bundle)
    digest = hashlib.sha256((bundle / "model.int8.onnx").read_bytes()).hexdigest()
    assert info["files"]["model.int8.onnx"] == digest
    n_test = sum(1 for _ in csv.DictReader(open(trained / "predictions.csv")))
    how = info["engines_measured"]
    assert how["test_images"] == how["of"] == n_test and how["sample"] == "all test images" and how["threads"] == 1
    assert how["cpu_bf16"] == cpu_has_bf16() and how["cpu"]
    fp32, int8 = info["engines"]["onnx"], info["engines"]["int8"]
    assert fp32["agreement"] == 1.0 and fp32["max_prob_diff"] == 0.0 and fp32["kind"] == "onnxruntime"
    assert abs(fp32["accuracy"] - info["metrics"]["accuracy"]) < 1e-4  # the same images evaluation scored
    assert int8["format"] == "QOperator" and int8["calibration_images"] > 0 and int8["kind"] == "onnxruntime-int8"
    for row in (fp32, int8):
        assert 0 < row["accuracy"] <= 1 and row["latency_ms"] > 0 and row["throughput"] > 0
    if cpu_has_bf16():
        assert info["engines"]["bf16"]["kind"] == "pytorch-bf16" and info["engines"]["bf16"]["latency_ms"] > 0
    else:
        assert "AMX" in info["engines"]["bf16"]["skipped"]


def test_int8_probabilities_are_close_to_fp32(trained, cifar_root):
    paths, targets, ref, classes = _test_set(trained, cifar_root)
    fp32 = Predictor.load(trained / "bundle", engine="onnx").predict_proba(paths)
    assert np.abs(fp32 - ref).max() <= 1e-5  # the reference is evaluation itself
    int8 = Predictor.load(trained / "bundle", engine="int8")
    assert int8.kind == "onnxruntime-int8"
    p = int8.predict_proba(paths)
    agreement = float(np.mean(p.argmax(1) == fp32.argmax(1)))
    assert agreement >= 0.9, agreement
    assert np.abs(p - fp32).mean() < 0.02
    recorded = _info(trained / "bundle")["engines"]["int8"]
    assert abs(recorded["agreement"] - agreement) < 1e-4  # what export recorded, computed again here
    accuracy = float(np.mean([classes[k] == t for k, t in zip(p.argmax(1), targets)]))
    assert abs(recorded["accuracy"] - accuracy) < 1e-4


def test_auto_takes_the_fastest_engine_within_0_3_points_of_fp32():
    fp32 = _m(0.753, 1.0)
    name, why = choose_engine({"onnx": fp32, "int8": _m(0.752, 0.5), "bf16": _m(0.751, 0.4)})
    assert name == "bf16" and why == "bf16 (2.5x faster than fp32 at batch 1, test accuracy 75.1% vs 75.3%)"
    assert choose_engine({"onnx": fp32, "int8": _m(0.752, 0.5), "bf16": _m(0.7495, 0.4)})[0] == "int8"  # -0.35
    assert choose_engine({"onnx": fp32, "int8": _m(0.750, 0.5)})[0] == "int8"  # exactly 0.3 points down
    assert choose_engine({"onnx": fp32, "int8": _m(0.760, 0.5)})[0] == "int8"  # more accurate is fine too
    name, why = choose_engine({"onnx": fp32, "int8": _m(0.749, 0.5), "bf16": _m(0.70, 0.4)})
    assert name == "onnx" and why == "onnx (fp32: bf16 is 2.5x faster but its test accuracy is 70.0% vs 75.3%)"
    assert choose_engine({"onnx": fp32, "int8": _m(0.753, 1.5)}) == ("onnx", "onnx (fp32: no engine here is "
                                                                             "1.1x as fast at batch 1)")
    assert choose_engine({"onnx": fp32, "int8": _m(0.753, 0.95)})[0] == "onnx"  # 5% faster: noise, not speed
    assert choose_engine({"onnx": fp32, "int8": _m(0.753, 0.9)})[0] == "int8"
    everything = {"onnx": fp32, "int8": _m(0.752, 0.5), "bf16": _m(0.753, 0.2)}
    assert choose_engine(everything, runnable=lambda n: n != "bf16")[0] == "int8"  # bf16 not on this CPU
    assert choose_engine({"onnx": fp32, "int8": {"error": "ValueError: no"}, "bf16": {"skipped": "no AMX"}})[0] == "onnx"
    assert choose_engine({"int8": _m(0.75, 0.5)})[0] == "onnx"  # no fp32 figures: nothing to compare with


def test_auto_on_a_bundle_follows_its_measurements_in_one_line(trained, tmp_path, monkeypatch):
    logs: list[str] = []
    p = Predictor.load(trained / "bundle", log=logs.append)
    why = choose_engine(_info(trained / "bundle")["engines"], runnable_here)[1]
    assert p.kind == _auto_kind(trained / "bundle") and logs == [f"engine: {why}"]
    bundle = _with_engines(trained, tmp_path, {"onnx": _m(0.5, 1.0), "int8": _m(0.499, 0.4), "bf16": _m(0.5, 0.1)})
    monkeypatch.setenv("CNNLAB_CPU_BF16", "0")  # bf16 measured fastest, but this CPU (as told) has none
    logs.clear()
    assert Predictor.load(bundle, log=logs.append).kind == "onnxruntime-int8"
    assert logs == ["engine: int8 (2.5x faster than fp32 at batch 1, test accuracy 49.9% vs 50.0%)"]
    bundle = _with_engines(trained, tmp_path / "2", {"onnx": _m(0.5, 1.0), "int8": _m(0.49, 0.4)})
    assert Predictor.load(bundle, log=logs.append).kind == "onnxruntime"  # 1 point down: not taken


def _one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as caught:
        Predictor.load(*args, **kwargs)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_an_engine_that_cannot_run_here_is_one_clear_error(trained, tmp_path, monkeypatch):
    _one_line_error(r"engine int8: .* is a run folder.* `cnnlab export RUN`", trained, engine="int8")
    bundle = tmp_path / "b"
    shutil.copytree(trained / "bundle", bundle)
    info = _info(bundle)
    del info["files"]["model.int8.onnx"]  # a bundle whose quantizer failed: no int8 file listed
    info["engines"]["int8"] = {"error": "NotImplementedError: op Foo"}
    (bundle / "bundle.json").write_text(json.dumps(info))
    _one_line_error(r"engine int8: this bundle has no int8 model \(NotImplementedError: op Foo\); use --engine onnx",
                    bundle, engine="int8")  # the file is still there, unlisted: never run
    assert Predictor.load(bundle, log=lambda line: None).kind == _auto_kind(bundle)  # auto goes on without it
    monkeypatch.setenv("CNNLAB_CPU_BF16", "0")
    _one_line_error(r"engine bf16: this CPU has no AMX or AVX512-BF16 .*CNNLAB_CPU_BF16=0.*use --engine auto",
                    trained / "bundle", engine="bf16")
    _one_line_error(r"engine 'fp8' is not one of auto, onnx, int8, bf16, torch", trained / "bundle", engine="fp8")


def test_a_tampered_or_missing_int8_model_is_refused(trained, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(trained / "bundle", bundle)
    data = bytearray((bundle / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "model.int8.onnx").write_bytes(bytes(data))
    for engine in ("int8", "onnx", "auto"):  # the whole bundle is refused, whichever engine is asked for
        _one_line_error(r"model.int8.onnx does not match its sha256 in bundle.json", bundle, engine=engine)
    (bundle / "model.int8.onnx").unlink()
    _one_line_error(r"model.int8.onnx is missing", bundle, engine="int8")


def test_bf16_engine_agrees_with_fp32(trained, cifar_root):
    if not cpu_has_bf16():
        why = "CNNLAB_CPU_BF16=0" if os.environ.get("CNNLAB_CPU_BF16") == "0" else "this CPU has no AMX/AVX512-BF16"
        pytest.skip(f"no bf16 engine here: {why}")
    paths, _, ref, _ = _test_set(trained, cifar_root)
    p = Predictor.load(trained / "bundle", engine="bf16")
    assert p.kind == "pytorch-bf16"
    probs = p.predict_proba(paths)
    assert float(np.mean(probs.argmax(1) == ref.argmax(1))) >= 0.9
    assert np.abs(probs - ref).mean() < 0.02


def test_export_goes_on_without_int8_when_the_quantizer_fails(trained, tmp_path, monkeypatch):
    from cnnlab.serve.bundle import export

    def broken(*args, **kwargs):
        raise NotImplementedError("no int8 kernel for op Foo")

    monkeypatch.setattr("onnxruntime.quantization.quantize_static", broken)
    logs: list[str] = []
    folder = export(trained, tmp_path / "b", log=logs.append)
    info = _info(folder)
    assert not (folder / "model.int8.onnx").exists() and "model.int8.onnx" not in info["files"]
    assert info["engines"]["int8"] == {"error": "NotImplementedError: no int8 kernel for op Foo"}
    assert "engine int8: not made (NotImplementedError: no int8 kernel for op Foo)" in logs
    assert [line.split(":")[0] for line in logs[1:]] == ["engine onnx (fp32)", "engine int8", "engine bf16"]
    assert Predictor.load(folder, log=logs.append).kind == _auto_kind(folder) != "onnxruntime-int8"


def test_int8_is_made_from_the_exported_graph_when_the_cleaned_one_does_not_quantize(trained, tmp_path, monkeypatch):
    """EfficientNet-Lite0's graph after ONNX Runtime's clean-up fails the quantizer ("Graph is not a DAG"), while
    the graph as exported quantizes: the bundle must still get its int8 engine."""
    import onnxruntime.quantization as q

    from cnnlab.serve.bundle import export

    real, tried = q.quantize_static, []

    def fails_on_the_cleaned_graph(source, *args, **kwargs):
        tried.append(Path(source).name)
        if Path(source).name == "pre.onnx":
            raise AssertionError("Graph is not a DAG")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(q, "quantize_static", fails_on_the_cleaned_graph)
    folder = export(trained, tmp_path / "b", log=lambda line: None)
    int8 = _info(folder)["engines"]["int8"]
    assert tried == ["pre.onnx", "model.onnx"]
    assert "error" not in int8 and int8["pre_processed"] is False and int8["agreement"] > 0.9
    assert (folder / "model.int8.onnx").exists()


def test_the_server_reports_its_engine_and_refuses_one_that_cannot_run(trained, monkeypatch, capsys):
    from fastapi.testclient import TestClient

    from cnnlab.cli import main
    from cnnlab.serve.app import create_app

    with TestClient(create_app(str(trained / "bundle"), engine="int8")) as client:
        assert client.get("/readyz").json() == {"status": "ready", "engine": "onnxruntime-int8"}
        info = client.get("/model").json()
        assert info["engine"] == "onnxruntime-int8" and info["engines"]["int8"]["agreement"] > 0.9
    monkeypatch.setenv("CNNLAB_CPU_BF16", "0")
    capsys.readouterr()
    assert main(["serve", str(trained / "bundle"), "--port", "0", "--engine", "bf16"]) == 2  # before any worker
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cnnlab: error: engine bf16: this CPU has no AMX"), err


def test_export_away_from_the_data_makes_a_bundle_that_serves_fp32(trained, tmp_path, capsys):
    """On a machine without the run's images there is nothing to calibrate int8 on or to measure with: the
    bundle still comes out whole, says so, and auto serves fp32; a bundle exported before engines and
    calibration existed (no "engines", no "temperature") loads the same way."""
    from cnnlab.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("bundle", "evaluations"))
    summary = json.loads((run / "summary.json").read_text())
    summary["data"]["root"] = str(tmp_path / "moved-away")
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["export", str(run)]) == 0
    out = capsys.readouterr().out
    assert "engine int8: not made (no validation image to calibrate on)" in out
    info = _info(run / "bundle")
    assert "model.int8.onnx" not in info["files"] and info["engines"]["int8"]["error"]
    logs: list[str] = []
    assert Predictor.load(run / "bundle", log=logs.append).kind == KINDS["onnx"]
    old = tmp_path / "old"
    shutil.copytree(trained / "bundle", old)
    info = _info(old)
    for key in ("engines", "engines_measured", "temperature"):
        info.pop(key, None)
    meta = json.loads((old / "model.json").read_text())
    meta.pop("temperature")
    (old / "model.json").write_text(json.dumps(meta))
    info["files"]["model.json"] = hashlib.sha256((old / "model.json").read_bytes()).hexdigest()
    (old / "bundle.json").write_text(json.dumps(info))
    p = Predictor.load(old, log=pytest.fail)
    assert p.kind == KINDS["onnx"] and p.temperature == 1.0
