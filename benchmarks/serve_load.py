"""Load test: `cnnlab serve` on each of its engines against the naive server a user would write and a
bare FastAPI app (the HTTP ceiling), side by side, with wrk.

    python benchmarks/serve_load.py [--seconds 15] [--connections 8] [--workers 2]

Trains (or reuses, with --cifar-run / --lite-run) two models: report000's CIFAR-10 network and
EfficientNet-Lite0 at 224 px, frozen on hymenoptera, and exports each (which quantizes it to int8 and
measures every engine on its test images). Each server is started on 127.0.0.1, warmed, then driven
by wrk (multipart upload of one CIFAR-10 JPEG, 8 connections, bounded in time): the naive server,
`cnnlab serve --engine` fp32 ONNX Runtime, int8 and bf16 (where the CPU has bf16 hardware), and a
bare one-route FastAPI app under the same uvicorn settings and workers as `cnnlab serve`. The
"shared" rows repeat every measurement with a busy process pinned to one of the cores.
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
from results import SHARED_CIFAR10, machine, update_section  # noqa: E402

from cnnlab.core.env import cpu_has_bf16  # noqa: E402
from cnnlab.evaluate.engines import choose_engine, runnable_here  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent / "serve"
HYMENOPTERA = SHARED_CIFAR10.parent / "hymenoptera"
ENGINES = {"onnx": "fp32 ONNX Runtime", "int8": "int8 ONNX Runtime", "bf16": "bf16 PyTorch"}
COLLAPSE = 1 / 3  # "no collapse": with one of two cores busy, at least a third of the rate (half is ideal)


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
    # anchored: the "+/- Stdev" column (e.g. "98.99%") must not pass for the 99% line of the distribution
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    n_err = (int(bad.group(1)) if bad else 0) + (sum(int(g) for g in errors.groups()) if errors else 0)
    return {"rps": rps, "p50": p50, "p99": p99, "requests": total, "errors": n_err}


def _export(run: Path) -> dict:
    """Export `run` (int8 made, every engine measured); print its engine lines; return bundle.json."""
    out = subprocess.run([sys.executable, "-m", "cnnlab", "export", str(run)], check=True, capture_output=True,
                         text=True).stdout
    print(out.strip(), flush=True)
    return json.loads((run / "bundle" / "bundle.json").read_text())


def _auto(info: dict) -> str:
    return choose_engine(info.get("engines", {}), runnable_here)[0]


def _servers(run: Path, info: dict, workers: int) -> list[tuple[str, str, object]]:
    """(key, description, port -> command) for the naive server and `cnnlab serve` on each engine here."""
    servers = [("naive", "naive: FastAPI + PyTorch eager, 1 worker, default threads",
                lambda p: [sys.executable, str(HERE / "naive_server.py"), str(run), str(p)])]
    for engine, what in ENGINES.items():
        if "latency_ms" not in info.get("engines", {}).get(engine, {}) or not runnable_here(engine):
            continue
        mark = " (auto's choice)" if engine == _auto(info) else ""
        servers.append((engine, f"cnnlab serve --engine {engine}{mark}: {what}, {workers} workers, 1 thread each",
                        lambda p, e=engine: [sys.executable, "-m", "cnnlab", "serve", str(run), "--port", str(p),
                                             "--workers", str(workers), "--engine", e]))
    return servers


def _measure(cmd, image: Path, args, shared: bool) -> dict:
    """wrk against the server `cmd(port)` starts, with a busy process on core 0 when `shared`."""
    port = _port()
    proc = _start(cmd(port), port)
    hog = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"]) if shared else None
    try:
        return _wrk(port, image, args.seconds, args.connections)
    finally:
        if hog:
            hog.kill()
        _stop(proc)


def _rows(models: list, image: Path, args) -> list[dict]:
    """Every server, then every server again with one core busy: the bare app, then each model's servers."""
    bare = ("bare", f"bare FastAPI app (one route, reads the body, no model), {args.workers} workers, "
                    "cnnlab's uvicorn settings",
            lambda p: [sys.executable, str(HERE / "bare_app.py"), str(p), str(args.workers)])
    rows = []
    for shared in (False, True):
        for label, servers in [("HTTP ceiling", [bare])] + models:
            for key, name, cmd in servers:
                r = _measure(cmd, image, args, shared)
                rows.append({"model": label, "key": key, "server": name, "shared": shared, **r})
                print(label, name, "shared" if shared else "", json.dumps(r), flush=True)
    return rows


def _cpu_line() -> str:
    bf16 = "yes (AMX / AVX512-BF16)" if cpu_has_bf16() else "no"
    return f"CPU: {machine()}; bf16 hardware: {bf16}; {time.strftime('%Y-%m-%d', time.gmtime())}."


def _load_table(rows: list[dict]) -> list[str]:
    """The wrk table, with each cnnlab row's share of the bare app's rate and its factor over the naive server."""
    ref = {(r["model"], r["key"], r["shared"]): r["rps"] for r in rows}
    out = [_cpu_line(), "", "| model | server | requests/s | p50 ms | p99 ms | errors | % of bare app | x naive |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cnnlab = r["key"] in ENGINES
        pct = f"{100 * r['rps'] / ref[('HTTP ceiling', 'bare', r['shared'])]:.0f}%" if cnnlab else "—"
        naive = ref.get((r["model"], "naive", r["shared"]))
        x = f"{r['rps'] / naive:.1f}x" if cnnlab and naive else "—"
        busy = " — one core busy elsewhere" if r["shared"] else ""
        out.append(f"| {r['model']} | {r['server']}{busy} | {r['rps']:,.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                   f"{r['errors']} | {pct} | {x} |")
    return out


def _engine_table(infos: dict[str, dict]) -> list[str]:
    """Each engine as export measured it (bundle.json): accuracy, agreement, speed with one thread."""
    out = [_cpu_line(), "", "| model | engine | test accuracy | top-1 agreement with fp32 | batch-1 ms | "
                            "images/s at batch 32 | test images |", "|---|---|---|---|---|---|---|"]
    for label, info in infos.items():
        for name, e in info["engines"].items():
            if "latency_ms" not in e:
                out.append(f"| {label} | {name} | {e.get('skipped') or e.get('error')} | | | | |")
                continue
            mark = " (auto)" if name == _auto(info) else ""
            out.append(f"| {label} | {name}{mark} | {100 * e['accuracy']:.2f}% | {100 * e['agreement']:.2f}% | "
                       f"{e['latency_ms']:.3f} | {e['throughput']:,.0f} | {info['engines_measured']['test_images']} |")
    return out


def _targets(rows: list[dict], cifar: str, lite: str) -> list[str]:
    """The issue's targets, each with the figure measured and whether it is met (auto's engine on each model)."""
    by = {(r["model"], r["key"], r["shared"]): r for r in rows}
    auto = {m: next(r["key"] for r in rows if r["model"] == m and "auto's choice" in r["server"]) for m in (cifar, lite)}
    c, bare = by[(cifar, auto[cifar], False)], by[("HTTP ceiling", "bare", False)]
    lite_x = by[(lite, auto[lite], False)]["rps"] / by[(lite, "naive", False)]["rps"]
    kept = [by[(m, k, True)]["rps"] / by[(m, k, False)]["rps"] for (m, k, s) in by if k in ENGINES and not s]

    def line(ok: bool, text: str) -> str:
        return f"- {'met' if ok else 'NOT met'}: {text}"

    return [f"Targets (2 cores; `cnnlab serve` on auto's engine: {auto[cifar]} and {auto[lite]}):",
            line(c["rps"] >= 1500, f"{cifar} ≥ 1,500 requests/s: {c['rps']:,.0f}"),
            line(c["rps"] >= 0.5 * bare["rps"], f"{cifar} ≥ 50% of the bare app: {100 * c['rps'] / bare['rps']:.0f}%"),
            line(c["p99"] <= 15, f"{cifar} p99 ≤ 15 ms: {c['p99']:.1f} ms"),
            line(c["errors"] == 0, f"{cifar} zero errors: {c['errors']}"),
            line(lite_x >= 5, f"{lite} ≥ 5x the naive server: {lite_x:.1f}x"),
            line(min(kept) >= COLLAPSE, f"no collapse with one core busy (every cnnlab row keeps ≥ "
                                        f"{COLLAPSE:.0%} of its rate): the lowest keeps {min(kept):.0%}")]


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
    labels = {"report000 CIFAR-10 net (32 px)": cifar, "EfficientNet-Lite0 (224 px)": lite}
    infos = {label: _export(run) for label, run in labels.items()}
    rows = _rows([(label, _servers(run, infos[label], args.workers)) for label, run in labels.items()], image, args)
    body = [f"wrk, {args.connections} connections, 2 threads, {args.seconds} s per row, multipart upload of one "
            f"CIFAR-10 JPEG ({image.stat().st_size} bytes); servers and wrk on the same cores; every server measured "
            "back to back in one run, then all again with a busy process pinned to core 0.", "",
            *_load_table(rows), "", *_targets(rows, *labels), "",
            "Engines as `cnnlab export` measured them (all test images, or an even sample of 2,000; one thread; "
            "batch-1 latency of `Predictor.predict_arrays`: normalise, model, softmax):", "", *_engine_table(infos)]
    update_section("serve_load", "\n".join(body))


if __name__ == "__main__":
    main()
