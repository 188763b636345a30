"""The real pipeline on a few hundred real CIFAR-10 images: one command, one complete run folder."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hostile import write
from PIL import Image, PngImagePlugin
from safetensors.numpy import load_file
from sklearn import metrics as skm

from cnnlab.cli import main
from cnnlab.core.config import load_config

RUN_FILES = ["config.yaml", "env.json", "log.txt", "split.csv", "history.csv", "model.safetensors", "model.json",
             "summary.json", "predictions.csv", "curves.png", "confusion_matrix.png", "misclassified.png", "confident.png",
             "class_distribution.png", "report.html", "report.md"]


def train_cli(capsys, *args) -> Path:
    code = main(["train", *args, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("run: ")
    return Path(last[len("run: "):])


@pytest.fixture(scope="module")
def run(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    code = main(["train", "--data", str(cifar_root), "--model", "report000_cnn", "--epochs", "2", "--lr", "2e-3",
                 "--batch-size", "32", "--precision", "fp32", "--out", str(out), "--set", "data.limit_per_class=40",
                 "--no-progress"])
    assert code == 0
    (folder,) = list(out.iterdir())
    return folder


def test_run_folder_is_complete(run):
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] in ("completed", "failed_to_learn")
    assert s["model"]["name"] == "report000_cnn" and s["model"]["params_total"] == 390_634
    assert s["model"]["params_trainable"] == 390_634
    for k in ("loss", "accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted",
              "recall_weighted", "f1_weighted", "top5_accuracy", "ece", "images_per_second"):
        assert k in s["test"], k
    assert s["time"]["train_seconds"] > 0 and s["best_epoch"] in (1, 2)
    assert len(s["classes"]) == 10
    history = list(csv.DictReader(open(run / "history.csv")))
    assert len(history) == 2 and all(float(r["seconds"]) > 0 for r in history)
    split = list(csv.DictReader(open(run / "split.csv")))
    assert set(split[0]) >= {"path", "class", "split"}
    assert {r["split"] for r in split} == {"train", "val", "test"}
    assert sum(r["split"] == "test" for r in split) == 400
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6 and "src='http" not in html
    for gallery in ("misclassified.png", "confident.png"):  # each embedded as the run folder holds it
        assert base64.b64encode((run / gallery).read_bytes()).decode() in html, gallery
    assert "where the network looked (Grad-CAM)" in html
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "summary.json").stat().st_mode & 0o777 == 0o666 & ~umask  # the mode any new file gets
    cfg = load_config(run / "config.yaml")  # the resolved config loads back as a config
    assert cfg.model.name == "report000_cnn" and cfg.data.image_size == 32


def test_summary_metrics_recomputed_from_predictions(run):
    s = json.loads((run / "summary.json").read_text())
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    classes = s["classes"]
    assert list(rows[0]) == ["path", "target", "prediction"] + [f"prob_{c}" for c in classes]
    y = np.array([classes.index(r["target"]) for r in rows])
    p = np.array([classes.index(r["prediction"]) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs.argmax(1) == p).all()
    t = s["test"]
    assert t["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    for avg in ("macro", "weighted"):
        assert t[f"precision_{avg}"] == pytest.approx(skm.precision_score(y, p, average=avg, zero_division=0))
        assert t[f"recall_{avg}"] == pytest.approx(skm.recall_score(y, p, average=avg, zero_division=0))
        assert t[f"f1_{avg}"] == pytest.approx(skm.f1_score(y, p, average=avg, zero_division=0))
    assert t["loss"] == pytest.approx(skm.log_loss(y, probs / probs.sum(1, keepdims=True), labels=list(range(10))), rel=1e-4)
    assert t["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=5, labels=list(range(10))))
    assert t["confusion_matrix"] == skm.confusion_matrix(y, p).tolist()


def test_predict_matches_evaluation(run, cifar_root, capsys):
    rows = list(csv.DictReader(open(run / "predictions.csv")))[:5]
    paths = [str(cifar_root / r["path"]) for r in rows]
    assert main(["predict", str(run), *paths]) == 0
    out = json.loads(capsys.readouterr().out)
    for r, o in zip(rows, out):
        assert o["prediction"] == r["prediction"]
        assert len(o["probabilities"]) == 10
        for c, v in o["probabilities"].items():
            assert v == pytest.approx(float(r[f"prob_{c}"]), abs=1e-5)


def test_predict_on_a_folder_classifies_the_images_in_it(run, cifar_root, tmp_path, capsys):
    import shutil

    rows = list(csv.DictReader(open(run / "predictions.csv")))[:3]
    for i, r in enumerate(rows):
        shutil.copy(cifar_root / r["path"], tmp_path / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("not an image, left out")
    assert main(["predict", str(run), str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [Path(o["path"]).name for o in out] == ["0.jpg", "1.jpg", "2.jpg"]
    assert [o["prediction"] for o in out] == [r["prediction"] for r in rows]


def test_predict_bad_file_is_reported(run, tmp_path, capsys):
    bad = write(tmp_path / "bad.jpg", b"not really a jpeg")
    assert main(["predict", str(run), str(bad), str(tmp_path / "missing.png")]) == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "not a usable image" in out[0]["error"] and out[1]["error"] == "file not found"
    assert "cnnlab: error:" in captured.err and "Traceback" not in captured.err


def test_evaluate_reproduces_test_metrics(run, capsys):
    assert main(["evaluate", str(run)]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1])
    m = json.loads((folder / "metrics.json").read_text())
    s = json.loads((run / "summary.json").read_text())
    assert m["accuracy"] == pytest.approx(s["test"]["accuracy"])
    assert m["loss"] == pytest.approx(s["test"]["loss"], rel=1e-5)
    assert folder.parent.parent == run  # written inside the run folder


def test_streaming_past_the_memory_cap_trains_like_memory(cifar_root, tmp_path, capsys):
    args = ["--data", str(cifar_root), "--model", "cnn_small", "--epochs", "1", "--batch-size", "32",
            "--out", str(tmp_path), "--seed", "3", "--deterministic", "--precision", "fp32", "--set",
            "data.limit_per_class=40"]
    a = train_cli(capsys, *args, "--tag", "a")
    # 800 images at 32 px are 2.3 MB of pixels: a 1 MB memory cap makes "auto" stream them from disk
    b = train_cli(capsys, *args, "--tag", "b", "--set", "data.memory_cap_mb=1", "--set", "data.workers=1")
    assert "stream loader" in (b / "log.txt").read_text() and "memory loader" in (a / "log.txt").read_text()
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.allclose(wa[k], wb[k], atol=1e-5), k  # same data order and augmentation from either loader
    assert (a / "split.csv").read_text() == (b / "split.csv").read_text()


def test_divergence_is_caught_and_no_nan_saved(cifar_root, tmp_path, capsys):
    run = train_cli(capsys, "--data", str(cifar_root), "--model", "cnn_small", "--epochs", "3", "--optimizer", "sgd",
                    "--lr", "1e30", "--out", str(tmp_path), "--set", "data.limit_per_class=10")
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "diverged" and "learning rate" in s["message"]
    if (run / "model.safetensors").exists():
        assert all(np.isfinite(v).all() for v in load_file(str(run / "model.safetensors")).values())


@pytest.mark.parametrize("epochs, batch, advice", [("2", "64", "it trained only 2 steps of batch 64"),
                                                   ("6", "2", "try another learning rate")])
def test_no_better_than_chance_is_flagged(epochs, batch, advice, tmp_path, capsys):
    # every image decodes to the same pixels (only a PNG text chunk differs), so no model can tell classes apart;
    # the advice is the learning rate only when the run had steps enough to learn in
    img = Image.new("RGB", (16, 16), (120, 60, 30))
    for c in ("a", "b"):
        for i in range(15):
            info = PngImagePlugin.PngInfo()
            info.add_text("id", f"{c}{i}")
            buf = io.BytesIO()
            img.save(buf, "PNG", pnginfo=info)
            write(tmp_path / "data" / c / f"{i}.png", buf.getvalue())
    run = train_cli(capsys, "--data", str(tmp_path / "data"), "--model", "cnn_small", "--epochs", epochs,
                    "--batch-size", batch, "--image-size", "16", "--out", str(tmp_path / "runs"),
                    "--set", "data.augment=[]")
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "failed_to_learn" and "not a result" in s["message"] and advice in s["message"], s


def test_learned_nothing_names_what_gives_more_steps():
    from cnnlab.train.loop import learned_nothing

    assert learned_nothing(0.8, [0, 1, 1, 1], 10, 8) == ""  # above always answering class 1 (0.75)
    assert "only 10 steps of batch 8: give more epochs" in learned_nothing(0.75, [0, 1, 1, 1], 10, 8)
    # a time budget chooses the epochs itself (and --epochs is refused beside it)
    assert "give a longer time budget" in learned_nothing(0.5, [0, 1], 10, 8, "a longer time budget")
    assert learned_nothing(0.5, [0, 1], 500, 8).endswith("try another learning rate")


@pytest.mark.parametrize("args,message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--set", "train.bogus=1"], "unknown key 'train.bogus'"),
    (["--model", "report004_vgg", "--image-size", "8"], "image size 8"),
    (["--model", "custom", "--set", "model.layers=[{conv: 8}, {dense: 4}, flatten]"], "need flat input"),
    (["--precision", "fp16"], "needs a GPU"),
])
def test_bad_training_input_fails_before_any_run_folder(cifar_root, tmp_path, capsys, args, message):
    code = main(["train", "--data", str(cifar_root), "--out", str(tmp_path / "runs"), "--set",
                 "data.limit_per_class=20", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_saved_weights_are_the_best_epochs(run, cifar_root):
    import torch

    from cnnlab.data.loaders import FileSource, Loader
    from cnnlab.data.splits import Row
    from cnnlab.models.checkpoint import load_model
    from cnnlab.train.loop import validate

    model, meta = load_model(run)
    rows = [r for r in csv.DictReader(open(run / "split.csv")) if r["split"] == "val"]
    y = torch.tensor([meta["classes"].index(r["class"]) for r in rows])
    val = Loader(FileSource(cifar_root, [Row(r["path"], r["class"], "val", r["sha256"]) for r in rows], 32, 0), y,
                 [r["path"] for r in rows], 256, meta["mean"], meta["std"])
    loss, acc, _ = validate(model, val, "fp32", torch.device("cpu"))
    s = json.loads((run / "summary.json").read_text())
    best = list(csv.DictReader(open(run / "history.csv")))[s["best_epoch"] - 1]
    assert loss == pytest.approx(float(best["val_loss"]), abs=1e-4)
    assert acc == pytest.approx(float(best["val_accuracy"]))


def test_report_states_the_data_path_and_split_counts(run, cifar_root):
    with open(run / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    splits = [r["split"] for r in rows]
    counts = (f"{splits.count('train'):,} train / {splits.count('val'):,} val / {splits.count('test'):,} test images"
              f", {len({r['class'] for r in rows})} classes, 32 px")
    md = (run / "report.md").read_text()
    (line,) = [line for line in md.splitlines() if line.startswith("Data: ")]
    root, rest = line[len("Data: "):].split(", ", 1)
    assert Path(root).resolve() == cifar_root.resolve()
    assert rest == counts, (line, counts)
    assert line in (run / "report.html").read_text()


def test_a_run_that_fails_after_its_folder_exists_says_so(run, tmp_path, capsys, monkeypatch):
    import cnnlab.train.run

    for c in ("a", "b"):
        for i in range(6):
            write(tmp_path / "tiny" / c / f"{i}.png", _png(100 * (c == "b") + i))
    args = ["--data", str(tmp_path / "tiny"), "--model", "cnn_small", "--epochs", "1", "--image-size", "16",
            "--precision", "fp32", "--out", str(tmp_path / "runs"), "--no-progress"]
    # a split with no validation images is the user's to fix: said before any folder is made
    assert main(["train", *args, "--set", "data.val_fraction=0.01"]) == 2
    assert "no validation images" in capsys.readouterr().err and not (tmp_path / "runs").exists()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cnnlab.train.run, "make_loaders", full_disk)  # a failure once the folder exists
    with pytest.raises(OSError):
        main(["train", *args, "--set", "data.val_fraction=0.3"])
    (failed,) = list((tmp_path / "runs").iterdir())
    s = json.loads((failed / "summary.json").read_text())
    assert s["status"] == "failed" and "No space left on device" in s["message"]
    last = (failed / "log.txt").read_text().rstrip().splitlines()[-1]
    assert last.startswith("status: failed (OSError") and f"cnnlab train --resume {failed}" in last
    assert main(["predict", str(failed), str(tmp_path / "tiny" / "a" / "0.png")]) == 2  # not a model to use
    monkeypatch.undo()
    # a report over several folders leaves the failed one out, with a warning, and reports the rest
    assert main(["report", str(failed), str(run), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert f"warning: {failed} left out of the report: failed" in out
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert run.name in md and failed.name not in md
    # once the disk has room again, --resume finishes it in the same folder
    assert main(["train", "--resume", str(failed), "--no-progress"]) == 0
    assert json.loads((failed / "summary.json").read_text())["status"] in ("completed", "failed_to_learn")


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_evaluate_on_other_data_leaves_out_what_the_run_saw(run, cifar_root, tmp_path, capsys):
    import shutil

    rows = list(csv.DictReader(open(run / "split.csv")))
    picked = []
    for cls in ("cat", "dog"):  # two of the ten classes: three training images and three test images each
        for split in ("train", "test"):
            picked += [r for r in rows if r["class"] == cls and r["split"] == split][:3]
    for k, r in enumerate(picked):
        (tmp_path / "d" / r["class"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(cifar_root / r["path"], tmp_path / "d" / r["class"] / f"{k}.jpg")
    assert main(["evaluate", str(run), "--data", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "warning: 6 of 12 images" in out and "left out" in out
    folder = Path(out.strip().splitlines()[-1].split(": ", 1)[1])
    m = json.loads((folder / "metrics.json").read_text())
    assert m["n"] == 6 and m["classes_present"] == 2 and m["seen_images"] == {"count": 6, "included": False}
    # the macro average is over the two classes present, recomputed here from the predictions
    preds = list(csv.DictReader(open(folder / "predictions.csv")))
    recalls = [np.mean([p["prediction"] == c for p in preds if p["target"] == c]) for c in ("cat", "dog")]
    assert m["recall_macro"] == pytest.approx(np.mean(recalls))
    assert main(["evaluate", str(run), "--data", str(tmp_path / "d"), "--include-seen"]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1])
    assert json.loads((folder / "metrics.json").read_text())["n"] == 12


@pytest.mark.parametrize("loader", ["stream", "memory"])
def test_a_file_that_does_not_decode_is_recorded_and_not_counted(loader, tmp_path, capsys):
    """A file that does not decode (streaming meets a test image only when a batch reaches it, since no
    probe reads it up front) is named in the run's log.txt, rejected.csv and summary.json, not dropped
    silently, and is not counted among the images the run printed and recorded."""
    for split, n in (("train", 8), ("test", 3)):
        for c in ("a", "b"):
            for i in range(n):
                write(tmp_path / "d" / split / c / f"{i}.png", _png(100 * (c == "b") + i + 10 * (split == "test")))
    write(tmp_path / "d" / "test" / "a" / "broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    args = ["train", "--data", str(tmp_path / "d"), "--model", "cnn_small", "--epochs", "1", "--image-size", "16",
            "--precision", "fp32", "--out", str(tmp_path / "runs"), "--no-progress", "--set", f"data.loader={loader}",
            "--set", "data.workers=0"]
    assert main(args) == 0, capsys.readouterr().err
    if loader == "memory":  # known before training, so the printed count already leaves it out
        assert "/ 6 test images" in capsys.readouterr().out
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["rejected"] == 1
    with open(run / "rejected.csv", newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [str(Path("test") / "a" / "broken.png")]
    assert "left out 1 files that do not decode" in (run / "log.txt").read_text()
    assert summary["test"]["n"] == 2 * 3  # evaluated on the images that decode
    assert sum(c["test"] for c in summary["data"]["counts"].values()) == 2 * 3
