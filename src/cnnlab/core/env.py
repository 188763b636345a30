"""The process environment: seeds, threads, precision and a record of versions for env.json."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import cnnlab
from cnnlab.core.errors import UserError


def cache_dir() -> Path:
    """Where cnnlab keeps what it can rebuild (decoded tensors, features, extracted archives, weights):
    $CNNLAB_CACHE, else ~/.cache/cnnlab."""
    return Path(os.environ.get("CNNLAB_CACHE") or Path.home() / ".cache" / "cnnlab")


def offline() -> bool:
    """CNNLAB_OFFLINE=1 (or true, yes): never download weights or data."""
    return os.environ.get("CNNLAB_OFFLINE", "").lower() in ("1", "true", "yes")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch, and set the kernels either way: deterministic ones (no cuDNN autotuning,
    no TF32), or the fastest (cuDNN picks per shape, TF32 matmuls on GPUs that have it). Both ways, because one
    process may run several trainings (a study, the tests) and a deterministic one must not leave the next slow,
    nor a fast one leave the next unrepeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it when it starts
    # called only to change the setting: it imports torch's compiler, 1.4 s of every run's start
    now = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if now != (deterministic, False):
        torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic


def set_threads(threads: int, processes: int = 1) -> int:
    """Use `threads` intra-op threads (0 = this process's share of the cores it may run on).

    `processes` is how many training processes share this machine (torchrun's local world):
    each takes its share, so two ranks on two cores do not run four threads.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = threads or max(1, cores // max(1, processes))
    torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_has_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AMX or AVX512-BF16), where bf16 autocast pays.

    CNNLAB_CPU_BF16=0 (or 1) overrides the answer, so the other CPU kind's path (the precision
    `auto` picks, its notes) can be run and tested on the machine at hand.
    """
    forced = os.environ.get("CNNLAB_CPU_BF16", "")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast precision to train in: the configured one, or the fastest safe one here."""
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def precision_note(requested: str, resolved: str, device: torch.device) -> str:
    """A line saying why the CPU trains in the precision it does ('' when there is nothing to say)."""
    if device.type != "cpu" or cpu_has_bf16():
        return ""
    if requested == "auto":
        return "precision: fp32, because this CPU has no AMX or AVX512-BF16 (bf16 would run far slower here)"
    if resolved == "bf16":
        return "warning: this CPU has no AMX or AVX512-BF16; bf16 autocast runs many times slower than fp32 here"
    return ""


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(__file__))
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def env_info(device: torch.device | None = None) -> dict:
    from importlib.metadata import version  # the installed torchvision's version, without a second import of it

    return {
        "cnnlab": cnnlab.__version__,
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_has_bf16(),
        "device": str(device) if device else "cpu",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
