"""Shared fixtures: a private cache per test session, the shared datasets read in place."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for tests/hostile.py

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Keep the tensor/archive cache out of the user's home during tests."""
    old = os.environ.get("CNNLAB_CACHE")
    os.environ["CNNLAB_CACHE"] = str(tmp_path_factory.mktemp("cnnlab-cache"))
    os.environ["MPLBACKEND"] = "Agg"
    os.environ["CNNLAB_OFFLINE"] = "1"  # tests never download weights or data
    yield
    if old is None:
        os.environ.pop("CNNLAB_CACHE", None)
    else:
        os.environ["CNNLAB_CACHE"] = old


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    root = SHARED / "cifar10"
    assert (root / "train").is_dir(), f"the shared CIFAR-10 copy is missing at {root}"
    return root


@pytest.fixture(scope="session")
def hymenoptera_root() -> Path:
    root = SHARED / "hymenoptera"
    assert (root / "train").is_dir(), f"the shared hymenoptera copy is missing at {root}"
    return root
