"""Load test: `cnnlab serve` against the naive server a user would write, side by side, with wrk.

    python benchmarks/serve_load.py [--seconds 15] [--connections 8] [--workers 2]

Trains (or reuses, with --cifar-run / --lite-run) two models: report000's CIFAR-10 network and
EfficientNet-Lite0 at 224 px, frozen on hymenoptera. Each server is started on 127.0.0.1, warmed,
then driven by wrk (multipart upload of one CIFAR-10 JPEG, 8 connections, bounded in time). The
"shared" rows repeat the measurement with a busy process pinned to one of the cores.
Needs Debian's wrk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from results import SHARED_CIFAR10, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent / "serve"
HYMENOPTERA = SHARED_CIFAR10.parent / "hymenoptera"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(overrides: dict) -> Path:
    from cnnlab import api
    from cnnlab.core.config import load_config

    return api.train(load_config(None, {**overrides, "out": str(ROOT / "benchmarks" / "out")}), progress=False)


def _start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=2)
            if r.status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise SystemExit(f"server failed: {proc.stderr.read().decode()[-2000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("server did not start in 120 s")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def _wrk(port: int, image: Path, seconds: int, connections: int) -> dict:
    url = f"http://127.0.0.1:{port}/predict"
    files = {"file": (image.name, image.read_bytes(), "image/jpeg")}
    for _ in range(20):  # warm-up outside the measurement
        httpx.post(url, files=files, timeout=30).raise_for_status()
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency",
                          "-s", str(HERE / "upload.lua"), url], capture_output=True, text=True,
                         env={**os.environ, "WRK_IMAGE": str(image)}, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"99%\s+(\S+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    n_err = (int(bad.group(1)) if bad else 0) + (sum(int(g) for g in errors.groups()) if errors else 0)
    return {"rps": rps, "p50": p50, "p99": p99, "requests": total, "errors": n_err}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cifar-run", help="a trained report000_cnn run (default: train one, 2 epochs)")
    ap.add_argument("--lite-run", help="a trained efficientnet_lite0 run (default: train one, frozen)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    cifar = Path(args.cifar_run) if args.cifar_run else _train(
        {"data": {"path": str(SHARED_CIFAR10)}, "model": {"name": "report000_cnn"},
         "train": {"epochs": 2, "lr": 1e-3}})
    lite = Path(args.lite_run) if args.lite_run else _train(
        {"data": {"path": str(HYMENOPTERA)}, "model": {"name": "efficientnet_lite0", "pretrained": True},
         "train": {"freeze": True, "epochs": 8, "lr": 1e-3}})
    image = sorted((SHARED_CIFAR10 / "test" / "cat").iterdir())[0]
    rows = []
    for label, run in (("report000 CIFAR-10 net (32 px)", cifar), ("EfficientNet-Lite0 (224 px)", lite)):
        subprocess.run([sys.executable, "-m", "cnnlab", "export", str(run)], check=True, capture_output=True)
        servers = [("naive: FastAPI + PyTorch eager, 1 worker, default threads",
                    lambda p: [sys.executable, str(HERE / "naive_server.py"), str(run), str(p)]),
                   (f"cnnlab serve, {args.workers} workers (ONNX Runtime, 1 thread each)",
                    lambda p: [sys.executable, "-m", "cnnlab", "serve", str(run), "--port", str(p),
                               "--workers", str(args.workers)])]
        for shared in (False, True):
            for name, cmd in servers:
                port = _port()
                proc = _start(cmd(port), port)
                hog = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"]) \
                    if shared else None
                try:
                    r = _wrk(port, image, args.seconds, args.connections)
                finally:
                    if hog:
                        hog.kill()
                    _stop(proc)
                rows.append((label, name + (" — one core busy elsewhere" if shared else ""), r))
                print(label, name, "shared" if shared else "", json.dumps(r), flush=True)
    body = [f"wrk, {args.connections} connections, 2 threads, {args.seconds} s per row, multipart upload of one "
            f"CIFAR-10 JPEG ({image.stat().st_size} bytes); servers and wrk on the same 2 cores; each pair measured "
            "back to back in one run.", "",
            "| model | server | requests/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    body += [f"| {m} | {s} | {r['rps']:,.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} |" for m, s, r in rows]
    update_section("serve_load", "\n".join(body))


if __name__ == "__main__":
    main()
