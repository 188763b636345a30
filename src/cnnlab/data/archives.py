"""Archives: safe extraction of .zip / .tar(.gz) data, and the official CIFAR-10 pickle batches.

Extraction refuses members that would land outside the target folder (`..`, absolute paths,
links pointing out, device files) and stops at a total-size cap, so an archive can never write
anywhere but its own cache folder. The official `cifar-10-python.tar.gz` stores numpy arrays as
pickles; they are read with an unpickler that only admits numpy's array reconstruction, so no
code from the file can run.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import numpy as np

from cnnlab.core.errors import UserError
from cnnlab.core.runs import file_digest

MAX_EXTRACT_BYTES = 20 * 2**30  # 20 GiB of extracted data at most
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # the official cifar-10-python.tar.gz
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _safe_member(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        raise UserError(f"archive {archive} has a member that escapes its folder ({name!r}); refusing to extract it")
    return p


@contextmanager
def staged_folder(dest: Path, unreadable: str):
    """Build a folder under a temporary name and rename it to `dest` only when complete.

    Read errors while building become a UserError that starts with `unreadable`; on any failure
    the partial folder is removed, so `dest` either exists whole or not at all.
    """
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{unreadable} ({type(e).__name__}: {e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def extract_archive(archive: Path, dest: Path, max_bytes: int = MAX_EXTRACT_BYTES) -> Path:
    """Extract `archive` into `dest` (created atomically); return `dest`. Reuses a finished one."""
    if dest.is_dir():
        return dest
    with staged_folder(dest, f"archive {archive} cannot be read; check that the download is complete") as tmp:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, tmp, max_bytes)
        else:
            _extract_tar(archive, tmp, max_bytes)
    return dest


def _extract_zip(archive: Path, dest: Path, max_bytes: int) -> None:
    total = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = _safe_member(info.filename, archive)
            mode = (info.external_attr >> 16) & 0o170000
            if mode == 0o120000:  # a symlink stored in the zip
                raise UserError(f"archive {archive} holds a link ({info.filename!r}); refusing to extract it")
            if info.is_dir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            total += info.file_size
            if total > max_bytes:
                raise UserError(f"archive {archive} expands past the {max_bytes:,}-byte cap; extract it yourself and pass the folder")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                # count real bytes too: the header's file_size can lie
                written = 0
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    written += len(chunk)
                    if written > info.file_size or total - info.file_size + written > max_bytes:
                        raise UserError(f"archive {archive}: member {info.filename!r} is larger than it claims; refusing it")
                    out.write(chunk)


def _extract_tar(archive: Path, dest: Path, max_bytes: int) -> None:
    total = 0
    with tarfile.open(archive) as tf:
        for m in tf:
            rel = _safe_member(m.name, archive)
            if m.issym() or m.islnk():
                target = PurePosixPath(m.linkname) if m.islnk() else rel.parent / m.linkname
                if PurePosixPath(m.linkname).is_absolute() or ".." in PurePosixPath(os.path.normpath(str(target))).parts:
                    raise UserError(f"archive {archive} has a link pointing out of its folder ({m.name!r} -> {m.linkname!r}); refusing it")
                continue  # links inside the archive are skipped: data folders need none
            if m.isdir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if not m.isfile():
                continue  # devices, fifos: never created
            total += m.size
            if total > max_bytes:
                raise UserError(f"archive {archive} expands past the {max_bytes:,}-byte cap; extract it yourself and pass the folder")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            with open(target, "wb") as out:
                shutil.copyfileobj(src, out)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch needs: numpy arrays, dtypes, and plain containers."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def read_cifar_batch(raw: bytes) -> tuple[np.ndarray, list[int]]:
    """One official batch -> (N, 32, 32, 3) uint8 images, labels."""
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data, labels = d[b"data"], d[b"labels"]
        images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except Exception as e:
        raise UserError(f"a CIFAR-10 batch file is not in the official format ({type(e).__name__}: {e})") from None
    if len(labels) != len(images):
        raise UserError("a CIFAR-10 batch file has a different number of labels and images")
    return images, [int(x) for x in labels]


def cifar_tar_to_folder(archive: Path, dest: Path, check_md5: bool = True) -> Path:
    """Convert the official python-format archive into `dest/{train,test}/<class>/N.png`."""
    from PIL import Image

    if dest.is_dir():
        return dest
    if check_md5 and file_digest(archive, "md5") != CIFAR10_MD5:
        raise UserError(f"{archive} does not have the official CIFAR-10 md5 ({CIFAR10_MD5}); re-download it")
    with staged_folder(dest, f"{archive} cannot be read; re-download it") as tmp, tarfile.open(archive) as tf:
        members = {PurePosixPath(m.name).name: m for m in tf if m.isfile()}
        parts = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
        missing = [n for n, _ in parts if n not in members]
        if missing:
            raise UserError(f"{archive} lacks {', '.join(missing)}; it is not cifar-10-python.tar.gz")
        for name, split in parts:
            images, labels = read_cifar_batch(tf.extractfile(members[name]).read())
            for i, (img, y) in enumerate(zip(images, labels)):
                if not 0 <= y < len(CIFAR10_CLASSES):
                    raise UserError(f"{archive}: label {y} in {name} is out of range")
                folder = tmp / split / CIFAR10_CLASSES[y]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(folder / f"{name}_{i:05d}.png")
    return dest


def is_cifar_python_archive(archive: Path) -> bool:
    if not archive.name.lower().endswith((".tar.gz", ".tgz", ".tar")):
        return False
    try:
        with tarfile.open(archive) as tf:
            return any(PurePosixPath(m.name).name == "data_batch_1" for m in tf)
    except (tarfile.TarError, OSError, EOFError):
        return False
