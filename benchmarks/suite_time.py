"""How long the test suite takes here, beside how fast this machine multiplies matrices.

    python benchmarks/suite_time.py [--fp32]     # --fp32: CNNLAB_CPU_BF16=0, the path of a CPU without bf16

The suite's target (at most 6 minutes of tests on 2 cores) was set on machines whose fp32 matmul
ran at 150-440 GFLOP/s; the same kind of cloud machine has been seen at half that, so the matmul
rates measured just before the run are recorded with it. The suite runs as `make test` runs it
(pyproject's addopts: a pytest-xdist worker per core, each pinned to its own). Writes the wall
time, the counts and the ten slowest tests into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import matmul_rates, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp32", action="store_true", help="force the no-bf16 path (CNNLAB_CPU_BF16=0)")
    args = ap.parse_args()
    rates = matmul_rates()
    env = {**os.environ, **({"CNNLAB_CPU_BF16": "0"} if args.fp32 else {})}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = done.stdout.splitlines()
    counts = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)), "?")
    slowest = [line for line in lines if re.match(r"^\d+\.\d+s (call|setup|teardown) ", line)]
    print(done.stdout[-3000:])
    path = "fp32 forced (CNNLAB_CPU_BF16=0)" if args.fp32 else "the CPU's own (auto)"
    body = [f"Precision path: {path}.  ",
            f"Matmul just before, 2048 x 2048: fp32 {rates['float32']:.0f} GFLOP/s, bf16 {rates['bfloat16']:.0f} "
            "GFLOP/s.  ", f"Suite: {counts}; {wall / 60:.1f} min wall (exit {done.returncode}).", "",
            "Ten slowest:", "", "```", *slowest, "```"]
    update_section("suite_time" + ("_fp32" if args.fp32 else ""), "\n".join(body))
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
