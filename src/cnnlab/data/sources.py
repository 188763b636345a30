"""Where the images come from: one `--data` argument, resolved to a scanned image folder.

`--data` may be a folder of class subfolders, a folder whose `train/`, `test/` (and optional
`val/`) hold class subfolders, a .zip/.tar(.gz) archive of either, or a dataset name:
`cifar10` (an image-folder copy or the official archive under $CNNLAB_DATA or the user cache,
downloaded when online) or `digits` (scikit-learn's bundled 8x8 digits, always available).
Without `--data` (data.path empty) cnnlab looks for CIFAR-10 (`default_data`) and stops, saying
where it looked, when there is none; `auto` (the main job's opt-in, configs/demo.yaml) does the
same but ends with the bundled digits, saying so. Nothing trains on data nobody asked for.
Hidden files and folders and non-image files never become classes; they are listed as ignored.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cnnlab.core.env import cache_dir, offline
from cnnlab.core.errors import UserError
from cnnlab.core.runs import file_digest
from cnnlab.data.archives import (
    ARCHIVE_SUFFIXES,
    cifar_tar_to_folder,
    extract_archive,
    is_cifar_python_archive,
    staged_folder,
)
from cnnlab.data.decode import is_image_name

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DATASET_NAMES = ("cifar10", "digits", "auto")  # data names that are not paths (auto: see default_data)


@dataclass(frozen=True)
class Item:
    path: str  # relative to the scan root, POSIX separators
    label: str
    split: str  # train / val / test, or "" when the folder has no split


@dataclass(frozen=True)
class Scan:
    root: Path
    items: tuple[Item, ...]
    classes: tuple[str, ...]
    has_split: bool  # the folder ships its own train/test split
    ignored: tuple[str, ...] = ()
    empty_classes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__") or name.startswith("~")


def _walk_images(folder: Path, root: Path, ignored: list[str]) -> list[str]:
    """Relative posix paths of the image files under `folder` (string work: 60,000 files in well under a second)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        prefix = Path(dirpath).relative_to(root).as_posix() + "/"
        for d in sorted(dirnames):
            if _hidden(d):
                ignored.append(prefix + d + "/")
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in sorted(filenames):
            (ignored if _hidden(name) or not is_image_name(name) else out).append(prefix + name)
    return out


def scan_folder(root: Path) -> Scan:
    """List the images under `root` with their class and split; no decoding here."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} not found; pass --data a folder, an archive, or one of {', '.join(DATASET_NAMES)}")
    ignored: list[str] = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    for p in sorted(root.iterdir()):
        if p.is_file() or _hidden(p.name):
            ignored.append(p.name + ("/" if p.is_dir() else ""))
    split_dirs = [p for p in subdirs if p.name.lower() in SPLIT_NAMES]
    has_split = bool(split_dirs) and len(split_dirs) == len(subdirs)
    groups = [(p, SPLIT_NAMES[p.name.lower()]) for p in split_dirs] if has_split else [(root, "")]
    if has_split and len({s for _, s in groups}) != len(groups):
        raise UserError(f"data folder {root} has two folders for one split ({', '.join(p.name for p in split_dirs)})")
    items, empty, warnings = [], [], []
    for base, split in groups:
        for p in sorted(base.iterdir()):
            if base is not root and (p.is_file() or _hidden(p.name)):
                ignored.append(p.relative_to(root).as_posix() + ("/" if p.is_dir() else ""))
        class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not _hidden(p.name))
        for cdir in class_dirs:
            files = _walk_images(cdir, root, ignored)
            if not files:
                empty.append(cdir.relative_to(root).as_posix())
                warnings.append(f"class folder {cdir.relative_to(root).as_posix()} holds no images; left out")
            items += [Item(f, cdir.name, split) for f in files]
    classes = tuple(sorted({i.label for i in items}))
    if has_split:
        for _, split in groups:
            present = {i.label for i in items if i.split == split}
            missing = [c for c in classes if c not in present]
            if missing:
                warnings.append(f"split {split} has no images of class {', '.join(missing)}")
    else:  # train, val and test are carved from each class: a class needs an image for each
        counts = {c: 0 for c in classes}
        for i in items:
            counts[i.label] += 1
        for c, n in counts.items():
            if n < 3:
                warnings.append(f"class {c} has {n} image{'s' * (n != 1)}: too few to reach train, validation and "
                                "test; add images to it or leave it out")
    return Scan(root, tuple(items), classes, has_split, tuple(ignored), tuple(empty), tuple(warnings))


def require_trainable(scan: Scan, what: str = "training") -> Scan:
    """Refuse data no classifier can learn from, with what to do about it."""
    if not scan.items:
        raise UserError(f"no images found in {scan.root}; put class subfolders of images there (e.g. cats/, dogs/)")
    if len(scan.classes) < 2:
        raise UserError(f"{scan.root} holds one class ({scan.classes[0]}); {what} needs at least two class folders")
    if scan.has_split and not any(i.split == "train" for i in scan.items):
        raise UserError(f"{scan.root} has split folders but no train/ folder; add train/ or use a flat class layout")
    return scan


def resolve_data(data: str) -> tuple[Path, str]:
    """Turn `--data` into a local image folder. Returns (folder, a line saying what was used).

    "" (no data given) and "auto" are `default_data` (without and with the digits at the end).
    """
    if not data or (data.lower() == "auto" and not Path(data).is_dir()):
        found, line = default_data(digits=bool(data))
        return _resolve_named(found)[0], line
    return _resolve_named(data)


def _resolve_named(data: str) -> tuple[Path, str]:
    """A folder, an archive, `cifar10` or `digits` -> (folder, a line saying what was used)."""
    path = Path(data).expanduser()
    if path.is_dir():
        return path, f"data: image folder {path}"
    if path.is_file():
        if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise UserError(f"--data {path} is a file but not an archive; pass a folder or a .zip/.tar/.tar.gz file")
        return _from_archive(path), f"data: archive {path}"
    if data.lower() == "cifar10":
        return _cifar10()
    if data.lower() == "digits":
        return digits_folder(), "data: scikit-learn's bundled digits (1,797 8x8 images, 10 classes)"
    raise UserError(f"--data {data}: no such folder or archive; pass a folder, an archive, or one of {', '.join(DATASET_NAMES)}")


def _from_archive(archive: Path) -> Path:
    digest = file_digest(archive)[:16]
    if is_cifar_python_archive(archive):
        # a file the user names is not necessarily the official one: no md5 check here
        return cifar_tar_to_folder(archive, cache_dir() / "datasets" / f"cifar10-{digest}", check_md5=False)
    folder = extract_archive(archive, cache_dir() / "archives" / digest)
    # an archive usually wraps the data in one top folder: step into it
    entries = [p for p in folder.iterdir() if not _hidden(p.name)]
    while len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() not in SPLIT_NAMES:
        inner = [p for p in entries[0].iterdir() if not _hidden(p.name)]
        if any(p.is_file() and is_image_name(p.name) for p in inner):
            break  # the single folder is a class, not a wrapper
        folder, entries = entries[0], inner
    return folder


def _cifar10() -> tuple[Path, str]:
    roots = [Path(os.environ["CNNLAB_DATA"]).expanduser()] if os.environ.get("CNNLAB_DATA") else []
    roots.append(cache_dir() / "datasets")
    looked = []
    for root in roots:
        for cand in (root / "cifar10", root / "cifar-10", root):
            looked.append(str(cand))
            if (cand / "train").is_dir() and (cand / "test").is_dir():
                return cand, f"data: CIFAR-10 image folder {cand}"
        tar = root / "cifar-10-python.tar.gz"
        looked.append(str(tar))
        if tar.is_file():
            return cifar_tar_to_folder(tar, cache_dir() / "datasets" / "cifar10-official"), f"data: CIFAR-10 archive {tar}"
    target = cache_dir() / "datasets" / "cifar-10-python.tar.gz"
    if offline():
        raise UserError("CIFAR-10 not found, and CNNLAB_OFFLINE=1 forbids the download. Looked in: "
                        + ", ".join(looked) + ". Put cifar-10-python.tar.gz or a cifar10/ image folder in $CNNLAB_DATA")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        with urllib.request.urlopen(CIFAR10_URL, timeout=20) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        os.replace(tmp, target)
    except OSError:
        raise UserError(
            "CIFAR-10 not found and the download failed (offline?). Looked in: " + ", ".join(looked)
            + f". Put cifar-10-python.tar.gz or a cifar10/ image folder in $CNNLAB_DATA, or download {CIFAR10_URL}"
        ) from None
    return cifar_tar_to_folder(target, cache_dir() / "datasets" / "cifar10-official"), f"data: CIFAR-10 downloaded to {target}"


def digits_folder() -> Path:
    """scikit-learn's digits written once as PNG class folders, so they take the normal path."""
    dest = cache_dir() / "datasets" / "digits"
    if dest.is_dir():
        return dest
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    with staged_folder(dest, f"cannot write the digits to {dest}") as tmp:
        for i, (img, y) in enumerate(zip(d.images, d.target)):
            folder = tmp / str(int(y))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.uint8(np.rint(img * (255 / 16))), "L").save(folder / f"{i:04d}.png")
    return dest


def default_data(digits: bool = False) -> tuple[str, str]:
    """The data when none is given: the shared CIFAR-10 copy (../shared/data/cifar10 from the working
    folder), $CNNLAB_DATA, then CIFAR-10 from the cache or its download. Returns (data, a line saying
    which).

    None of them: UserError saying where it looked and how to pass data, or with `digits` (data.path
    `auto`, the main job's explicit opt-in) scikit-learn's bundled digits, saying that and why.
    """
    shared = (Path.cwd().parent / "shared" / "data" / "cifar10").resolve()
    if (shared / "train").is_dir():
        return str(shared), f"data: CIFAR-10 JPEG copy at {shared}"
    if os.environ.get("CNNLAB_DATA"):
        return os.environ["CNNLAB_DATA"], f"data: $CNNLAB_DATA ({os.environ['CNNLAB_DATA']})"
    try:
        folder, line = _cifar10()
        return str(folder), line
    except UserError as e:
        why = str(e).rstrip(".")
    if digits:
        return str(digits_folder()), (f"data: auto: no CIFAR-10 (none at {shared}, $CNNLAB_DATA not set, "
                                      f"{why.split('. ')[0]}); using scikit-learn's bundled digits "
                                      "(1,797 8x8 images, 10 classes)")
    raise UserError(f"no data given, and none found: no CIFAR-10 copy at {shared}, $CNNLAB_DATA not set; {why}. "
                    "Or pass the images with --data FOLDER (class subfolders), an archive, cifar10 or digits "
                    "(data.path in a config file, --set data.path=...); data.path auto takes the bundled digits "
                    "when no CIFAR-10 is found")
