"""`cnnlab` as torchrun (or plain python) starts it, recording each rank's weights after every optimizer step.

Usage: [torchrun ...] tests/ddp_probe.py OUT_DIR train ARGS...  ->  OUT_DIR/rank<R>.json with
{"threads": torch's intra-op threads, "steps": [sha256 of all parameters after each step]}.
`recording(build_optimizer, steps)` is the same recorder for a run in the test's own process.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch


def recording(build, steps: list[str]):
    """`build` (cnnlab.train.loop.build_optimizer) with a hook that appends the parameters' digest to `steps`."""

    def recording_optimizer(params, cfg):
        params = list(params)
        optimizer = build(params, cfg)

        def record(*_):
            digest = hashlib.sha256()
            for p in params:
                digest.update(p.detach().cpu().contiguous().numpy().tobytes())
            steps.append(digest.hexdigest())

        optimizer.register_step_post_hook(record)
        return optimizer

    return recording_optimizer


if __name__ == "__main__":
    import cnnlab.train.loop
    from cnnlab.cli import main

    out, argv, steps = Path(sys.argv[1]), sys.argv[2:], []
    cnnlab.train.loop.build_optimizer = recording(cnnlab.train.loop.build_optimizer, steps)
    code = main(argv)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"threads": torch.get_num_threads(),
                                                                             "steps": steps}))
    raise SystemExit(code)
