"""The comparison report of several runs: one table, the curves, the confusion matrices and a
short written comparison, as `report.md` and a self-contained `report.html`.

Built from run folders alone (summary.json, split.csv, history.csv, predictions.csv, the galleries
with their maps, model.safetensors' size and the data's image files for thumbnails); no model code runs, so
`cnnlab report` rebuilds it anywhere the folders are. Best values are bold; diverged and failed
runs are flagged and left out of "best". The data line comes from the runs' files, not from a
study's description, and runs on different data get a data column and a warning.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from pathlib import Path

import numpy as np

from cnnlab.core.errors import UserError
from cnnlab.core.figures import pyplot, save_figure
from cnnlab.core.runs import RunFolder, atomic_write, read_csv
from cnnlab.data.decode import DecodeError, decode_image
from cnnlab.evaluate.plots import integer_ticks
from cnnlab.evaluate.run_report import data_facts, data_line

OK = ("completed", "early_stopped")
# column: (header, format, better) — better is max/min for highlighting, None for none
COLUMNS = {
    "name": ("run", "{}", None), "model": ("model", "{}", None), "phase": ("phase", "{}", None),
    "image_size": ("px", "{}", None), "lr": ("lr", "{:g}", None), "epochs": ("epochs", "{}", None),
    "val_accuracy": ("val acc", "{:.2%}", max), "accuracy": ("test acc", "{:.2%}", max), "precision_macro": ("P macro", "{:.4f}", max),
    "recall_macro": ("R macro", "{:.4f}", max), "f1_macro": ("F1 macro", "{:.4f}", max),
    "precision_weighted": ("P weighted", "{:.4f}", max), "recall_weighted": ("R weighted", "{:.4f}", max),
    "f1_weighted": ("F1 weighted", "{:.4f}", max),
    "params_total": ("params", "{:,}", min), "params_trainable": ("trainable", "{:,}", min),
    "size_mb": ("size MB", "{:.2f}", min), "train_seconds": ("train s", "{:.0f}", min),
    "epoch_seconds": ("s/epoch", "{:.1f}", min), "latency_ms": ("ms/image (b=1)", "{:.2f}", min),
    "throughput": ("images/s", "{:,.0f}", max),
    "data": ("data", "{}", None),  # shown only when the runs used different data
    "status": ("status", "{}", None),
}


def run_row(folder: Path, name: str = "", group: str = "") -> dict:
    """One table row (plus history and the confusion matrix) from a finished run folder."""
    run = RunFolder(folder)
    s = run.read_summary()
    test, phases = s.get("test") or {}, s.get("phases") or []
    history = read_csv(run.history) if run.history.is_file() else []
    weights = run.weights
    row = {"name": name or folder.name, "group": group or s["model"]["name"], "folder": folder,
           "model": s["model"]["name"], "phase": " > ".join(p["name"] for p in phases) or "scratch",
           "lr": phases[-1]["lr"] if phases else s["train"]["lr"], "epochs": len(history),
           "params_total": s["model"]["params_total"], "params_trainable": s["model"]["params_trainable"],
           "size_mb": weights.stat().st_size / 2**20 if weights.is_file() else None,
           "train_seconds": s["time"]["train_seconds"],
           "epoch_seconds": float(np.mean(s["time"]["epoch_seconds"])) if s["time"]["epoch_seconds"] else None,
           "latency_ms": (s.get("inference") or {}).get("latency_ms"),
           "throughput": (s.get("inference") or {}).get("throughput"),
           "status": s["status"], "message": s.get("message", ""), "history": history,
           "confusion": test.get("confusion_matrix"), "classes": s["classes"], "data_root": s["data"]["root"]}
    best = s.get("best_epoch") or 0
    row["val_accuracy"] = float(history[best - 1]["val_accuracy"]) if 0 < best <= len(history) else None
    facts = data_facts(folder, s)
    row["data"], row["split_sha256"] = data_line(facts, with_size=False), facts["split_sha256"]
    row["image_size"] = facts["image_size"]
    for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted",
              "f1_weighted"):
        row[k] = test.get(k)
    return row


def _best(rows: list[dict]) -> dict[str, float]:
    best = {}
    for key, (_, _, better) in COLUMNS.items():
        values = [r[key] for r in rows if better and r["status"] in OK and r.get(key) is not None]
        if values:
            best[key] = better(values)
    return best


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    try:
        text = COLUMNS[key][1].format(value)
    except (ValueError, TypeError):  # e.g. lr "auto" in a run from before the range test resolved it
        text = str(value)
    if key == "status" and value not in OK:
        text = f"⚠ {value}"
    return text


def written_comparison(rows: list[dict]) -> list[str]:
    """A few sentences from the numbers: the best run, its margin, and what it costs.

    "Best" is chosen on the validation split; test figures are reported beside it, never used to
    choose (choosing on the test split is the seed reports' mistake). Runs on different data are
    compared only with runs on the same data.
    """
    by_data: dict[str, list[dict]] = {}
    for r in rows:
        by_data.setdefault(r["data"], []).append(r)
    if len(by_data) == 1:
        return _compare_on_one_data(rows)
    return [f"On {data}: " + " ".join(_compare_on_one_data(members)) for data, members in by_data.items()]


def ranked(rows: list[dict]) -> list[dict]:
    """The runs with a usable result, best validation accuracy first (test figures never choose)."""
    return sorted((r for r in rows if r["status"] in OK and r.get("val_accuracy") is not None),
                  key=lambda r: -r["val_accuracy"])


def best_by_data(rows: list[dict]) -> dict[str, dict]:
    """The best run on each data set: runs on different images are never ranked against each other."""
    best = {}
    for data in sorted({r["data"] for r in rows}):
        ok = ranked([r for r in rows if r["data"] == data])
        if ok:
            best[data] = ok[0]
    return best


def _compare_on_one_data(rows: list[dict]) -> list[str]:
    ok = ranked(rows)
    lines = []
    if not ok:
        return ["No run finished with a usable result."]
    top = ok[0]
    lines.append(f"**{top['name']}** ({top['model']}, {top['phase']}, lr {top['lr']:g}) has the best validation "
                 f"accuracy, {top['val_accuracy']:.2%}; on the test split it reaches {top['accuracy']:.2%} "
                 f"(macro F1 {top['f1_macro']:.4f}). Runs are chosen on validation; test figures are reported, "
                 "not used for choosing.")
    if len(ok) > 1:
        second = ok[1]
        ratio_t = top["train_seconds"] / max(second["train_seconds"], 1e-9)
        ratio_p = top["params_total"] / max(second["params_total"], 1)
        lines.append(f"It leads {second['name']} by {100 * (top['val_accuracy'] - second['val_accuracy']):.2f} "
                     f"validation points, training {ratio_t:.1f}x as long with {ratio_p:.1f}x the parameters.")
        fastest = min(ok, key=lambda r: r["train_seconds"])
        if fastest is not top:
            lines.append(f"The fastest to train is {fastest['name']} ({fastest['train_seconds']:.0f} s, "
                         f"{fastest['val_accuracy']:.2%} on validation).")
        quick = [r for r in ok if r.get("latency_ms") is not None]
        if quick:
            q = min(quick, key=lambda r: r["latency_ms"])
            lines.append(f"The quickest to answer one image is {q['name']} ({q['latency_ms']:.2f} ms at batch 1).")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for g, members in groups.items():
        if len(members) > 1:
            good = [m for m in members if m["status"] in OK and m.get("val_accuracy") is not None]
            if len({m["lr"] for m in good}) > 1:  # runs of one learning rate (other seeds, say) compare nothing
                b = max(good, key=lambda r: r["val_accuracy"])
                lines.append(f"Across {g}'s learning rates, {b['lr']:g} works best on validation "
                             f"({b['val_accuracy']:.2%}; test {b['accuracy']:.2%}).")
    bad = [r for r in rows if r["status"] not in OK]
    if bad:
        lines.append("Flagged: " + "; ".join(f"{r['name']} {r['status']}" + (f" ({r['message']})" if r['message']
                                                                             else "") for r in bad) + ".")
    return lines


def plot_loss_panels(rows: list[dict]):
    """Train and validation loss of every run, one panel each (the first report's figure)."""
    plt = pyplot()
    with_history = [r for r in rows if r["history"]]
    n = max(1, len(with_history))
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.6 * cols, 2.9 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, r in zip(axes.flat, with_history):
        ep = range(1, len(r["history"]) + 1)
        ax.plot(ep, [float(h["train_loss"]) for h in r["history"]], "o-", ms=2, label="train")
        ax.plot(ep, [float(h["val_loss"]) for h in r["history"]], "o-", ms=2, label="validation")
        ax.set_title(f"{r['name']}" + ("" if r["status"] in OK else f" ({r['status']})"), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(integer_ticks())
        ax.set_ylabel("loss", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(with_history):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_accuracy_bars(rows: list[dict]):
    plt = pyplot()
    shown = [r for r in rows if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(shown) + 2), 3.6))
    colours = ["#36c" if r["status"] in OK else "#c63" for r in shown]
    ax.bar(range(len(shown)), [100 * r["accuracy"] for r in shown], color=colours)
    for i, r in enumerate(shown):
        ax.text(i, 100 * r["accuracy"] + 0.5, f"{100 * r['accuracy']:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(shown)), [r["name"] for r in shown], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _thumb(path: Path, side: int = 64) -> str:
    """A base64 JPEG thumbnail through the one decoder (EXIF turned, any mode to RGB, bombs refused); '' if none."""
    from PIL import Image

    try:
        im = decode_image(path).image
    except (DecodeError, OSError):
        return ""
    im.thumbnail((side, side))
    if max(im.size) < side:
        im = im.resize((side, side * im.size[1] // max(1, im.size[0])), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def _confusion_html(i: int, r: dict, per_cell: int) -> tuple[str, str]:
    """A confusion matrix whose off-diagonal cells link to the misclassified images behind them."""
    cm, classes = r["confusion"], r["classes"]
    if not cm:
        return "", ""
    predictions = RunFolder(r["folder"]).predictions
    preds = read_csv(predictions) if predictions.is_file() else []
    cells: dict[tuple[str, str], list[str]] = {}
    for p in preds:
        if p["target"] != p["prediction"]:
            cells.setdefault((p["target"], p["prediction"]), []).append(p["path"])
    peak = max(max(row) for row in cm) or 1
    out = ["<table class='cm'><tr><th>true \\ predicted</th>"
           + "".join(f"<th>{html.escape(c)}</th>" for c in classes) + "</tr>"]
    for a, true in enumerate(classes):
        out.append(f"<tr><th>{html.escape(true)}</th>")
        for b, pred in enumerate(classes):
            v = cm[a][b]
            shade = f"background:rgba(51,102,204,{0.85 * v / peak:.2f})"
            text = str(v) if a == b or not cells.get((true, pred)) else f"<a href='#r{i}-{a}-{b}'>{v}</a>"
            out.append(f"<td style='{shade}'>{text}</td>")
        out.append("</tr>")
    out.append("</table>")
    gallery = []
    root = Path(r["data_root"])
    for (true, pred), paths in sorted(cells.items(), key=lambda kv: -len(kv[1])):
        a, b = classes.index(true), classes.index(pred)
        imgs = "".join(f"<img title='{html.escape(p)}' src='data:image/jpeg;base64,{t}'>"
                       for p in paths[:per_cell] if (t := _thumb(root / p)))
        gallery.append(f"<div class='cell' id='r{i}-{a}-{b}'><b>{html.escape(r['name'])}</b>: true "
                       f"<b>{html.escape(true)}</b>, predicted <b>{html.escape(pred)}</b> ({len(paths)}; first "
                       f"{min(per_cell, len(paths))} shown)<br>{imgs}</div>")
    return "".join(out), "".join(gallery)


def data_notes(rows: list[dict]) -> tuple[list[str], bool]:
    """The data lines for the top of the report, and whether the table needs a data column."""
    lines = sorted({r["data"] for r in rows})
    if len(lines) > 1:
        return ["⚠ The runs used different data (see the data column): "
                "their numbers are not directly comparable."], True
    if not lines:
        return [], False
    sizes = {r.get("image_size") for r in rows}
    out = [f"Data: {lines[0]}" + (f", {sizes.pop()} px" if len(sizes) == 1 and None not in sizes else
                                  " (decoded at the sizes in the px column)")]
    if len({r["split_sha256"] for r in rows}) > 1:  # same counts, other images: the test sets differ
        out.append("⚠ The runs split the data differently (their split.csv files differ), so each was "
                   "tested on other images.")
    return out, False


def _bold_html(text: str) -> str:
    return re.sub(r"[*][*](.+?)[*][*]", r"<b>\1</b>", html.escape(text))


def _img(path: Path, alt: str) -> str:
    return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"


def _gallery_files(rows: list[dict], relative_to: Path | None = None) -> list[tuple[dict, str, str]]:
    """(row, misclassified.png, confident.png) of each run that has both (paths relative to `relative_to`)."""
    out = []
    for r in rows:
        run = RunFolder(r["folder"])
        if run.misclassified.is_file() and run.confident.is_file():
            paths = [run.misclassified, run.confident]
            if relative_to is not None:
                paths = [os.path.relpath(p, relative_to) for p in paths]
            out.append((r, str(paths[0]), str(paths[1])))
    return out


def _best_run(rows: list[dict]) -> dict | None:
    """The completed run with the best test accuracy: its gallery opens first."""
    done = [r for r in rows if r["status"] in OK and r.get("accuracy") is not None]
    return max(done, key=lambda r: r["accuracy"]) if done else None


def write_comparison(rows: list[dict], out: Path, title: str, notes: list[str] = (),
                     unavailable: list[tuple[str, str]] = (), per_cell: int = 6) -> tuple[Path, Path]:
    """report.md, report.html and the figures into `out` for `rows` (from `load_run`).

    Args:
        unavailable: (run name, reason) of planned runs that could not run, e.g. weights not available.
    """
    # Over 60 lines on purpose: the Markdown and the HTML of one report, built side by side.
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "it is a file" if out.is_file() else e.strerror
        raise UserError(f"cannot create the report folder {out}: {why}; pass --out a folder") from None
    best = _best(rows)
    data, mixed = data_notes(rows)
    keys = [k for k in COLUMNS if k != "data" or mixed]
    figures = []
    if rows:
        save_figure(plot_loss_panels(rows), out / "loss_curves.png")
        save_figure(plot_accuracy_bars(rows), out / "accuracy.png")
        figures = [("loss_curves.png", "Training and validation loss per run"),
                   ("accuracy.png", "Test accuracy per run")]
    text = written_comparison(rows)

    def fmt(r, k, bold):
        c = _cell(r, k)
        return bold(c) if k in best and r["status"] in OK and r.get(k) == best[k] else c

    md = [f"# {title}", "", *(x for d in data for x in (d, "")), *notes, "", "## Comparison", "", *text, "",
          "| " + " | ".join(COLUMNS[k][0] for k in keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(r, k, lambda c: f"**{c}**") for k in keys) + " |" for r in rows]
    md += [f"| {n} | " + " | ".join("–" for _ in keys[1:-1]) + f" | {why} |" for n, why in unavailable]
    md += ["", "Bold: best among the runs that completed. ⚠: diverged or failed runs, left out of best.", ""]
    md += [f"## {cap}\n\n![{cap}]({f})\n" for f, cap in figures]
    md += ["## Confusion matrices", "", "See report.html: each cell links to the misclassified test images behind it.",
           ""]
    md += [f"- {r['name']}: [{RunFolder.misclassified}]({f}), [{RunFolder.confident}]({g})"
           for r, f, g in _gallery_files(rows, out)]
    md_path = atomic_write(out / "report.md", "\n".join(md))

    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
         "body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}td,th{border:1px solid #ccc;"
         "padding:.2em .5em;text-align:right}td:first-child,th:first-child{text-align:left}"
         "td.best{font-weight:bold;background:#e6f4ea}tr.bad td{color:#a33}img{max-width:100%}"
         ".cms{display:flex;flex-wrap:wrap;gap:1.5em}.cm td{min-width:2.2em;text-align:center}"
         ".cell{margin:.6em 0}.cell img{width:64px;height:64px;margin:1px;image-rendering:pixelated}"
         "</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    h += [f"<p><b>{html.escape(d)}</b></p>" for d in data]
    h += [f"<p>{html.escape(n)}</p>" for n in notes if n]
    h.append("<h2>Comparison</h2>" + "".join(f"<p>{_bold_html(t)}</p>" for t in text))
    h.append("<div style='overflow-x:auto'><table><tr>" + "".join(f"<th>{html.escape(COLUMNS[k][0])}</th>"
                                                                for k in keys) + "</tr>")
    for r in rows:
        cls = "" if r["status"] in OK else " class='bad'"
        h.append(f"<tr{cls}>" + "".join(
            f"<td class='best'>{html.escape(_cell(r, k))}</td>" if k in best and r["status"] in OK and r.get(k) == best[k]
            else f"<td>{html.escape(_cell(r, k))}</td>" for k in keys) + "</tr>")
    for n, why in unavailable:
        h.append(f"<tr class='bad'><td>{html.escape(n)}</td>" + "<td>–</td>" * (len(keys) - 2)
                 + f"<td>{html.escape(why)}</td></tr>")
    h.append("</table></div><p><small>Highlighted: best among the runs that completed. Red: diverged, failed or not run."
             "</small></p>")
    h += [f"<h2>{cap}</h2>{_img(out / f, cap)}" for f, cap in figures]
    cms, galleries = [], []
    for i, r in enumerate(rows):
        table, gallery = _confusion_html(i, r, per_cell)
        if table:
            cms.append(f"<div><h3>{html.escape(r['name'])} ({_cell(r, 'accuracy')})</h3>{table}</div>")
            galleries.append(gallery)
    if cms:
        h.append("<h2>Confusion matrices</h2><p>Rows: true class; columns: predicted. "
                 "Click a count to see the misclassified test images behind it.</p>")
        h.append(f"<div class='cms'>{''.join(cms)}</div><h2>Misclassified test images</h2>{''.join(galleries)}")
    first = _best_run(rows)
    explained = [f"<details{' open' if r is first else ''}><summary>{html.escape(r['name'])} "
                 f"({_cell(r, 'accuracy')})</summary>{_img(Path(f), 'misclassified')}{_img(Path(g), 'confident')}"
                 "</details>" for r, f, g in _gallery_files(rows)]
    if explained:
        h.append("<h2>What the networks looked at</h2><p>Per run, its most confident mistakes (the image, the "
                 "Grad-CAM map of the class it said, the map of the true class) and its most confident right answers "
                 "(the map of their class and of the runner-up), from the run's own files.</p>" + "".join(explained))
    h.append("</body></html>")
    html_path = atomic_write(out / "report.html", "\n".join(h))
    return md_path, html_path
