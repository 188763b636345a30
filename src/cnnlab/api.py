"""The Python API: the verbs of the `cnnlab` command, each a thin call into the stage that does it.

    audit   data/audit.py           train   train/run.py        lr_find  train/lr_find.py
    study   train/study.py + report report  report/collect.py   evaluate evaluate/evaluation.py
    predict evaluate/predict.py     export  serve/bundle.py     serve    serve/app.py
    explain evaluate/explain.py (through the Predictor)

Data flows one way through a run: config -> data and split -> model -> run folder -> loaders ->
fit -> evaluation on the test split -> summary.json and report (train/run.py reads in that order).
Every user mistake is raised as `UserError` before anything is written.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from cnnlab.core import signals
from cnnlab.core.config import Config, apply_sets, load_config, merge, set_dotted  # noqa: F401 (the CLI reads configs)
from cnnlab.core.errors import UserError
from cnnlab.core.figures import image_grid
from cnnlab.core.runs import RunFolder, atomic_write, load_run, new_run_dir
from cnnlab.data.audit import AuditReport, audit as _audit, format_report, write_audit
from cnnlab.data.decode import DecodeError, is_image_name
from cnnlab.data.sources import resolve_data, scan_folder
from cnnlab.evaluate.evaluation import evaluate_run
from cnnlab.evaluate.explain import DEFAULT_METHOD, check_method, overlay
from cnnlab.evaluate.predict import Predictor
from cnnlab.models import create_model, get_entry, list_families, list_models
from cnnlab.models import weights as _weights
from cnnlab.models.summary import format_summary, summarize
from cnnlab.report.collect import write_report
from cnnlab.serve import bundle
from cnnlab.train import run as _run
from cnnlab.train.distributed import is_main_process  # noqa: F401 (the CLI asks through the API)
from cnnlab.train.lr_find import find_lr
from cnnlab.train.study import run_study

PARITY_LIMIT = 1e-5  # export --check: the largest probability difference a bundle may have to evaluation's


def audit(data: str, out: str | Path = "audit.json", workers: int = 2, log=print) -> AuditReport:
    """Decode every image of `data`, print the summary, write `out` plus two figures beside it."""
    root, line = resolve_data(data)
    log(line)
    scan = scan_folder(root)
    if not scan.items:
        raise UserError(f"no images found in {root}; expected class subfolders of images (or train/ and test/ folders)")
    report = _audit(scan, workers=workers)
    log(format_report(report))
    for p in write_audit(report, scan, Path(out)):
        log(f"wrote {p}")
    return report


def train_config(path: str | Path | None = None, overrides: dict | None = None, sets: list[str] = (),
                 resume: str | Path | None = None) -> Config:
    """The config `cnnlab train` runs: a YAML file with flags and `--set`s over it, or with `resume` the
    run's own config.yaml (the flags then change only what a resume may change)."""
    if resume:
        if path:
            raise UserError("give either a config file or --resume RUN (which uses the run's own config)")
        path = RunFolder(resume).config
        if not path.is_file():
            raise UserError(f"--resume {resume}: not a run folder (no {RunFolder.config})")
    cfg = load_config(path, overrides, sets, from_init=not resume)
    epochs_named = "epochs" in merge(overrides or {}, apply_sets({}, sets)).get("train", {})
    if cfg.train.time_budget and epochs_named and not resume:
        raise UserError("give --epochs or --time-budget, not both: a time budget chooses the epochs itself")
    if resume:  # another --epochs makes every epoch whole: a cut-short last epoch was the old length's plan
        saved = load_config(path).train
        if cfg.train.epochs != saved.epochs and cfg.train.last_epoch_steps == saved.last_epoch_steps:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, last_epoch_steps=0))
    return cfg


def train(cfg: Config, progress: bool = True, log=print, resume: str | Path | None = None,
          started: float | None = None) -> Path:
    """Train and evaluate one model as `cfg` says; return its run folder.

    Args:
        cfg: a validated Config (see core/config.py).
        progress: show a per-epoch progress bar on a terminal.
        log: where progress lines go (also written to the run's log.txt).
        resume: a run folder to continue from its checkpoint (cfg must be compatible).
        started: the time.monotonic() a train.time_budget counts from (default: this call).
    """
    with signals.handled():
        return _run.train(cfg, progress, log, resume, started)


def lr_find(cfg: Config, log=print) -> Path:
    """The learning-rate range test for `cfg`'s model and data; returns the folder with lr_find.json/.png."""
    return find_lr(cfg, log)


def study(path: str | Path, out: str | Path = "studies", sets: list[str] = (), progress: bool = True,
          log=print) -> Path:
    """Run every child of a study file in order into one study folder, then write its report."""
    with signals.handled():
        folder = run_study(path, out, sets, progress, log)
    report(folder, log=log)
    return folder


def report(folders: list[str | Path] | str | Path, out: str | Path | None = None, log=print) -> Path:
    """Write the comparison report of a study folder, or of run folders, from their files alone.

    Returns the folder holding report.html and report.md (the study folder, or `out`).
    """
    folders = [Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders)]
    return write_report(folders, Path(out) if out else None, log)


def evaluate(run: str | Path, data: str | None = None, include_seen: bool = False, log=print) -> Path:
    """Evaluate a trained run on its test split, or on `data` (without the images it trained on, unless
    `include_seen`); returns the new folder under RUN/evaluations/."""
    return evaluate_run(run, data, include_seen, log)


def predict(run: str | Path, images: list[str]) -> list[dict]:
    """Class probabilities for each image file: [{path, prediction, probabilities}] or {path, error}."""
    predictor = Predictor.load(run, log=lambda line: print(line, file=sys.stderr))  # stdout is the JSON answer
    out = []
    for path in _image_files(images):
        p = Path(path)
        if p.is_dir():
            out.append({"path": str(path), "error": "a folder with no image files in it"})
            continue
        if not p.is_file():
            out.append({"path": str(path), "error": "file not found"})
            continue
        try:
            probs = predictor.predict_proba([p])[0]
        except DecodeError as e:
            out.append({"path": str(path), "error": f"not a usable image: {e}"})
            continue
        order = np.argsort(-probs)
        out.append({"path": str(path), "prediction": predictor.classes_[order[0]],
                    "probabilities": {predictor.classes_[i]: round(float(probs[i]), 6) for i in order}})
    return out


def explain(run: str | Path, images: list[str], target: str | None = None, method: str = DEFAULT_METHOD,
            layer: str | None = None, out: str | Path | None = None) -> tuple[Path | None, list[dict]]:
    """A PNG per image (the image as the model saw it, and beside it the class-activation map of the predicted
    class, or of `target`) with every class's probability: [{path, explained, probabilities, png}] or
    {path, error}. Written into `out` (default RUN/explanations/<time>-explain/), which is made only once
    an image has been explained; returns it (None when none was) and the results."""
    check_method(method)
    predictor = Predictor.load(run, log=lambda line: print(line, file=sys.stderr))
    if target is not None:
        predictor.class_index(target)  # an unknown class is one error, before any image
    results, pngs = [], {}
    for path in _image_files(images):
        p = Path(path)
        if not p.is_file():
            results.append({"path": str(path), "error": "a folder with no image files in it" if p.is_dir()
                            else "file not found"})
            continue
        try:
            explanation, probs = predictor.explain(p, target, method, layer)
        except DecodeError as e:
            results.append({"path": str(path), "error": f"not a usable image: {e}"})
            continue
        name = predictor.classes_[explanation.target]
        drawn = overlay(explanation.image, explanation.cam)
        png, n = f"{p.stem}.png", 1
        while png in pngs:  # the same name from another folder: numbered, never overwritten
            png, n = f"{p.stem}-{n}.png", n + 1
        pngs[png] = image_grid([explanation.image.transpose(1, 2, 0), drawn],
                               [f"{p.name[:40]}\nas the model sees it", f"{method}, layer {explanation.layer}\n"
                                f"map of {name} ({probs[explanation.target]:.2f})"], ncols=2, side=drawn.shape[0])
        order = np.argsort(-probs)
        results.append({"path": str(path), "explained": name, "method": method, "layer": explanation.layer,
                        "probabilities": {predictor.classes_[i]: round(float(probs[i]), 6) for i in order},
                        "png": png})
    if not pngs:
        return None, results
    folder = Path(out) if out else new_run_dir(RunFolder(predictor.folder).explanations, "explain")
    folder.mkdir(parents=True, exist_ok=True)
    for png, data in pngs.items():
        atomic_write(folder / png, data)
    for r in results:
        if "png" in r:
            r["png"] = str(folder / r["png"])
    return folder, results


def _image_files(paths: list[str]) -> list[str]:
    """The paths as given, a folder replaced by the image files in it (in name order)."""
    out = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_name(f.name)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            out.extend(found or [str(p)])  # an empty folder stays, to be reported
        else:
            out.append(str(p))
    return out


def export(run: str | Path, out: str | Path | None = None, check: bool = False, log=print) -> Path:
    """Write the deployable bundle of `run` (default RUN/bundle); with `check`, confirm that its
    probabilities equal evaluation's on every test image, or raise UserError."""
    folder = bundle.export(run, out, log=log)
    if check:
        err = bundle.check(folder, load_run(run).dir, log=log)
        if err > PARITY_LIMIT:
            raise UserError(f"bundle {folder}: its probabilities differ from evaluation's by {err:.2e} (over "
                            f"{PARITY_LIMIT:g}); do not deploy it: check the onnxruntime and torch versions and "
                            "export again")
    return folder


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, threads: int = 1,
          engine: str = "auto", max_body: int = 10 * 2**20, api_key: str = "", log=print) -> None:
    """Serve the page and REST API for a bundle, or for a run folder (exported to RUN/bundle first).
    engine: auto | onnx | int8 | bf16 | torch, as `Predictor.load` takes it."""
    from cnnlab.serve.app import check_port, serve as _serve

    path = Path(path)
    if not (path / bundle.BUNDLE_FILE).is_file() and not (path / "bundle" / bundle.BUNDLE_FILE).is_file():
        try:
            load_run(path)
        except UserError as e:
            raise UserError(f"{path} is neither a bundle nor a trained run folder ({e})") from None
        check_port(host, port)  # before a slow export: a taken port is said at once
        bundle.export(path, log=log)
    _serve(str(path), host, port, workers, threads, engine, max_body, api_key, log=log)


def models() -> list[tuple[str, int, str]]:
    """(name, default input side, description) of every registered model, then the families that take
    any name (`timm:NAME`, `tv:NAME`; side 0: the network's own)."""
    named = [(name, get_entry(name).default_size, get_entry(name).description) for name in list_models()]
    return named + [(pattern, 0, description) for pattern, description in list_families()]


def summary(name: str, image_size: int = 0, num_classes: int = 10) -> str:
    """The per-layer table of a registered model, with parameter counts and output shapes."""
    size = image_size or get_entry(name).default_size
    return format_summary(name, summarize(create_model(name, num_classes, size), size), size)


def weights_list() -> list[tuple[str, str]]:
    """(name, where its weights are found, or that they are not) for every pretrained network."""
    return _weights.available()


def weights_fetch(name: str) -> str:
    """Download `name`'s ImageNet weights into the cnnlab cache (needs a network); return where."""
    return _weights.fetch(name)
