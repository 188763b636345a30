"""Write one benchmark's section of benchmarks/RESULTS.md, keeping the other sections.

Each section is delimited by HTML comments naming the benchmark, and always records the command,
the machine and the date beside the figures.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
SHARED_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"  # read in place
HEADER = ("# Benchmark results\n\nEach section is written by the benchmark named in it, one section per CPU kind "
          "(in brackets); rerun its command to\nrefresh it.\n")


def cpu_kind() -> str:
    """The CPU's fastest matrix units, the thing every timing here depends on: AMX, AVX512-BF16, AVX-512 or AVX2;
    "AVX512-BF16, Zen 5" for AMD's family 26, which shows Zen 4's flags but runs AVX-512 and bf16 at twice its
    width (measured here: bf16 matmul about 900 GFLOP/s on 2 cores against Zen 4's 373-419)."""
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    kind = ("AMX" if "amx_bf16" in info else "AVX512-BF16" if "avx512_bf16" in info else "AVX-512" if "avx512f" in info
            else "AVX2" if "avx2" in info else "?")
    family = re.search(r"^cpu family\s*:\s*(\d+)", info, re.M)
    if kind == "AVX512-BF16" and "AuthenticAMD" in info and family and int(family.group(1)) >= 26:
        kind += ", Zen 5" if int(family.group(1)) == 26 else f", AMD family {family.group(1)}"
    return kind


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores ({cpu_kind()}), {platform.system()}, Python {platform.python_version()}"


def mean_sd(values: list[float], digits: int = 4) -> str:
    """"mean ± standard deviation" of `values` (the value alone for one)."""
    import statistics

    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def matmul_rates(n: int = 2048, repeats: int = 20, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict[str, float]:
    """GFLOP/s of an n x n matmul in each of `dtypes` with torch's default threads (the best of 3 rounds)."""
    import torch

    out = {}
    for dtype in (getattr(torch, d) for d in dtypes):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = 0.0
        for _ in range(3):
            a @ b
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
        out[str(dtype).removeprefix("torch.")] = best
    return out


def update_section(name: str, body: str) -> None:
    """Write `name`'s section for this CPU kind: a run on another kind keeps its own section beside this one."""
    name = f"{name} ({cpu_kind()})"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    command = "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])  # quoted: pastes as it ran
    block = (f"{start}\n## {name}\n\nCommand: `{command}`  \nMachine: {machine()}  \n"
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{body.strip()}\n{end}")
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
