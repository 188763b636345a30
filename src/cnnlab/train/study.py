"""`cnnlab study`: every child run of a study file, in order, into one study folder.

A child whose run folder has finished is skipped; one that stopped mid-way is resumed from its
checkpoint, so a killed study started again redoes nothing it finished. A child whose study entry
or data changed since its run is trained again, the old run kept as superseded. A pretrained child
whose weights are not on the machine is recorded as such, not fatal. The study's report is written
by the caller (api.study), from the folder's files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cnnlab.core.config import Config, config_to_dict, flatten, load_config
from cnnlab.core.errors import UserError, WeightsNotFound
from cnnlab.core.runs import STUDY_FILE, RunFolder, load_json, save_json, slug
from cnnlab.core.study import Child, load_study, raise_all
from cnnlab.data.sources import DATASET_NAMES
from cnnlab.data.splits import manifest_hash
from cnnlab.train.run import OPERATIONAL, train
from cnnlab.train.setup import check_model, data_and_split

def run_study(path: str | Path, out: str | Path = "studies", sets: list[str] = (), progress: bool = True,
              log=print) -> Path:
    """Train (or skip, or resume) every child of the study file at `path`; return the study folder."""
    st = load_study(path, sets)
    missing, mistakes = {}, []  # data folder -> its runs; every run is checked before the first one trains
    for child in st.children:
        path = child.config.data.path
        if path and not Path(path).exists() and path.lower() not in DATASET_NAMES:
            missing.setdefault(path, []).append(child.name)
            continue
        try:
            check_model(child.config)
        except UserError as e:
            mistakes.append(f"study {st.name}, run {child.name}: {e}")
    help_ = st.data_help or "Point it at the image folder with --set data.path=FOLDER"
    raise_all([f"study {st.name}: data {path} not found (run{'s' * (len(runs) > 1)} {', '.join(runs)}). {help_}"
               for path, runs in missing.items()] + mistakes)
    folder = Path(out) / slug(st.name)
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    try:
        before = {c["name"]: c for c in load_json(folder / STUDY_FILE)["children"]} \
            if (folder / STUDY_FILE).is_file() else {}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{folder / STUDY_FILE} is damaged; move it away and run the study again (finished runs "
                        "are found from their folders)") from None
    # every child's record from the start, so a study stopped mid-way loses none of them
    state = {"name": st.name, "description": st.description, "file": str(path),
             "children": [before.get(c.name, {"name": c.name, "group": c.group, "run": None, "status": "pending"})
                          for c in st.children]}
    existing = _study_runs(folder)
    for i, child in enumerate(st.children):
        head = f"[{i + 1}/{len(st.children)}] {child.name}"
        state["children"][i] = _run_child(child, folder, existing.get(child.name), before.get(child.name, {}),
                                          state, i, head, progress, log)
        save_json(folder / STUDY_FILE, state)
    return folder


def _run_child(child: Child, folder: Path, run: Path | None, old: dict, state: dict, i: int, head: str,
               progress: bool, log) -> dict:
    """Skip, resume or train one child; return its study.json record."""
    cfg = dataclasses.replace(child.config, out=str(folder / "runs"), tag=child.name)
    requested = json.loads(json.dumps(flatten(config_to_dict(child.config))))  # as study.json will hold it
    entry = {"name": child.name, "group": child.group, "run": str(run) if run else None, "status": "pending",
             "requested": requested, "superseded": old.get("superseded", [])}
    changed = [k for k in sorted(set(requested) | set(old.get("requested", {})))
               if "requested" in old and old["requested"].get(k) != requested.get(k) and k not in OPERATIONAL]
    why = ", ".join(f"{k} {old['requested'].get(k)!r} -> {requested.get(k)!r}" for k in changed[:4])
    if run and not changed and RunFolder(run).finished() and _images_changed(child.config, run):
        why = "its data: the images it would split now differ from those in its split.csv"
    if run and why:  # the study file or the data changed this run: train it again, keep the old folder
        log(f"{head}: changed since {run.name} ({why}); training it again, the old run is kept as superseded")
        entry["superseded"] = [*entry["superseded"], str(run)]
        run = None
    if run and RunFolder(run).finished():
        entry["status"] = RunFolder(run).status()
        log(f"{head}: already finished ({entry['status']}), skipped")
        return entry
    log(f"{head}: " + ("resuming " + str(run) if run else "training"))
    if run:  # an unfinished run folder continues in place, with its own resolved config, as --resume does
        cfg = load_config(RunFolder(run).config)
    state["children"][i] = {**entry, "status": "running"}  # what it trains for, before it trains
    save_json(folder / STUDY_FILE, state)
    try:
        run = train(cfg, progress=progress, log=log, resume=run)
        entry.update(run=str(run), status=RunFolder(run).status())
    except WeightsNotFound as e:
        entry.update(status="weights not available", message=str(e).splitlines()[0])
        log(f"{head}: weights not available on this machine; the report says so")
    return entry


def _study_runs(folder: Path) -> dict[str, Path]:
    """The newest run folder of each child in a study folder, by the tag in its config.yaml."""
    found: dict[str, Path] = {}
    for cfg_file in sorted((folder / "runs").glob(f"*/{RunFolder.config}")):
        found[load_config(cfg_file).tag] = cfg_file.parent  # sorted by timestamped name: the newest wins
    return found


def _images_changed(cfg: Config, run: Path) -> bool:
    """Whether the split `cfg` makes now differs from the one `run` trained on (images added, removed, edited)."""
    _, split = data_and_split(cfg, lambda msg: None)
    return manifest_hash(split) != (RunFolder(run).read_summary().get("data") or {}).get("split_sha256")
