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

import yaml

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


STUDY_FILE = "study.json"  # a study folder's record of its children (train/study.py), beside runs/


class _File:
    """One file of a run folder: its name on the class (`RunFolder.summary`), its path on an instance."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, run, owner=None):
        return self.name if run is None else run.dir / self.name


class RunFolder:
    """A run folder and every file it can hold, each named here once.

    Written in about this order by train/run.py; an evaluation folder (`evaluations/<time>-evaluation/`)
    holds the evaluation's four files under the same names.
    """

    config = _File("config.yaml")  # the resolved config: what was used, not "auto"
    split = _File("split.csv")  # every image's path, class, split and sha256
    env = _File("env.json")
    model_summary = _File("model_summary.txt")
    log = _File("log.txt")
    class_distribution = _File("class_distribution.png")
    rejected = _File("rejected.csv")  # files left out because they do not decode
    checkpoint = _File("checkpoint.safetensors")  # the whole training state, for --resume
    history = _File("history.csv")
    phases = _File("phases.json")  # the finished phases of a pretrained run
    weights = _File("model.safetensors")  # the best weights so far: written only by train/run.py:_save_model
    best_head = _File("head.safetensors")  # the best head of a phase trained on cached backbone features
    model = _File("model.json")  # how to rebuild and feed the weights
    curves = _File("curves.png")
    predictions = _File("predictions.csv")
    metrics = _File("metrics.json")  # an evaluation folder's metrics (a run keeps them in summary.json)
    confusion = _File("confusion_matrix.png")
    misclassified = _File("misclassified.png")  # the most confident mistakes, each with its class-activation maps
    confident = _File("confident.png")  # the most confident right answers, with theirs
    reliability = _File("reliability.png")  # calibration on the test split, before and after the temperature
    summary = _File("summary.json")  # written last but the report: a run with one has ended or failed
    report = _File("report.html")
    report_md = _File("report.md")
    lr_find = _File("lr_find.json")  # an lr-find folder instead of a training run
    lr_find_plot = _File("lr_find.png")
    evaluations = _File("evaluations")
    explanations = _File("explanations")  # `cnnlab explain`'s folders
    bundle = _File("bundle")

    def __init__(self, path: str | Path):
        self.dir = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.dir)!r})"

    def read_summary(self) -> dict:
        return load_json(self.summary) if self.summary.is_file() else {}

    def saved_config(self, flag: str) -> dict:
        """This run's config.yaml as written (a UserError naming `flag` when there is none)."""
        if not self.config.is_file():
            raise UserError(f"{flag} {self.dir}: not a run folder (no {self.config.name}); "
                            "pass a finished run's folder")
        return yaml.safe_load(self.config.read_text()) or {}

    def status(self) -> str:
        """'' before summary.json; then completed | early_stopped | failed_to_learn | diverged | interrupted | failed."""
        return self.read_summary().get("status", "")

    def finished(self) -> bool:
        """The one meaning of finished: training ended (not stopped by a signal or an error, which --resume
        continues)."""
        return self.status() in ENDED

    def has_model(self) -> bool:
        return self.model.is_file() and self.weights.is_file()


def load_run(path: str | Path, need_model: bool = True) -> RunFolder:
    """The finished run folder at `path` (with its trained model, unless `need_model` is False), or a
    UserError saying what it is instead and what to do. Every command that reads a run comes here."""
    run = RunFolder(path)
    p = run.dir
    if not p.is_dir():
        raise UserError(f"run folder {p} not found; pass the folder printed as 'run: ...' by cnnlab train")
    if run.lr_find.is_file():
        raise UserError(f"{p} is an lr-find folder, not a training run; pass the folder printed as 'run: ...' by "
                        "cnnlab train")
    if not run.config.is_file():
        raise UserError(f"{p} is not a run folder (no {RunFolder.config}); pass the folder printed as 'run: ...' by "
                        "cnnlab train")
    status = run.status()
    if status == "failed":
        raise UserError(f"{p} failed ({run.read_summary().get('message', '')}); see its {RunFolder.log}, then "
                        f"continue it with `cnnlab train --resume {p}`")
    if status not in ENDED:
        why = "was interrupted" if status == "interrupted" else f"has not finished (no {RunFolder.summary})"
        raise UserError(f"{p} {why}; finish it with `cnnlab train --resume {p}`")
    if need_model and not run.has_model():
        if run.read_summary().get("best_epoch"):  # it trained: the files were moved or deleted since
            missing = ", ".join(f.name for f in (run.model, run.weights) if not f.is_file())
            raise UserError(f"{p} has lost its trained model ({missing} missing); put the file back or train again")
        raise UserError(f"{p} has no trained model ({status}: no epoch finished with finite weights); "
                        "train it again, with a lower learning rate if it diverged")
    return run

