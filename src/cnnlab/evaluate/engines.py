"""The Predictor's engines beside fp32 ONNX Runtime, and how `auto` chooses between them.

Engines: "onnx" (ONNX Runtime on model.onnx, fp32: the reference), "int8" (ONNX Runtime on the
bundle's statically quantized model.int8.onnx), "bf16" (PyTorch under bf16 autocast, traced and frozen
in channels_last; only where the CPU has AMX or AVX512-BF16) and "torch" (PyTorch fp32).

`choose_engine` reads the measurements that `cnnlab export` writes into bundle.json ("engines": per
engine its test accuracy, top-1 agreement with fp32 and warm batch-1 latency on the export machine)
and picks the fastest engine whose test accuracy is at most `MAX_ACCURACY_DROP` below fp32's (and
that is at least `MIN_SPEEDUP` times as fast: a smaller gain is measurement noise, and fp32 is exact).
"""

from __future__ import annotations

import torch

from cnnlab.core.env import cpu_has_bf16

FP32 = "onnx"  # the reference every faster engine is measured against
KINDS = {"onnx": "onnxruntime", "int8": "onnxruntime-int8", "bf16": "pytorch-bf16", "torch": "pytorch"}
MAX_ACCURACY_DROP = 0.003  # 0.3 points of test accuracy: what `auto` may give up for speed
MIN_SPEEDUP = 1.1  # below 10% faster, batch-1 medians on a shared machine do not tell engines apart: fp32 is exact
NO_BF16 = "this CPU has no AMX or AVX512-BF16 (bf16 would run many times slower than fp32 here)"


def bf16_forward(model: torch.nn.Module, image_size: int):
    """`model` under bf16 autocast (oneDNN runs its convolutions and matmuls on AMX / AVX512-BF16), traced
    and frozen in channels_last: the fastest bf16 path measured here, 2x eager autocast at batch 1 (ONNX
    Runtime's CPU provider has no bf16 convolution at all). Weights stay fp32; autocast casts per op."""
    import warnings

    model = model.eval().to(memory_format=torch.channels_last)
    example = torch.zeros(1, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notes
        frozen = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return frozen(x)

    return forward


def runnable_here(engine: str) -> bool:
    """Whether auto may pick `engine` on this CPU (bundle.json's figures were measured at export)."""
    return engine != "bf16" or cpu_has_bf16()


def _usable(row: dict | None) -> bool:
    return bool(row) and "error" not in row and "skipped" not in row and row.get("latency_ms", 0) > 0


def choose_engine(engines: dict, runnable=lambda name: True, max_drop: float = MAX_ACCURACY_DROP,
                  min_speedup: float = MIN_SPEEDUP) -> tuple[str, str]:
    """(engine, one line saying why) from bundle.json's "engines" measurements.

    The fastest at batch 1 among the engines that `runnable(name)` allows here, are `min_speedup` times as
    fast as fp32 or more, and whose test accuracy is at most `max_drop` below fp32's; fp32 when it has no
    usable measurement or nothing qualifies. The line reads e.g. "int8 (1.9x faster than fp32 at batch 1, test accuracy 75.2% vs 75.3%)".
    """
    ref = engines.get(FP32)
    if not _usable(ref):
        return FP32, f"{FP32} (fp32: this bundle has no engine measurements)"
    floor = ref["accuracy"] - max_drop - 1e-9  # the tolerance keeps 0.3 points from failing on float rounding
    faster = {name: row for name, row in engines.items()
              if name != FP32 and _usable(row) and runnable(name)
              and row["latency_ms"] * min_speedup <= ref["latency_ms"]}
    good = {name: row for name, row in faster.items() if row["accuracy"] >= floor}
    if good:
        name = min(good, key=lambda n: good[n]["latency_ms"])
        row = good[name]
        return name, (f"{name} ({ref['latency_ms'] / row['latency_ms']:.1f}x faster than fp32 at batch 1, "
                      f"test accuracy {100 * row['accuracy']:.1f}% vs {100 * ref['accuracy']:.1f}%)")
    if faster:
        name = min(faster, key=lambda n: faster[n]["latency_ms"])
        row = faster[name]
        return FP32, (f"{FP32} (fp32: {name} is {ref['latency_ms'] / row['latency_ms']:.1f}x faster but its test "
                      f"accuracy is {100 * row['accuracy']:.1f}% vs {100 * ref['accuracy']:.1f}%)")
    return FP32, f"{FP32} (fp32: no engine here is {min_speedup:g}x as fast at batch 1)"
