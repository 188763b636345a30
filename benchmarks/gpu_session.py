"""One short GPU session: what ../shared/GPU-CHECKLIST.md expects a first CUDA run to break, then the
time-to-accuracy figures, each step bounded, everything logged under $OUT.

    python benchmarks/device_kit.py pack          # here, once: CIFAR-10 and the wheels into .device/
    # then, through the device tool, with carry [".device"] and a timeout that leaves time to rerun:
    python3 benchmarks/gpu_session.py             # there; results in $OUT/gpu_session.json and $OUT/logs/
    python benchmarks/gpu_session.py --cpu        # here: the same steps on the CPU, to rehearse the script

Steps (each under its own timeout, never stopping the others):
1. compile + bf16 + data on the GPU, killed after its first checkpoint and resumed (recompiles counted
   from TORCH_LOGS=recompiles);
2. a --deterministic fp16 run twice, the second killed and resumed: the same weights, byte for byte;
3. a pretrained network (resnet18, its weights file written here) frozen, then one block unfrozen;
4. torchrun with NCCL, world size 1 (and 2 where the machine has two GPUs), with lr: auto;
5. the default recipe on all of CIFAR-10, and fastnet_l: test accuracy and training seconds.
With --cpu, fp16 becomes fp32, compile is off and the data is 20 images per class, so only the
plumbing is rehearsed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".device"


class Session:
    def __init__(self, out: Path, cpu: bool, seconds: float):
        self.out, self.cpu, self.results = out, cpu, []
        # run folders, caches and the images stay out of $OUT, whose files all travel back: only logs and results
        self.work = out / "work" if cpu else Path("/tmp/cnnlab-gpu-session")
        self.deadline = time.monotonic() + seconds  # the device tool stops a command at 10 minutes
        (out / "logs").mkdir(parents=True, exist_ok=True)
        site = Path("/tmp/site")
        wheels = sorted((KIT / "wheels").glob("*.whl"))
        if wheels and not cpu:  # what the device image lacks (benchmarks/device_kit.py)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                            str(site), *map(str, wheels)], check=True)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(site)]),
                    "CNNLAB_OFFLINE": "1", "TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1",
                    "CNNLAB_CACHE": str(self.work / "cache"), **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}

    def cnnlab(self, name: str, args: list[str], timeout: int = 120, kill_after_checkpoint: Path | None = None,
               launcher: list[str] | None = None) -> tuple[int, str]:
        """Run one cnnlab command (killed with SIGKILL once `kill_after_checkpoint` holds a checkpoint)."""
        cmd = [*(launcher or [sys.executable, "-m"]), "cnnlab", *args]
        log = self.out / "logs" / f"{name}.log"
        start = time.monotonic()
        timeout = min(timeout, self.deadline - start)  # a step past the session's end is killed at once
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
            try:
                while proc.poll() is None and time.monotonic() - start < timeout:
                    if kill_after_checkpoint and any(kill_after_checkpoint.glob("*/checkpoint.safetensors")):
                        proc.kill()
                    time.sleep(0.05)
                if proc.poll() is None:
                    proc.kill()
                    f.write(f"\n(killed: over its {timeout} s)\n")
            finally:
                proc.wait()
        return proc.returncode, log.read_text()

    def record(self, step: str, ok: bool, **details) -> None:
        self.results.append({"step": step, "ok": ok, **details})
        print(f"{'ok  ' if ok else 'FAIL'} {step}: {details}", flush=True)
        (self.out / "gpu_session.json").write_text(json.dumps(self.results, indent=1))


def _run(root: Path) -> Path | None:
    runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return runs[-1] if runs else None


def _summary(run: Path | None) -> dict:
    path = run / "summary.json" if run else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


FINISHED = ("completed", "failed_to_learn")  # a run that ended as runs end (a small sample may not learn)


def killed_and_resumed(s: Session, name: str, args: list[str], root: Path) -> tuple[Path | None, str, bool]:
    """Train, SIGKILL after the first checkpoint, resume to the end: (run folder, the logs, whether it was
    killed: a run that ended before its first checkpoint was not)."""
    rc, first = s.cnnlab(name, ["train", *args, "--out", str(root)], kill_after_checkpoint=root)
    run = _run(root)
    if run is None:
        return None, first, False
    _, second = s.cnnlab(name, ["train", "--resume", str(run), "--no-progress"])
    return run, first + second, rc == -9


def main() -> None:
    # Over 60 lines on purpose: the session's steps in the order the checklist gives them.
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="rehearse on the CPU (fp32, no compile, a small sample)")
    ap.add_argument("--seconds", type=float, default=540, help="the whole session's limit (default 540)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "out" / "gpu")))
    args = ap.parse_args()
    s = Session(args.out, args.cpu, args.seconds)
    data = s.work / "cifar10"
    if not data.is_dir():
        subprocess.run([sys.executable, str(Path(__file__).parent / "device_kit.py"), "unpack", str(data)], check=True)
    sample = ["--data", str(data), "--no-progress", "--set", f"data.limit_per_class={20 if args.cpu else 500}"]
    gpu = not args.cpu
    low = "bf16" if gpu else "fp32"

    root = s.work / "1-compile"
    run, text, killed = killed_and_resumed(s, "1-compile", [*sample, "--model", "fastnet", "--epochs", "2", "--precision", low,
                                                    "--set", f"train.compile={str(gpu).lower()}",
                                                    "--set", "train.checkpoint_steps=5"], root)
    summary = _summary(run)
    s.record("compile + bf16 + kill + resume", killed and summary.get("status") in FINISHED, killed=killed,
             status=summary.get("status"),
             recompiles=text.count("Recompiling"), test_accuracy=summary.get("test", {}).get("accuracy"))

    det = [*sample, "--model", "fastnet", "--epochs", "2", "--deterministic", "--precision", "fp16" if gpu else "fp32",
           "--set", "train.checkpoint_steps=5", "--seed", "3"]
    s.cnnlab("2-deterministic", ["train", *det, "--out", str(s.work / "2-straight")])
    straight = _run(s.work / "2-straight")
    resumed, _, killed = killed_and_resumed(s, "2-deterministic", det, s.work / "2-resumed")
    same = bool(straight and resumed) and _sha(straight / "model.safetensors") == _sha(resumed / "model.safetensors") != ""
    s.record("deterministic fp16 twice, one killed and resumed", same and killed, killed=killed,
             statuses=[_summary(straight).get("status"), _summary(resumed).get("status")])

    weights = s.work / "resnet18.safetensors"
    code = ("import torch, torchvision; from safetensors.torch import save_file; "
            "m = torchvision.models.resnet18(num_classes=1000); "
            f"save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, {str(weights)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env=s.env)
    rc, _ = s.cnnlab("3-pretrained", ["train", *sample, "--model", "resnet18", "--weights", str(weights), "--freeze",
                                      "--unfreeze", "1", "--epochs", "1", "--input-size", "64", "--image-size", "32",
                                      "--out", str(s.work / "3-pretrained")])
    summary = _summary(_run(s.work / "3-pretrained"))
    s.record("pretrained weights file, frozen then one block unfrozen", rc == 0 and len(summary.get("phases", [])) == 2,
             rc=rc, status=summary.get("status"))

    gpus = 0 if args.cpu else int(subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                                                 capture_output=True, text=True, env=s.env).stdout.strip() or 0)
    for world in sorted({1, min(2, max(1, gpus))}):
        root = s.work / f"4-torchrun-{world}"
        rc, _ = s.cnnlab(f"4-torchrun-{world}", ["train", *sample, "--model", "fastnet", "--epochs", "1", "--lr", "auto",
                                                 "--out", str(root)],
                         launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                   str(world), "-m"])
        summary = _summary(_run(root))
        s.record(f"torchrun, {world} process(es), lr auto", rc == 0 and summary.get("status") in FINISHED, rc=rc,
                 lr=(summary.get("phases") or [{}])[0].get("lr"))

    full = [] if gpu else ["--set", "data.limit_per_class=20"]
    for model, timeout in (("fastnet", 300), ("fastnet_l", 300)):
        root = s.work / f"5-{model}"
        rc, _ = s.cnnlab(f"5-{model}", ["train", "--data", str(data), "--model", model, "--no-progress", *full,
                                        "--out", str(root)], timeout=timeout)
        summary = _summary(_run(root))
        s.record(f"time to accuracy: {model}, the default recipe", rc == 0, rc=rc,
                 test_accuracy=summary.get("test", {}).get("accuracy"),
                 train_seconds=summary.get("time", {}).get("train_seconds"))
    sys.exit(0 if all(r["ok"] for r in s.results) else 1)


if __name__ == "__main__":
    main()
