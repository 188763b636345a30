"""The run report: `report.md` and a self-contained `report.html` (images embedded as base64).

Built only from the files in the run folder (summary.json, split.csv, config.yaml, history.csv,
the PNGs and model_summary.txt), so it can be rebuilt without the model.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import yaml

from cnnlab.core.runs import RunFolder, atomic_write, load_json, read_csv

FIGURES = [(RunFolder.class_distribution, "Data: images per class and split"), (RunFolder.curves, "Training curves"),
           (RunFolder.confusion, "Confusion matrix"),
           (RunFolder.misclassified, "Misclassified test images, with where the network looked (Grad-CAM)"),
           (RunFolder.confident, "The most confident right answers, with where the network looked (Grad-CAM)"),
           (RunFolder.reliability, "Calibration: reliability on the test split, before and after temperature scaling")]


SPLITS = ("train", "val", "test")  # the split values of split.csv (cnnlab.data.splits)


def data_facts(run_dir: Path, summary: dict | None = None) -> dict:
    """The data a run used, from its own files: root, images per split, classes, image size.

    Counts come from split.csv, the manifest the run trained and tested on, so a report cannot
    echo a study's description instead; summary.json's per-class counts stand in for a folder
    without it, and config.yaml fills what an older summary.json lacks.
    """
    run = RunFolder(run_dir)
    summary = load_json(run.summary) if summary is None else summary
    data = summary.get("data") or {}
    if run.split.is_file():
        rows = read_csv(run.split)
        counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
        classes = len({r["class"] for r in rows})
    else:
        per_class = data.get("counts") or {}
        counts = {s: sum(c.get(s, 0) for c in per_class.values()) for s in SPLITS}
        classes = len(summary.get("classes") or per_class)
    cfg = {}
    if not (data.get("root") and data.get("image_size")) and run.config.is_file():
        cfg = (yaml.safe_load(run.config.read_text()) or {}).get("data") or {}
    return {"root": str(data.get("root") or cfg.get("path") or "unknown data"), **counts, "classes": classes,
            "image_size": data.get("image_size") or cfg.get("image_size") or None,
            "rejected": data.get("rejected") or 0, "split_sha256": data.get("split_sha256", "")}


def data_line(facts: dict, with_size: bool = True) -> str:
    """`<root>, N train / N val / N test images, K classes, S px` (the same words in every report).

    Without `with_size` it names the images only: runs that decode the same images at other sizes
    (a CNN at 32 px, a pretrained network at 224) used the same data.
    """
    size = f"{facts['image_size']} px" if facts["image_size"] else "image size not recorded"
    line = (f"{facts['root']}, {facts['train']:,} train / {facts['val']:,} val / {facts['test']:,} test images, "
            f"{facts['classes']} classes" + (f", {size}" if with_size else ""))
    if facts["rejected"]:  # in split.csv but left out of training: they do not decode
        line += f" ({facts['rejected']:,} files left out, see {RunFolder.rejected})"
    return line


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def _tables(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    test = summary.get("test") or {}
    keys = ["loss", "accuracy", "top5_accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted",
            "recall_weighted", "f1_weighted", "ece", "images_per_second"]
    metrics = [[k, _fmt(test[k])] for k in keys if k in test]
    per_class = [[c, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), str(v["support"])]
                 for c, v in (test.get("per_class") or {}).items()]
    model = summary.get("model", {})
    run = [["status", summary.get("status", "")], ["model", model.get("name", "")],
           ["parameters (total / trainable)", f"{model.get('params_total', 0):,} / {model.get('params_trainable', 0):,}"],
           ["best epoch", str(summary.get("best_epoch", ""))],
           ["training time (s)", _fmt(summary.get("time", {}).get("train_seconds"))],
           ["precision", str(summary.get("precision", ""))]]
    if model.get("weights_source"):
        run.append(["starting weights", f"{model['weights_source']}"
                    + (f" (sha256 {model['weights_sha256'][:16]})" if model.get("weights_sha256") else "")])
    cal = summary.get("calibration")
    if cal:
        t = cal["test"]
        run.append(["calibration", f"temperature {cal['temperature']:.3f} ({cal['fitted_on']}); test ECE "
                    f"{t['ece_before']:.4f} -> {t['ece_after']:.4f}, NLL {t['nll_before']:.4f} -> {t['nll_after']:.4f}"])
    if summary.get("message"):
        run.append(["note", summary["message"]])
    phases = [[d["name"], f"{d['lr']:g}", str(d["epochs"]), d["status"], f"{d['train_seconds']:.1f}",
               f"{d['params_trainable']:,} / {d['params_total']:,}",
               f"{d['features']['engine']}, {d['features']['seconds']:.1f} s" if d.get("features") else ""]
              for d in summary.get("phases") or []]
    return [("Run", ["", ""], run),
            ("Phases", ["phase", "lr", "epochs", "status", "time (s)", "trainable / total parameters",
                        "cached features"], phases if len(phases) > 1 or any(r[0] != "scratch" for r in phases) else []),
            ("Test metrics", ["metric", "value"], metrics),
            ("Per class", ["class", "precision", "recall", "f1", "support"], per_class)]


def write_run_report(run_dir: Path) -> tuple[Path, Path]:
    """Write report.md and report.html into `run_dir`; return both paths."""
    run = RunFolder(run_dir)
    summary = load_json(run.summary)
    title = f"cnnlab run {run.dir.name}"
    model_text = run.model_summary.read_text() if run.model_summary.is_file() else ""
    tables = _tables(summary)
    data = "Data: " + data_line(data_facts(run.dir, summary))
    history = read_csv(run.history) if run.history.is_file() else []

    md = [f"# {title}", "", data, ""]
    for name, header, rows in tables:
        if not rows:
            continue
        md += [f"## {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    if history:
        cols = list(history[0])
        md += ["## History", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(_fmt(float(r[c])) if c not in ("epoch", "phase") else r[c] for c in cols) + " |" for r in history] + [""]
    for fname, caption in FIGURES:
        if (run.dir / fname).is_file():
            md += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    if model_text:
        md += ["## Model", "", "```", model_text, "```", ""]
    md_path = atomic_write(run.report_md, "\n".join(md))

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(data)}</p>"]
    for name, header, rows in tables:
        if not rows:
            continue
        parts.append(f"<h2>{name}</h2><table>")
        if any(header):
            parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    for fname, caption in FIGURES:
        if (run.dir / fname).is_file():
            data = base64.b64encode((run.dir / fname).read_bytes()).decode()
            parts.append(f"<h2>{caption}</h2><img alt='{caption}' src='data:image/png;base64,{data}'>")
    if model_text:
        parts.append(f"<h2>Model</h2><pre>{html.escape(model_text)}</pre>")
    parts.append("</body></html>")
    html_path = atomic_write(run.report, "\n".join(parts))
    return md_path, html_path
