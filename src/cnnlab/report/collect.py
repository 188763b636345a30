"""`cnnlab report`: the comparison report of a study folder, or of run folders, from their files alone.

A study folder's report has a row per child (or a line saying why it has none: weights not
available, failed, not run); for loose run folders, anything that is not a finished run (an
lr-find folder, a failed or unfinished run) is left out with a warning.
"""

from __future__ import annotations

from pathlib import Path

from cnnlab.core.errors import UserError
from cnnlab.core.runs import STUDY_FILE, RunFolder, load_json, load_run
from cnnlab.report.compare import best_by_data, run_row, write_comparison

def write_report(folders: list[Path], out: Path | None = None, log=print) -> Path:
    """Write report.md and report.html; return their folder (the study folder, or `out`, default comparison/)."""
    if not folders:
        raise UserError("give a study folder or run folders to report on")
    if len(folders) == 1 and (folders[0] / STUDY_FILE).is_file():
        rows, unavailable, notes, title = _study_rows(folders[0])
        out = out or folders[0]
    else:
        rows, unavailable, notes, title = _run_rows(folders, log), [], [], "cnnlab comparison"
        out = out or Path("comparison")
    md, html_path = write_comparison(rows, Path(out), title, notes, unavailable)
    log(f"report: {html_path}")
    log(f"open it: file://{html_path.resolve()}")
    best = best_by_data(rows)
    for data, top in best.items():
        where = f" on {data}" if len(best) > 1 else ""
        log(f"best{where}: {top['name']} (validation {top['val_accuracy']:.2%}, test {top['accuracy']:.2%}); "
            f"serve it with: cnnlab serve {top['folder']}")
    return Path(out)


def _why_not(run: Path) -> str:
    """Why `run` cannot be a row of a comparison ('' when it can)."""
    try:
        load_run(run, need_model=False)
    except UserError as e:
        return str(e).removeprefix(f"{run} ")  # said after the folder's name
    return ""


def _study_rows(folder: Path) -> tuple[list[dict], list[tuple[str, str]], list[str], str]:
    try:
        state = load_json(folder / STUDY_FILE)
    except ValueError:
        raise UserError(f"{folder / STUDY_FILE} is not valid JSON; run the study again with "
                        "`cnnlab study FILE` (it redoes nothing finished) to rewrite it") from None
    rows, unavailable, notes = [], [], [state.get("description", "")]
    for c in state["children"]:
        if c.get("superseded"):
            notes.append(f"{c['name']}: the study file changed it since " + ", ".join(
                Path(r).name for r in c["superseded"]) + " (kept, superseded); the table shows the new run.")
        run = Path(c["run"]) if c.get("run") else None
        why = _why_not(run) if run else c.get("status", "not run")
        if why:
            unavailable.append((c["name"], why))
        else:
            rows.append(run_row(run, c["name"], c["group"]))
    return rows, unavailable, notes, f"Study {state['name']}"


def _run_rows(folders: list[Path], log) -> list[dict]:
    rows = []
    for run in folders:
        why = _why_not(run)
        if why:  # e.g. `cnnlab report runs/*` meeting an lr-find folder or a failed run
            if len(folders) == 1:
                inside = [p for p in run.glob("*") if RunFolder(p).config.is_file()] if run.is_dir() else []
                if inside:  # `cnnlab report runs`
                    raise UserError(f"{run} holds {len(inside)} run folder{'s' * (len(inside) > 1)} and is not one "
                                    f"itself; report them with `cnnlab report {run}/*`")
                load_run(run, need_model=False)  # raises why, in words that name the folder
            log(f"warning: {run} left out of the report: {why}")
        else:
            rows.append(run_row(run))
    if not rows:
        raise UserError("none of the folders is a finished run; pass run folders printed as 'run: ...' by "
                        "cnnlab train")
    return rows
