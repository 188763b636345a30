"""Making and measuring a bundle's faster engines at export (the Predictor runs them: evaluate/engines.py).

int8: ONNX Runtime's static quantizer on model.onnx (after its pre-processing, added after the
measurements below were made; as exported where the pre-processed graph does not quantize),
calibrated on an even sample of the run's validation images decoded and normalised exactly as the
Predictor does: uint8 activations and int8 weights per output channel, MinMax ranges, the classifier
(the last Gemm, MatMul or Conv) left in fp32. Measured on report000's network and
EfficientNet-Lite0: keeping the classifier whole lifts top-1 agreement with fp32 from 95.7% to 99.2%
on the first, at no cost in speed; QOperator format ran EfficientNet-Lite0 25% faster than QDQ
(equal on the other); `reduce_range` (7-bit weights), which keeps integer sums from saturating on
CPUs without VNNI (AVX2 only, where the same file must also run right), cost neither speed nor
agreement. A model the quantizer cannot handle gets no int8 engine; why is said in one line and in
bundle.json.

Measurements: every engine on the same test images (all of predictions.csv, or an even sample of
`MAX_TEST_IMAGES`): test accuracy, top-1 agreement with fp32 ONNX Runtime, the largest probability
difference to it, and speed with one intra-op thread, as each `cnnlab serve` worker runs: the median
warm batch-1 latency of `predict_arrays` (normalise, model, softmax; the engines interleaved so that a
busy moment on a shared machine hits them alike) and images/s at batch 32.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cnnlab.core.env import cpu_has_bf16
from cnnlab.core.errors import UserError
from cnnlab.core.runs import RunFolder, atomic_write, read_csv
from cnnlab.data.augment import to_model_input
from cnnlab.data.decode import DecodeError
from cnnlab.evaluate.engines import FP32, NO_BF16
from cnnlab.evaluate.predict import Predictor
from cnnlab.models.checkpoint import INT8_ONNX, ONNX, OnnxUnavailable, onnx_session

CALIBRATION_IMAGES = 256  # validation images whose activations set the int8 ranges
MAX_TEST_IMAGES = 2000  # test images each engine is measured on
MEASURED = (FP32, "int8", "bf16")  # the engines bundle.json records ("torch" is fp32, as model.onnx)
LATENCY_SECONDS, MAX_ROUNDS, BATCH = 2.0, 300, 32
QUANTIZATION = {"format": "QOperator", "activations": "uint8", "weights": "int8, per channel",
                "reduce_range": True, "calibration": "MinMax"}


def even_sample(rows: list, n: int) -> list:
    """At most `n` of `rows`, evenly spaced (all of them when there are no more than `n`)."""
    return rows[:: max(1, -(-len(rows) // n))]


def decode_rows(predictor: Predictor, root: Path, rows: list[dict]) -> tuple[list[np.ndarray], list[dict]]:
    """The decoded images of `rows` (their "path" under `root`), with the rows that decoded."""
    arrays, kept = [], []
    for r in rows:
        try:
            arrays.append(predictor.decode(root / r["path"]))
        except (DecodeError, OSError):  # evaluation dropped it too, or the data is not on this machine
            continue
        kept.append(r)
    return arrays, kept


class _Calibration:
    """ONNX Runtime's CalibrationDataReader (it checks for `get_next` only): batches of normalised images."""

    def __init__(self, batches: list[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {"x": batch}


def _calibration(run: RunFolder, predictor: Predictor, root: Path) -> list[np.ndarray]:
    rows = even_sample([r for r in read_csv(run.split) if r["split"] == "val"], CALIBRATION_IMAGES)
    arrays, _ = decode_rows(predictor, root, rows)
    batches = []
    for i in range(0, len(arrays), 32):  # as the Predictor feeds the model: to_model_input, then contiguous
        x = to_model_input(torch.from_numpy(np.stack(arrays[i:i + 32])), predictor.mean, predictor.std)
        batches.append(np.ascontiguousarray(x.numpy()))
    return batches


def quantize_int8(folder: Path, run: RunFolder, predictor: Predictor, root: Path) -> dict:
    """Write folder/model.int8.onnx; return its bundle.json record (the settings, or {"error": why})."""
    (folder / INT8_ONNX).unlink(missing_ok=True)  # an earlier export's file must not outlive a failure
    batches = _calibration(run, predictor, root)
    if not batches:
        return {"error": "no validation image to calibrate on"}
    size = predictor.image_size
    logging.disable(logging.WARNING)  # the quantizer's advice to pre-process, printed on the root logger
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        with tempfile.TemporaryDirectory() as tmp:
            out, ready = Path(tmp) / INT8_ONNX, Path(tmp) / "pre.onnx"
            # ONNX Runtime's clean-up first: the exporter reaches the weights FastNet's mirror pass shares through
            # Identity nodes, and the quantizer needs each weight bare. Its shape inference fails on some graphs,
            # and the quantizer on some cleaned ones (EfficientNet-Lite0: "Graph is not a DAG"): those are
            # quantized as exported.
            try:
                quant_pre_process(str(folder / ONNX), str(ready))
                sources = [ready, folder / ONNX]
            except Exception:
                sources = [folder / ONNX]
            for source in sources:
                try:
                    keep = _quantize(source, out, batches)
                    onnx_session(out, 1, probe=(1, 3, size, size))  # it must run, not just be written
                    break
                except Exception:  # the quantizer raises whatever an op it cannot handle raises
                    if source == sources[-1]:
                        raise
            atomic_write(folder / INT8_ONNX, out.read_bytes())
    except OnnxUnavailable as e:
        return {"error": f"the quantized model does not run ({e})"}
    except Exception as e:  # no int8 engine, said why
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        logging.disable(logging.NOTSET)
    return {**QUANTIZATION, "fp32_nodes": keep, "calibration_images": sum(len(b) for b in batches),
            "pre_processed": source == ready}


def _quantize(source: Path, out: Path, batches: list[np.ndarray]) -> list[str]:
    """Write the int8 model of `source` to `out`, calibrated on `batches`; return the nodes left in fp32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    keep = _classifier(source)
    quantize_static(str(source), str(out), _Calibration(batches), quant_format=QuantFormat.QOperator,
                    per_channel=True, reduce_range=QUANTIZATION["reduce_range"], activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep)
    return keep


def _classifier(model: Path) -> list[str]:
    """The last Gemm, MatMul or Conv (ONNX lists nodes in order): the classifier, whose logits pick top-1."""
    import onnx

    names = [n.name for n in onnx.load(str(model)).graph.node if n.op_type in ("Gemm", "MatMul", "Conv")]
    return names[-1:]


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def _speeds(predictors: dict[str, Predictor], image: np.ndarray) -> dict[str, dict]:
    """Median warm batch-1 ms (engines interleaved) and images/s at batch `BATCH`, per engine."""
    one, many = [image], [image] * BATCH
    for p in predictors.values():  # warm-up: the first calls pick kernels
        p.predict_arrays(one), p.predict_arrays(many)
    times: dict[str, list[float]] = {name: [] for name in predictors}
    deadline = time.perf_counter() + LATENCY_SECONDS
    for _ in range(MAX_ROUNDS):
        for name, p in predictors.items():
            start = time.perf_counter()
            p.predict_arrays(one)
            times[name].append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(times[name]) >= 10:
            break
    out = {}
    for name, p in predictors.items():
        seconds = []
        for _ in range(2):  # the better of two: a batch is one long call, easily hit by a busy moment
            start = time.perf_counter()
            p.predict_arrays(many)
            seconds.append(time.perf_counter() - start)
        out[name] = {"latency_ms": round(1000 * float(np.median(times[name])), 4),
                     "throughput": round(BATCH / min(seconds), 1)}
    return out


def _top1(predictors: dict[str, Predictor], root: Path, rows: list[dict]) -> tuple[dict, dict, list[str]]:
    """Per engine its top-1 classes and largest probability difference to fp32, and the targets."""
    top1: dict[str, list[int]] = {name: [] for name in predictors}
    diff = dict.fromkeys(predictors, 0.0)
    targets: list[str] = []
    for i in range(0, len(rows), 128):
        arrays, kept = decode_rows(predictors[FP32], root, rows[i:i + 128])
        if not arrays:
            continue
        targets += [r["target"] for r in kept]
        probs = {name: p.predict_arrays(arrays) for name, p in predictors.items()}
        for name, pr in probs.items():
            top1[name] += pr.argmax(1).tolist()
            diff[name] = max(diff[name], float(np.abs(pr - probs[FP32]).max()))
    return top1, diff, targets


def measure_engines(folder: Path, run: RunFolder, int8: dict, root: Path) -> tuple[dict, dict]:
    """(bundle.json's "engines": a record per engine in `MEASURED`, how they were measured)."""
    rows = read_csv(run.predictions)
    sample = even_sample(rows, MAX_TEST_IMAGES)
    engines: dict[str, dict] = {"int8": int8} if "error" in int8 else {}
    if not cpu_has_bf16():
        engines["bf16"] = {"skipped": NO_BF16}
    threads = torch.get_num_threads()
    predictors = {}
    try:
        for name in (n for n in MEASURED if n not in engines):
            try:  # one thread, as a `cnnlab serve` worker runs
                predictors[name] = Predictor.load(folder, engine=name, threads=1, log=lambda line: None)
            except UserError as e:
                engines[name] = {**(int8 if name == "int8" else {}), "error": str(e)}
        if FP32 not in predictors:
            return engines, {}
        top1, diff, targets = _top1(predictors, root, sample)
        speeds = _speeds(predictors, decode_rows(predictors[FP32], root, sample[:1])[0][0]) if targets else {}
    finally:
        torch.set_num_threads(threads)
    classes = predictors[FP32].classes_
    for name, p in predictors.items():
        hits = [classes[k] == t for k, t in zip(top1[name], targets)]
        agree = [a == b for a, b in zip(top1[name], top1[FP32])]
        engines[name] = {"kind": p.kind, **(int8 if name == "int8" else {}),
                         "accuracy": round(float(np.mean(hits)), 5) if hits else 0.0,
                         "agreement": round(float(np.mean(agree)), 5) if agree else 0.0,
                         "max_prob_diff": round(diff[name], 6), **speeds.get(name, {})}
    how = {"test_images": len(targets), "of": len(rows),
           "sample": "all test images" if len(sample) == len(rows) else "an even sample of the test images",
           "threads": 1, "latency": "median warm batch-1 ms of Predictor.predict_arrays, engines interleaved",
           "throughput_batch": BATCH, "cpu": _cpu(), "cpu_bf16": cpu_has_bf16()}
    return {name: engines[name] for name in MEASURED if name in engines}, how


def engine_lines(engines: dict, how: dict) -> list[str]:
    """One line per engine for `cnnlab export`."""
    ref = engines.get(FP32, {})
    lines = []
    for name, row in engines.items():
        label = f"engine {name}" + (" (fp32)" if name == FP32 else "")
        if "skipped" in row:
            lines.append(f"{label}: not offered ({row['skipped']})")
        elif "error" in row:
            made = name != "int8" or "format" in row  # else the quantizer could not make it
            lines.append(f"{label}: {'unavailable' if made else 'not made'} ({row['error']})")
        elif "latency_ms" in row:
            vs = "" if name == FP32 else (f", agrees with fp32 on {100 * row['agreement']:.1f}%, "
                                          f"{ref['latency_ms'] / row['latency_ms']:.1f}x fp32's speed")
            lines.append(f"{label}: test accuracy {100 * row['accuracy']:.1f}% on {how['test_images']:,} images{vs}; "
                         f"{row['latency_ms']:.3f} ms at batch 1, {row['throughput']:,.0f} images/s at batch "
                         f"{BATCH} (1 thread)")
    return lines
