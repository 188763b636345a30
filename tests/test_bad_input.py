"""Every command's bad input (issue 18, item 5).

Bad input to any command gives exactly one line on stderr, `cnnlab: error: ...`, that names the
thing (the path, key or value) and says what to do; a non-zero exit (2 for a user's mistake); no
traceback anywhere; and nothing written: the test's folder (also the working directory), the
trained run it reads and the cnnlab cache list the same files before and after.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hostile import jpeg_bytes, noise_rgb, write

from cnnlab.cli import main

PREFIX = "cnnlab: error: "
# words that tell the user what to do next
ADVICE = re.compile(r"\b(pass|use|give|choose|put|supply|add|fix|check|make|finish|unset|point|try|write|run|must|"
                    r"needs?|expected)\b|(?<!-)\bset\b", re.I)  # `set X`, not a mention of --set

@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    names: tuple[str, ...]  # what the message must name ({run}, {cifar} are filled in)
    files: dict = field(default_factory=dict)  # path under the test folder -> bytes, or a builder(path, run)


def unfinished_run(dest: Path, run: Path) -> None:
    """A run folder stopped after saving its model, before evaluation wrote summary.json."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("summary.json", "predictions.csv", "report.*", "*.png"))


def run_without_weights(dest: Path, run: Path) -> None:
    """A finished run folder whose trained weights were deleted (or moved) since."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("model.safetensors"))


def folder_of_runs(dest: Path, run: Path) -> None:
    """runs/ itself, where its runs were meant (`cnnlab report runs` for `cnnlab report runs/*`)."""
    shutil.copytree(run, dest / run.name)


def class_folders(*classes: str, n: int = 10):
    def build(dest: Path, run: Path) -> None:
        for k, c in enumerate(classes):
            for i in range(n):
                write(dest / c / f"{i}.jpg", jpeg_bytes(noise_rgb((16, 16), seed=100 * k + i)))
    return build


def empty_folder(dest: Path, run: Path) -> None:
    dest.mkdir()


NOTES = {"notes.txt": b"not an image\n"}
PETS = {"pets": class_folders("cats", "dogs")}
OK_RUNS = b"runs:\n  - name: a\n    model: {name: cnn_small}\n"
OK_STUDY = b"name: s\n" + OK_RUNS


def study(body: bytes) -> dict:
    return {"s.yaml": body}


CASES = {
    # audit
    "audit-missing-folder": Case(("audit", "no_such_folder"), ("no_such_folder",)),
    "audit-file-not-archive": Case(("audit", "notes.txt"), ("notes.txt",), NOTES),
    "audit-empty-folder": Case(("audit", "empty"), ("empty",), {"empty": empty_folder}),
    "audit-corrupt-zip": Case(("audit", "data.zip"), ("data.zip",), {"data.zip": b"PK\x03\x04 not really a zip"}),
    "audit-out-under-a-file": Case(("audit", "pets", "--out", "notes.txt/audit.json"), ("notes.txt/audit.json",),
                                   {**NOTES, **PETS}),
    # lr-find
    "lr-find-missing-config": Case(("lr-find", "nope.yaml"), ("nope.yaml",)),
    "lr-find-config-not-a-mapping": Case(("lr-find", "c.yaml"), ("c.yaml",), {"c.yaml": b"- 1\n- 2\n"}),
    "lr-find-wrong-type": Case(("lr-find", "--data", "{cifar}", "--set", "train.epochs=two"), ("train.epochs", "two")),
    "lr-find-bad-lr": Case(("lr-find", "--data", "{cifar}", "--lr", "fast"), ("train.lr", "fast")),
    "lr-find-set-without-value": Case(("lr-find", "--set", "train.lr"), ("train.lr",)),
    "lr-find-missing-data": Case(("lr-find", "--data", "no_such_folder"), ("no_such_folder",)),
    "lr-find-one-class": Case(("lr-find", "--data", "zebras"), ("zebras",), {"zebras": class_folders("zebra")}),
    "lr-find-unknown-model": Case(("lr-find", "--data", "pets", "--model", "resnet9000"), ("resnet9000",), PETS),
    "lr-find-out-is-a-file": Case(("lr-find", "--data", "pets", "--model", "cnn_small", "--out", "notes.txt"),
                                  ("notes.txt",), {**NOTES, **PETS}),
    # report
    "report-missing-folder": Case(("report", "no_such_run"), ("no_such_run",)),
    "report-out-is-a-file": Case(("report", "{run}", "--out", "notes.txt"), ("notes.txt",), NOTES),
    "report-unfinished-run": Case(("report", "unfinished"), ("unfinished", "summary.json"),
                                  {"unfinished": unfinished_run}),
    "report-folder-of-runs": Case(("report", "runs"), ("runs", "runs/*"), {"runs": folder_of_runs}),
    "report-corrupt-study": Case(("report", "st"), ("st", "study.json"), {"st/study.json": b"{not json"}),
    # evaluate
    "evaluate-missing-run": Case(("evaluate", "no_such_run"), ("no_such_run",)),
    "evaluate-not-a-run": Case(("evaluate", "empty"), ("empty",), {"empty": empty_folder}),
    "evaluate-missing-data": Case(("evaluate", "{run}", "--data", "no_such_folder"), ("no_such_folder",)),
    "evaluate-unknown-classes": Case(("evaluate", "{run}", "--data", "zebras"), ("zebras", "zebra"),
                                     {"zebras": class_folders("zebra", "airplane")}),
    "evaluate-unfinished-run": Case(("evaluate", "unfinished"), ("unfinished", "summary.json"),
                                    {"unfinished": unfinished_run}),
    "evaluate-run-without-weights": Case(("evaluate", "lost"), ("lost", "model.safetensors", "put the file back"),
                                         {"lost": run_without_weights}),
    "evaluate-undecodable-data": Case(("evaluate", "{run}", "--data", "broken"), ("broken",),
                                      {"broken/airplane/a.jpg": b"junk", "broken/cat/b.jpg": b""}),
    # export (a failing --check has its own test below)
    "export-missing-run": Case(("export", "no_such_run"), ("no_such_run",)),
    "export-unfinished-run": Case(("export", "unfinished"), ("unfinished", "summary.json"),
                                  {"unfinished": unfinished_run}),
    "export-out-is-a-file": Case(("export", "{run}", "--out", "notes.txt"), ("notes.txt",), NOTES),
    # weights (CNNLAB_OFFLINE=1 from conftest)
    "weights-fetch-offline": Case(("weights", "fetch", "resnet18"), ("resnet18", "CNNLAB_OFFLINE")),
    "weights-fetch-unknown": Case(("weights", "fetch", "resnet9000"), ("resnet9000",)),
    # summary
    "summary-unknown-model": Case(("summary", "resnet9000"), ("resnet9000",)),
    "summary-size-below-pools": Case(("summary", "cnn_small", "--image-size", "1"), ("image size 1",)),
    "summary-size-below-fastnet": Case(("summary", "fastnet", "--image-size", "1"), ("fastnet", "1x1")),
    "summary-negative-size": Case(("summary", "cnn_small", "--image-size", "-3"), ("-3",)),
    "summary-size-below-backbone": Case(("summary", "resnet18", "--image-size", "8"), ("resnet18", "got 8")),
    "summary-one-class": Case(("summary", "cnn_small", "--num-classes", "1"), ("got 1",)),
    "summary-size-not-a-number": Case(("summary", "cnn_small", "--image-size", "big"), ("big",)),
    # models
    "models-extra-argument": Case(("models", "extra"), ("extra",)),
    # predict
    "predict-missing-run": Case(("predict", "no_such_run", "notes.txt"), ("no_such_run",), NOTES),
    "predict-folder": Case(("predict", "{run}", "empty"), ("empty",), {"empty": empty_folder}),
    "predict-missing-file": Case(("predict", "{run}", "nope.jpg"), ("nope.jpg",)),
    "predict-not-an-image": Case(("predict", "{run}", "notes.txt"), ("notes.txt",), NOTES),
    # train
    "train-weights-not-weights": Case(("train", "--data", "{cifar}", "--model", "resnet18", "--weights", "notes.txt",
                                       "--freeze", "--set", "data.limit_per_class=20"), ("notes.txt",), NOTES),
    # study files
    "study-missing-file": Case(("study", "nope.yaml"), ("nope.yaml",)),
    "study-bad-yaml": Case(("study", "s.yaml"), ("s.yaml", "line 3"), study(b"name: s\nruns: [\n")),
    "study-not-a-mapping": Case(("study", "s.yaml"), ("s.yaml", "mapping"), study(b"- name: a\n")),
    "study-unknown-key": Case(("study", "s.yaml"), ("s.yaml", "runz"), study(b"name: s\nrunz: []\n")),
    "study-unknown-entry-key": Case(("study", "s.yaml"), ("s.yaml", "modle"),
                                    study(b"name: s\nruns:\n  - name: a\n    modle: {name: cnn_small}\n")),
    "study-unknown-config-key": Case(("study", "s.yaml"), ("s.yaml", "train.epoch"),
                                     study(OK_STUDY + b"    train: {epoch: 2}\n")),
    "study-epochs-not-a-number": Case(("study", "s.yaml"), ("s.yaml", "train.epochs", "two"),
                                      study(OK_STUDY + b"    train: {epochs: \"two\"}\n")),
    "study-lrs-not-a-list": Case(("study", "s.yaml"), ("s.yaml", "lrs", "5"), study(OK_STUDY + b"    lrs: 5\n")),
    "study-lr-not-a-number": Case(("study", "s.yaml"), ("s.yaml", "fast"),
                                  study(OK_STUDY + b"    lrs: [1e-3, fast]\n")),
    "study-runs-not-a-list": Case(("study", "s.yaml"), ("s.yaml", "runs", "5"), study(b"name: s\nruns: 5\n")),
    "study-defaults-not-a-mapping": Case(("study", "s.yaml"), ("s.yaml", "defaults"),
                                         study(b"name: s\ndefaults: 5\n" + OK_RUNS)),
    "study-section-not-a-mapping": Case(("study", "s.yaml"), ("s.yaml", "model", "5"),
                                        study(b"name: s\nruns:\n  - model: 5\n")),
    "study-missing-data": Case(("study", "s.yaml"), ("no_such_folder",),
                               study(b"name: s\ndefaults: {data: {path: no_such_folder}}\n" + OK_RUNS)),
    "study-set-without-value": Case(("study", "s.yaml", "--set", "train.epochs"), ("train.epochs",), study(OK_STUDY)),
}


@pytest.fixture(scope="module")
def run(cifar_root, tmp_path_factory) -> Path:
    """One tiny trained run, read (never changed) by the cases that need a run folder."""
    out = tmp_path_factory.mktemp("bad-input-runs")
    code = main(["train", "--data", str(cifar_root), "--model", "cnn_small", "--epochs", "1", "--precision", "fp32",
                 "--set", "data.limit_per_class=10", "--out", str(out), "--no-progress"])
    assert code == 0
    (folder,) = out.iterdir()
    return folder


def listing(*roots: Path) -> dict[str, object]:
    """Every path under `roots` with its size and mtime (folders as 'dir'): a before/after fingerprint.

    In the cnnlab cache only files count: an empty cache subfolder (archives/ made before a
    corrupt archive is refused) is the cache's own, not output; so are the files' digests under
    hashes/, which any scan of the data keeps (whether the suite scanned {cifar} before a case
    depends on the order tests reach a worker in).
    """
    cache = Path(os.environ["CNNLAB_CACHE"])
    seen: dict[str, object] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if root == cache and (p.is_dir() or p.relative_to(cache).parts[0] == "hashes"):
                continue
            st = p.lstat()
            seen[str(p)] = "dir" if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return seen


def changes(before: dict, after: dict) -> list[str]:
    return sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)})


def cli(argv: list[str], capsys) -> tuple[int, str, str, bool]:
    """(exit status, stdout, stderr, crashed) of `cnnlab ARGV` run as the console script runs it."""
    capsys.readouterr()
    crashed = False
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors: `python -m cnnlab` exits with this code
        code = e.code
    except Exception:  # an uncaught exception: a real terminal would show this traceback, exit 1
        code, crashed = 1, True
        print(traceback.format_exc(), file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err, crashed


def violations(code, out: str, err: str, names: list[str], written: list[str]) -> dict[str, str]:
    """Each part of the bad-input contract this result breaks, with what was seen."""
    v = {}
    if code != 2:
        v["exit"] = f"exit status {code!r}, not 2"
    if "Traceback" in out + err:
        v["traceback"] = "a traceback"
    lines = err.splitlines()
    if len(lines) != 1 or not lines[0].startswith(PREFIX):
        v["one_line"] = f"stderr is not one '{PREFIX}...' line: {err!r}"
    said = [m.group(1) for m in map(re.compile(r"^cnnlab[\w -]*: error: (.*)$").match, lines) if m]
    message = said[-1] if said else ""
    missing = [n for n in names if n not in message]
    if missing:
        v["names"] = f"the message does not name {missing}: {message!r}"
    if not ADVICE.search(message):
        v["advice"] = f"the message does not say what to do: {message!r}"
    if written:
        v["written"] = f"files written or changed: {written[:5]}"
    return v


def judge(case: Case, v: dict[str, str], crashed: bool, detail: str) -> None:
    assert not crashed and not v, f"{v}\n{detail}"


def prepare(case: Case, tmp_path: Path, run: Path, cifar_root: Path) -> tuple[list[str], list[str]]:
    for rel, content in case.files.items():
        if callable(content):
            content(tmp_path / rel, run)
        else:
            write(tmp_path / rel, content)

    def fill(s: str) -> str:
        return s.replace("{run}", str(run)).replace("{cifar}", str(cifar_root))

    return [fill(a) for a in case.argv], [fill(n) for n in case.names]


def watched(tmp_path: Path, run: Path) -> tuple[Path, ...]:
    return tmp_path, run, Path(os.environ["CNNLAB_CACHE"])


def needs_run(case: Case) -> bool:
    return any("{run}" in a for a in case.argv) or any(c in (unfinished_run, run_without_weights, folder_of_runs)
                                                       for c in case.files.values())


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, monkeypatch, capsys, request, cifar_root):
    case = CASES[name]
    run = request.getfixturevalue("run") if needs_run(case) else tmp_path / "no-run"
    monkeypatch.chdir(tmp_path)  # stray files in the working directory would show in the listing
    argv, names = prepare(case, tmp_path, run, cifar_root)
    roots = [r for r in watched(tmp_path, run) if r.exists()]
    before = listing(*roots)
    code, out, err, crashed = cli(argv, capsys)
    written = changes(before, listing(*roots))
    judge(case, violations(code, out, err, names, written), crashed,
          f"cnnlab {' '.join(argv)}\nexit {code}\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}")


def test_no_traceback_reaches_a_terminal(tmp_path, run, cifar_root):
    """The same contract through a real `python -m cnnlab` process, on a case that used to crash (the others
    reach the same entry point's error handling in process, above)."""
    case = CASES["summary-size-below-fastnet"]
    argv, names = prepare(case, tmp_path, run, cifar_root)
    roots = watched(tmp_path, run)
    before = listing(*roots)
    p = subprocess.run([sys.executable, "-m", "cnnlab", *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    written = changes(before, listing(*roots))
    v = violations(p.returncode, p.stdout, p.stderr, names, written)
    assert not v, f"{v}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-3000:]}"


def test_a_reader_that_stops_early_gets_no_traceback(run, cifar_root):
    """`cnnlab predict RUN FOLDER | head`: the JSON outgrows the pipe, the reader goes after one line, and
    cnnlab ends as a Unix tool does (SIGPIPE's status), not with a BrokenPipeError traceback."""
    p = subprocess.Popen([sys.executable, "-m", "cnnlab", "predict", str(run), str(cifar_root / "test")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("[")
        p.stdout.close()
        code = p.wait(timeout=300)
    finally:
        p.kill()
    err = p.stderr.read()
    assert code == 141 and "Traceback" not in err, err


def test_export_check_that_fails_says_so_in_one_line(run, tmp_path, monkeypatch, capsys):
    """`export --check` passes on a faithful bundle; when the bundle's probabilities differ from
    evaluation's it exits non-zero with one `cnnlab: error:` line and writes nothing but the bundle."""
    from cnnlab.evaluate.predict import Predictor

    monkeypatch.chdir(tmp_path)
    code, out, err, crashed = cli(["export", str(run), "--out", str(tmp_path / "good"), "--check"], capsys)
    assert (code, err, crashed) == (0, "", False), out + err
    before, run_before = listing(tmp_path), listing(run)
    real = Predictor.predict_proba
    monkeypatch.setattr(Predictor, "predict_proba", lambda self, images: real(self, images) * 0.5)
    bundle = tmp_path / "bad"
    code, out, err, crashed = cli(["export", str(run), "--out", str(bundle), "--check"], capsys)
    assert code not in (0, None) and not crashed, out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "differ" in lines[0], err
    assert "Traceback" not in out + err
    assert not changes(before, {k: x for k, x in listing(tmp_path).items() if not k.startswith(str(bundle))})
    assert not changes(run_before, listing(run))
