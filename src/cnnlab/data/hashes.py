"""Content hashes of image files, remembered between runs by what `stat` says about each file.

Splits are keyed by content (splits.py), so every run hashes every file it reads: 1.5 s for
CIFAR-10's 60,000. A file whose size, inode, modification and change times are still those it
had when it was hashed keeps its hash. The change time (ctime) moves with every write and no tool
sets it back, so an edit is never missed, even one that restores the modification time. As git
does with its index, a file changed in the last seconds ("racy") is hashed but not remembered: on
a file system with coarse timestamps a second write in the same tick would look unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from cnnlab.core.env import cache_dir
from cnnlab.core.runs import atomic_write, sha256_file

RACY_SECONDS = 2.0


def file_hashes(root: Path, paths: list[str]) -> dict[str, str]:
    """The sha256 of each file `root / path`, from the cache where the file has not changed since."""
    store = store_for(root)
    known = _load(store)
    settled_before = time.time_ns() - int(RACY_SECONDS * 1e9)
    hashes, fresh, base = {}, {}, str(root)
    for path in paths:
        st = os.stat(os.path.join(base, path))  # not Path's "/": a third of the time for 60,000 files
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = known.get(path)
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == key:
            hashes[path] = entry[4]
            continue
        hashes[path] = sha256_file(root / path)  # after the stat: a write in between changes the key next time
        if max(st.st_mtime_ns, st.st_ctime_ns) < settled_before:
            fresh[path] = [*key, hashes[path]]
    if fresh:
        try:
            atomic_write(store, json.dumps({**known, **fresh}))
        except OSError:  # a read-only cache costs the next run its hashing time, nothing else
            pass
    return hashes


def store_for(root: Path) -> Path:
    """The file that remembers the hashes of the files under `root`."""
    return cache_dir() / "hashes" / f"{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]}.json"


def _load(store: Path) -> dict:
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):  # none yet, or cut short: hash everything again
        return {}
    return known if isinstance(known, dict) else {}
