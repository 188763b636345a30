"""Run folders and the files in them, always written atomically.

A run writes only inside `runs/<YYYYmmdd-HHMMSS>-<model>[-<tag>]/`. Every file goes through
`atomic_write` (temporary file, fsync, rename), so a crash leaves either the old file or the new
one, never half of one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import secrets
import time
from pathlib import Path
from typing import Iterable

from cnnlab.core.errors import UserError


def new_run_dir(root: str | Path, model: str, tag: str = "") -> Path:
    """Create and return a fresh run folder under `root` (never reusing an existing one)."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {root}: {e.strerror}; pass --out a writable folder") from None
    stem = "-".join(p for p in (time.strftime("%Y%m%d-%H%M%S"), slug(model), slug(tag)) if p)
    for i in range(1000):
        path = root / (stem if i == 0 else f"{stem}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"too many run folders named {stem} in {root}")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("_")


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` via a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 1 MiB chunks (weights files can be gigabytes)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN; null says "not a number" honestly
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def save_json(path: str | Path, obj) -> Path:
    return atomic_write(path, json.dumps(_json_safe(obj), indent=2) + "\n")


def load_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_csv(path: str | Path, header: list[str], rows: Iterable[Iterable]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return atomic_write(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


ENDED = ("completed", "early_stopped", "failed_to_learn", "diverged")  # statuses of a run whose training is over


def is_finished(run_dir: Path) -> bool:
    """A run whose training ended; not one stopped by a signal or by an error, which --resume continues."""
    summary = Path(run_dir) / "summary.json"
    return summary.is_file() and load_json(summary).get("status") in ENDED


def find_run(path: str | Path) -> Path:
    """Check that `path` is a finished run folder (it has model.json) and return it."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"run folder {p} not found; pass the folder printed as 'run: ...' by cnnlab train")
    if not (p / "model.json").is_file() or not (p / "model.safetensors").is_file():
        raise UserError(f"{p} is not a finished run folder (no model.json / model.safetensors); pass the folder "
                        "printed as 'run: ...' by cnnlab train")
    if (p / "summary.json").is_file() and load_json(p / "summary.json").get("status") == "failed":
        raise UserError(f"{p} failed ({load_json(p / 'summary.json').get('message', '')}); see its log.txt, then "
                        f"continue it with `cnnlab train --resume {p}`")
    return p
