"""`cnnlab` killed by SIGKILL half-way through its Nth checkpoint write, as a power cut would.

Usage: tests/fault_probe.py N train ARGS... : the Nth write of checkpoint.safetensors leaves half its
bytes in `.checkpoint.safetensors.fault.tmp` beside it, then the process is killed at once.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import cnnlab.train.checkpoints as checkpoints
from cnnlab.cli import main

nth, argv = int(sys.argv[1]), sys.argv[2:]
writes = []
atomic_write = checkpoints.atomic_write


def dying_write(path, data):
    writes.append(path)
    if len(writes) == nth:
        tmp = Path(path).with_name(f".{Path(path).name}.fault.tmp")
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return atomic_write(path, data)


checkpoints.atomic_write = dying_write
raise SystemExit(main(argv))
