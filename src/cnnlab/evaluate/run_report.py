"""The run report: `report.md` and a self-contained `report.html` (images embedded as base64).

Built only from the files in the run folder (summary.json, history.csv, the PNGs and
model_summary.txt), so it can be rebuilt without the model.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from cnnlab.core.runs import atomic_write, load_json, read_csv

FIGURES = [("class_distribution.png", "Data: images per class and split"), ("curves.png", "Training curves"),
           ("confusion_matrix.png", "Confusion matrix"), ("misclassified.png", "Misclassified test images")]


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
           ["precision", str(summary.get("precision", ""))], ["data", str(summary.get("data", {}).get("root", ""))]]
    if model.get("weights_source"):
        run.append(["starting weights", f"{model['weights_source']}"
                    + (f" (sha256 {model['weights_sha256'][:16]})" if model.get("weights_sha256") else "")])
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
    run_dir = Path(run_dir)
    summary = load_json(run_dir / "summary.json")
    title = f"cnnlab run {run_dir.name}"
    model_text = (run_dir / "model_summary.txt").read_text() if (run_dir / "model_summary.txt").is_file() else ""
    tables = _tables(summary)
    history = read_csv(run_dir / "history.csv") if (run_dir / "history.csv").is_file() else []

    md = [f"# {title}", ""]
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
        if (run_dir / fname).is_file():
            md += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    if model_text:
        md += ["## Model", "", "```", model_text, "```", ""]
    md_path = atomic_write(run_dir / "report.md", "\n".join(md))

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for name, header, rows in tables:
        if not rows:
            continue
        parts.append(f"<h2>{name}</h2><table>")
        if any(header):
            parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    for fname, caption in FIGURES:
        if (run_dir / fname).is_file():
            data = base64.b64encode((run_dir / fname).read_bytes()).decode()
            parts.append(f"<h2>{caption}</h2><img alt='{caption}' src='data:image/png;base64,{data}'>")
    if model_text:
        parts.append(f"<h2>Model</h2><pre>{html.escape(model_text)}</pre>")
    parts.append("</body></html>")
    html_path = atomic_write(run_dir / "report.html", "\n".join(parts))
    return md_path, html_path
