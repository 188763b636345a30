"""Studies, the comparison report and the learning-rate range test, on a small real subset."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from cnnlab.cli import main
from cnnlab.report.compare import run_row
from cnnlab.train.lr_find import suggest_lr


def _study_file(tmp_path: Path, cifar_root: Path, extra_runs=()) -> Path:
    study = {"name": "sweep", "description": "two learning rates",
             "defaults": {"data": {"path": str(cifar_root), "limit_per_class": 30},
                          "train": {"epochs": 2, "batch_size": 32}},
             "runs": [{"name": "small", "model": {"name": "cnn_small"}, "lrs": [0.003, 0.3]}, *extra_runs]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture(scope="module")
def study(cifar_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    missing = {"name": "lite-no-weights", "model": {"name": "resnet18", "pretrained": True},
               "train": {"freeze": True, "epochs": 1}}
    path = _study_file(tmp, cifar_root, [missing])
    assert main(["study", str(path), "--out", str(tmp / "studies"), "--no-progress"]) == 0
    return tmp / "studies" / "sweep", path


def test_report_table_matches_the_runs_summaries(study):
    folder, _ = study
    state = json.loads((folder / "study.json").read_text())
    runs = {c["name"]: Path(c["run"]) for c in state["children"] if c["run"]}
    assert set(runs) == {"small-lr0.003", "small-lr0.3"}
    md = (folder / "report.md").read_text()
    html = (folder / "report.html").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in md.splitlines():
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if len(cells) == len(cols) and cells[0] in runs:
            rows[cells[0]] = dict(zip(cols, cells))
    assert set(rows) == set(runs)
    for name, run in runs.items():
        s = json.loads((run / "summary.json").read_text())
        row = rows[name]
        assert row["test acc"] == f"{s['test']['accuracy']:.2%}"
        assert row["F1 macro"] == f"{s['test']['f1_macro']:.4f}"
        assert row["F1 weighted"] == f"{s['test']['f1_weighted']:.4f}"
        assert row["params"] == f"{s['model']['params_total']:,}"
        assert row["train s"] == f"{s['time']['train_seconds']:.0f}"
        assert row["ms/image (b=1)"] == f"{s['inference']['latency_ms']:.2f}"
        assert row["lr"] == f"{s['phases'][-1]['lr']:g}"
        assert row["status"].endswith(s["status"])
    # the pretrained run without weights on this machine is a row that says so, not a failed study
    assert "lite-no-weights" in md and "weights not available" in md
    for fig in ("loss_curves.png", "accuracy.png"):
        assert (folder / fig).stat().st_size > 1000
    # confusion-matrix cells link to galleries of the misclassified images behind them
    links = re.findall(r"href='#(r\d+-\d+-\d+)'", html)
    assert links and all(f"id='{a}'" in html for a in links)
    assert "data:image/jpeg;base64," in html
    # each run's galleries with their maps, from its own files; the best run's shown open
    assert "What the networks looked at" in html
    for name, run in runs.items():
        if (run / "confident.png").is_file():
            assert base64.b64encode((run / "confident.png").read_bytes()).decode() in html, name
    assert html.count("<details open>") == 1
    # the best run is the one with the best validation accuracy at its best epoch (history.csv), not on test
    val = {}
    for name, run in runs.items():
        history = list(csv.DictReader(open(run / "history.csv")))
        val[name] = float(history[json.loads((run / "summary.json").read_text())["best_epoch"] - 1]["val_accuracy"])
        assert rows[name]["val acc"] == f"{val[name]:.2%}"
    best = max(val, key=val.get)
    assert f"**{best}** (cnn_small" in md and "has the best validation accuracy" in md
    assert "test figures are reported, not used for choosing" in md


def test_report_rebuilds_from_folders_alone(study, tmp_path, capsys):
    folder, _ = study
    before = (folder / "report.md").read_text()
    (folder / "report.md").unlink()
    assert main(["report", str(folder)]) == 0
    assert (folder / "report.md").read_text() == before
    runs = sorted((folder / "runs").iterdir())
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "report.html").is_file()


def test_restarted_study_redoes_nothing_finished(study, capsys):
    folder, path = study
    state = json.loads((folder / "study.json").read_text())
    done = [Path(c["run"]) for c in state["children"] if c["run"]]
    stamps = {r: (r / "summary.json").stat().st_mtime_ns for r in done}
    # a run stopped by a signal has summary.json saying "interrupted": the restart finishes only that one
    victim = done[1]
    summary = json.loads((victim / "summary.json").read_text())
    (victim / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    capsys.readouterr()
    assert main(["study", str(path), "--out", str(folder.parent), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "small-lr0.003: already finished" in out
    assert (done[0] / "summary.json").stat().st_mtime_ns == stamps[done[0]]
    assert json.loads((victim / "summary.json").read_text())["status"] == summary["status"]
    assert len(list((folder / "runs").iterdir())) == 2  # finished from its checkpoint, no new folder
    assert f"resuming {victim}" in out


def test_study_mistakes_exit_2(tmp_path, capsys, cifar_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "runs": [{"model": {"name": "cnn_small"}, "train": {"lr": -1}}]}))
    assert main(["study", str(bad), "--out", str(tmp_path / "s")]) == 2
    assert "train.lr must be above 0" in capsys.readouterr().err
    # every mistake in one message, so that one edit of the file fixes them all: the file's own first, then,
    # once it reads, every run's model
    bad.write_text(yaml.safe_dump({"name": "x", "runs": [{"name": "a", "train": {"lr": -1}}, {"name": "b"},
                                                         {"name": "c", "train": {"epochs": "two"}}]}))
    assert main(["study", str(bad), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "2 mistakes" in err and "run a: config: train.lr" in err and "run c: config: train.epochs" in err, err
    bad.write_text(yaml.safe_dump({"name": "x", "defaults": {"data": {"path": str(cifar_root)}},
                                   "runs": [{"name": "a", "model": {"name": "resnet9000"}}, {"name": "b"},
                                            {"name": "c", "model": {"name": "resnet9001"}}]}))
    assert main(["study", str(bad), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "2 mistakes" in err and "resnet9000" in err and "resnet9001" in err, err
    assert not (tmp_path / "s").exists()  # checked before anything was made
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"name": "rw", "data_help": "Download RealWaste first.",
                                       "defaults": {"data": {"path": str(tmp_path / "realwaste")}},
                                       "runs": [{"model": {"name": "cnn_small"}}]}))
    assert main(["study", str(missing), "--out", str(tmp_path / "s")]) == 2
    assert "Download RealWaste first." in capsys.readouterr().err
    assert main(["study", str(Path(__file__).parents[1] / "configs" / "study_report001.yaml"),
                 "--out", str(tmp_path / "s")]) == 2
    assert "RealWaste is not on this machine" in capsys.readouterr().err


def test_lr_suggestion_is_not_fooled_by_noise():
    """A valley at 1e-2 under heavy batch noise and one outlier dip near the blow-up."""
    rng = np.random.default_rng(0)
    lrs = np.logspace(-6, 1, 100)
    x = np.log10(lrs)
    clean = 2.3 - 1.2 / (1 + np.exp(-(x + 4) * 2)) + np.where(x > -2, (x + 2) ** 2, 0)
    for seed in range(5):
        noisy = clean + rng.normal(0, 0.15, len(lrs))
        noisy[85] = 0.0  # a freak batch right before the explosion
        s = suggest_lr(list(lrs), list(noisy))
        assert 1e-4 <= s["suggestion"] <= 3e-3, (seed, s["suggestion"])


def test_lr_find_command(cifar_root, tmp_path, capsys):
    assert main(["lr-find", "--data", str(cifar_root), "--model", "cnn_small", "--image-size", "16", "--batch-size", "32", "--out",
                 str(tmp_path), "--set", "data.limit_per_class=30"]) == 0
    out = capsys.readouterr().out
    folder = Path(out.strip().splitlines()[-1].split(": ", 1)[1])
    result = json.loads((folder / "lr_find.json").read_text())
    lrs, losses = np.array(result["lrs"]), np.array(result["losses"])
    assert len(lrs) == len(losses) >= 20
    # on the recorded curve: past the flat start, before the lowest loss (beyond which it blows up),
    # and at a loss clearly below the starting one
    assert lrs[0] * 10 <= result["suggestion"] <= result["lr_min_loss"]
    at = np.searchsorted(lrs, result["suggestion"])
    assert np.median(losses[max(0, at - 2):at + 3]) < np.median(losses[:5]) - 0.05, (result["suggestion"], losses)
    assert (folder / "lr_find.png").stat().st_size > 1000  # `train --lr auto`: tests/test_ddp.py


def test_load_run_reads_only_files(study):
    folder, _ = study
    run = next(p for p in (folder / "runs").iterdir())
    row = run_row(run, "x", "g")
    # the weights' size from their tensors: 4 bytes per float32 number, plus the file's small header
    n_bytes = sum(t.size * t.itemsize for t in load_file(str(run / "model.safetensors")).values())
    assert n_bytes / 2**20 <= row["size_mb"] <= n_bytes / 2**20 + 0.05


def _counted(run: Path) -> str:
    """`N train / N val / N test images, K classes`, counted from the run's split.csv by hand."""
    with open(run / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    classes = len({r["class"] for r in rows})
    return f"{n['train']:,} train / {n['val']:,} val / {n['test']:,} test images, {classes} classes"


DATA_LINE = re.compile(r"^Data: (.+), (\d[\d,]* train / \d[\d,]* val / \d[\d,]* test images, \d+ classes), (\d+) px$")


def test_report_states_the_data_the_runs_used(study, cifar_root):
    folder, _ = study
    state = json.loads((folder / "study.json").read_text())
    runs = [Path(c["run"]) for c in state["children"] if c["run"]]
    md = (folder / "report.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("Data: ")]
    assert len(lines) == 1, lines  # the runs share their data: one line at the top, no data column
    root, counts, size = DATA_LINE.match(lines[0]).groups()
    assert Path(root).resolve() == cifar_root.resolve()
    assert {_counted(r) for r in runs} == {counts}
    assert {yaml.safe_load((r / "config.yaml").read_text())["data"]["image_size"] for r in runs} == {int(size)}
    assert md.index(lines[0]) < md.index("## Comparison") and "two learning rates" in md  # the description stays
    assert "different data" not in md and "| data |" not in md
    assert lines[0] in (folder / "report.html").read_text()


def test_report_of_runs_on_different_data_says_so(study, tmp_path, capsys):
    folder, _ = study
    run = sorted((folder / "runs").iterdir())[0]
    other = shutil.copytree(run, tmp_path / "fewer")
    with open(run / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(other / "split.csv", "w", newline="") as f:  # the same run, minus a third of its training images
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for i, r in enumerate(rows) if r["split"] != "train" or i % 3)
    assert main(["report", str(run), str(other), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "⚠ The runs used different data" in md and not any(line.startswith("Data: ") for line in md.splitlines())
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    cells = {}
    for line in md.splitlines():
        row = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if len(row) == len(cols):
            cells[row[0]] = dict(zip(cols, row))
    for r in (run, other):
        assert _counted(r) in cells[r.name]["data"]
    assert _counted(run) != _counted(other)


def test_a_changed_study_trains_changed_runs_again_and_checks_every_run_first(cifar_root, tmp_path, capsys):
    spec = {"name": "edits", "defaults": {"data": {"path": str(cifar_root), "limit_per_class": 10},
                                          "train": {"epochs": 1, "batch_size": 32, "precision": "fp32"}},
            "runs": [{"name": "small", "model": {"name": "cnn_small"}, "train": {"lr": 0.003}}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", str(path), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    (first,) = list((tmp_path / "s" / "edits" / "runs").iterdir())
    spec["runs"][0]["train"]["lr"] = 0.0001
    path.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["study", str(path), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "small: changed since" in out and "train.lr 0.003 -> 0.0001" in out and "already finished" not in out
    runs = sorted((tmp_path / "s" / "edits" / "runs").iterdir())
    assert len(runs) == 2 and first in runs  # the old run is kept
    state = json.loads((tmp_path / "s" / "edits" / "study.json").read_text())
    (child,) = state["children"]
    assert child["superseded"] == [str(first)] and Path(child["run"]) != first
    assert json.loads((Path(child["run"]) / "summary.json").read_text())["phases"][0]["lr"] == 0.0001
    assert "superseded" in (tmp_path / "s" / "edits" / "report.md").read_text()
    # unchanged now: skipped
    assert main(["study", str(path), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert "small: already finished" in capsys.readouterr().out
    # a bad model name in a later run stops the study before any run trains
    spec["runs"] = [{"name": "fresh", "model": {"name": "cnn_small"}}, {"name": "typo", "model": {"name": "cnn_smal"}},
                    {"name": "tiny", "model": {"name": "report004_vgg"}, "data": {"image_size": 8}}]
    for bad, message in ((spec, "run typo: unknown model 'cnn_smal'"),
                         ({**spec, "runs": [spec["runs"][0], spec["runs"][2]]}, "run tiny:")):
        path.write_text(yaml.safe_dump(bad))
        assert main(["study", str(path), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert len(list((tmp_path / "s" / "edits" / "runs").iterdir())) == 2  # "fresh" never trained


def test_runs_on_the_same_images_at_other_sizes_used_the_same_data(study, tmp_path, capsys):
    folder, _ = study
    run = sorted((folder / "runs").iterdir())[0]
    bigger = shutil.copytree(run, tmp_path / "bigger")  # the same split, as a pretrained network would decode it
    summary = json.loads((bigger / "summary.json").read_text())
    summary["data"]["image_size"] = 224
    (bigger / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(run), str(bigger), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "different data" not in md
    assert any(line.startswith("Data: ") and "decoded at the sizes in the px column" in line for line in md.splitlines())
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    px = [c.strip() for c in header.strip("|").split("|")].index("px")
    sizes = {line.strip("|").split("|")[px].strip() for line in md.splitlines()
             if line.startswith("| ") and not line.startswith("| run |")}
    assert {"32", "224"} <= sizes


def test_the_best_run_is_chosen_on_validation_not_on_test():
    from cnnlab.report.compare import written_comparison

    def row(name, lr, val, test, data="cifar10, 900 train / 100 val / 1,000 test images, 10 classes"):
        return {"name": name, "model": "cnn_small", "phase": "scratch", "lr": lr, "status": "completed",
                "val_accuracy": val, "accuracy": test, "f1_macro": test, "train_seconds": 10.0, "params_total": 1000,
                "latency_ms": 1.0, "group": "cnn", "data": data, "message": ""}

    # b is better on test, a on validation: a is the one to choose
    text = " ".join(written_comparison([row("a", 0.01, 0.80, 0.60), row("b", 0.1, 0.70, 0.90)]))
    assert text.startswith("**a**") and "0.01 works best on validation" in text
    # on different data, each data set gets its own best and no run is compared across them
    text = written_comparison([row("a", 0.01, 0.80, 0.60), row("c", 0.1, 0.95, 0.95, data="other data")])
    assert len(text) == 2 and text[0].startswith("On cifar10") and text[1].startswith("On other data")
    # runs of one learning rate (seeds, say) say nothing about learning rates
    text = " ".join(written_comparison([row("a", 0.01, 0.80, 0.60), row("b", 0.01, 0.70, 0.90)]))
    assert text.startswith("**a**") and "works best" not in text


def test_a_study_trains_a_run_again_when_its_images_change(tmp_path, capsys):
    from hostile import jpeg_bytes, noise_rgb, write

    data = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(15):
            write(data / c / f"{i}.jpg", jpeg_bytes(noise_rgb((16, 16), seed=100 * (c == "b") + i)))
    spec = {"name": "grow", "defaults": {"data": {"path": str(data), "image_size": 16, "val_fraction": 0.2,
                                                  "test_fraction": 0.2},
                                         "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"}},
            "runs": [{"name": "small", "model": {"name": "cnn_small"}}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    args = ["study", str(path), "--out", str(tmp_path / "s"), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 0
    assert "small: already finished" in capsys.readouterr().out  # same files: nothing to do
    write(data / "a" / "new.jpg", jpeg_bytes(noise_rgb((16, 16), seed=999)))  # one more image
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "small: changed since" in out and "its data" in out
    assert len(list((tmp_path / "s" / "grow" / "runs").iterdir())) == 2
