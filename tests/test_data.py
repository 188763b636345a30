"""Data layer: scanning, the audit on a hostile folder, archives, CIFAR batches, splits, loaders."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import time
import zipfile

from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import build_hostile_folder, jpeg_bytes, noise_rgb, write
from PIL import Image

from cnnlab.cli import main
from cnnlab.core.errors import UserError
from cnnlab.data.archives import extract_archive
from cnnlab.data.audit import audit, format_report
from cnnlab.data import hashes
from cnnlab.data.augment import random_crop, random_flip
from cnnlab.data.loaders import Loader, MemorySource, cached_arrays, make_loaders
from cnnlab.data.sources import resolve_data, scan_folder
from cnnlab.data.splits import load_split, make_split, save_split


@pytest.fixture()
def hostile(tmp_path):
    root = tmp_path / "data"
    return root, build_hostile_folder(root)


def test_audit_hostile_folder_names_every_bad_file_and_no_phantom_class(hostile, tmp_path, capsys):
    root, info = hostile
    out = tmp_path / "out" / "audit.json"
    assert main(["audit", str(root), "--out", str(out), "--workers", "1"]) == 0
    report = json.loads(out.read_text())
    assert set(report["classes"]) == {"cats", "dogs"}  # no birds (empty), no phantom, no .ipynb_checkpoints
    assert {r["path"] for r in report["rejected"]} == info["bad"]
    assert all(r["reason"] for r in report["rejected"])
    assert info["ignored"] <= set(report["ignored"])
    assert report["empty_classes"] == ["birds"]
    n_valid = 12 + len(info["valid_odd"])
    assert report["valid_images"] == n_valid
    assert report["classes"]["cats"]["total"] + report["classes"]["dogs"]["total"] == n_valid
    assert (tmp_path / "out" / "audit_classes.png").stat().st_size > 1000
    assert (tmp_path / "out" / "audit_samples.png").stat().st_size > 1000
    text = capsys.readouterr().out
    for bad in info["bad"]:
        assert bad in text


def test_audit_finds_duplicates_across_splits(tmp_path):
    img = jpeg_bytes(noise_rgb(seed=1))
    for split in ("train", "test"):
        for c in ("a", "b"):
            write(tmp_path / split / c / "x.jpg", jpeg_bytes(noise_rgb(seed=100 + 10 * ("train", "test").index(split) + ("a", "b").index(c))))
    write(tmp_path / "train" / "a" / "dup.jpg", img)
    write(tmp_path / "test" / "a" / "dup.jpg", img)
    r = audit(tmp_path, workers=1)
    assert r.has_split
    assert len(r.duplicates) == 1 and r.duplicates[0]["splits"] == ["test", "train"]


def test_audit_of_shared_hymenoptera(hymenoptera_root, tmp_path):
    r = audit(hymenoptera_root, workers=2)
    assert sum(c["total"] for c in r.classes.values()) + len(r.rejected) == 398
    assert r.formats.get("JPEG") == 397
    assert "SHA256SUMS" in r.ignored


@pytest.mark.parametrize("bad", ["missing", "empty", "one_class", "not_archive"])
def test_bad_data_paths_fail_clearly(tmp_path, capsys, bad):
    target = tmp_path / bad
    if bad == "empty":
        target.mkdir()
    elif bad == "one_class":
        write(target / "only" / "a.jpg", jpeg_bytes(noise_rgb()))
    elif bad == "not_archive":
        target = tmp_path / "notes.txt"
        target.write_text("hello")
    code = main(["train", "--data", str(target), "--epochs", "1", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("cnnlab: error:") and "Traceback" not in err
    assert str(target.name) in err or "no images" in err or "one class" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _tiny_tree(root):
    for c in ("a", "b"):
        for i in range(3):
            write(root / "set" / c / f"{i}.jpg", jpeg_bytes(noise_rgb(seed=i + (10 if c == "b" else 0))))


def test_zip_and_tar_archives_resolve_to_a_folder(tmp_path):
    _tiny_tree(tmp_path / "src")
    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in (tmp_path / "src").rglob("*.jpg"):
            zf.write(p, p.relative_to(tmp_path / "src"))
    tpath = tmp_path / "data.tar.gz"
    with tarfile.open(tpath, "w:gz") as tf:
        tf.add(tmp_path / "src" / "set", arcname="set")
    for archive in (zpath, tpath):
        folder, line = resolve_data(str(archive))
        scan = scan_folder(folder)
        assert scan.classes == ("a", "b") and len(scan.items) == 6, archive


def test_zip_slip_and_escaping_links_are_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("a/ok.jpg", jpeg_bytes(noise_rgb()))
        zf.writestr("../../escaped.txt", "gotcha")
    with pytest.raises(UserError, match="escapes"):
        resolve_data(str(evil))
    # archives extract under the cache (archives/<digest>/): "../../" from there is the cache root
    cache = Path(os.environ["CNNLAB_CACHE"])
    assert not (cache / "escaped.txt").exists() and not list(cache.rglob("escaped.txt"))
    link_tar = tmp_path / "link.tar"
    with tarfile.open(link_tar, "w") as tf:
        info = tarfile.TarInfo("a/passwd.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(UserError, match="link"):
        resolve_data(str(link_tar))
    abs_tar = tmp_path / "abs.tar"
    with tarfile.open(abs_tar, "w") as tf:
        data = b"x"
        info = tarfile.TarInfo("/tmp/abs.jpg")
        info.size = 1
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="escapes"):
        resolve_data(str(abs_tar))


def test_archive_size_cap(tmp_path):
    z = tmp_path / "big.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/x.jpg", b"\0" * 200_000)
    with pytest.raises(UserError, match="cap"):
        extract_archive(z, tmp_path / "out", max_bytes=100_000)
    assert not (tmp_path / "out").exists()


def _cifar_batch(n, seed, payload=None):
    rng = np.random.default_rng(seed)
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [int(i % 10) for i in range(n)],
         b"batch_label": b"test"}
    return pickle.dumps(payload if payload is not None else d, protocol=2)


def _cifar_tar(path, payload=None):
    with tarfile.open(path, "w:gz") as tf:
        for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
            raw = _cifar_batch(20, k, payload if name == "data_batch_1" else None)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))


def test_official_cifar_format_is_read_without_unpickling_code(tmp_path, monkeypatch):
    arc = tmp_path / "cifar-10-python.tar.gz"
    _cifar_tar(arc)
    folder, _ = resolve_data(str(arc))
    scan = scan_folder(folder)
    assert scan.has_split and len(scan.classes) == 10
    assert sum(i.split == "train" for i in scan.items) == 100 and sum(i.split == "test" for i in scan.items) == 20
    # the same archive found by name is md5-checked against the official file
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path))
    with pytest.raises(UserError, match="md5"):
        resolve_data("cifar10")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil" / "cifar-10-python.tar.gz"
    evil.parent.mkdir()
    _cifar_tar(evil, payload={b"data": Evil(), b"labels": [0]})
    with pytest.raises(UserError, match=r"refusing to load \S*print"):
        resolve_data(str(evil))


def test_cifar10_name_offline_error_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "nothing"))
    monkeypatch.setattr("cnnlab.data.sources.CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(UserError, match="Looked in"):
        resolve_data("cifar10")


def test_flat_split_is_stratified_seeded_and_leak_free(tmp_path):
    for c, n in (("a", 50), ("b", 30)):
        for i in range(n):
            write(tmp_path / "d" / c / f"{i}.jpg", jpeg_bytes(noise_rgb((8, 8), seed=i + (1000 if c == "b" else 0))))
    dup = jpeg_bytes(noise_rgb((8, 8), seed=5))  # a.5's bytes, copied under another name
    write(tmp_path / "d" / "a" / "copy_of_5.jpg", dup)
    scan = scan_folder(tmp_path / "d")
    s1 = make_split(scan, val_fraction=0.2, test_fraction=0.2, seed=1)
    s2 = make_split(scan, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert s1 == s2
    counts = s1.counts()
    assert counts["a"]["test"] == 10 and counts["b"]["test"] == 6  # 20% of each class's unique images
    assert counts["a"]["val"] == 10 and counts["b"]["val"] == 6
    where = {}
    for r in s1.rows:
        assert where.setdefault(r.sha256, r.split) == r.split  # copies share a split
    save_split(s1, tmp_path / "split.csv")
    assert load_split(tmp_path / "split.csv", scan) == type(s1)(s1.rows, s1.classes)
    # tamper: move one copy of a duplicated image to another split -> refused as leakage
    lines = (tmp_path / "split.csv").read_text().splitlines()
    dup_rows = [k for k, line in enumerate(lines) if "a/5.jpg" in line or "copy_of_5" in line]
    parts = lines[dup_rows[0]].split(",")
    parts[2] = "train" if parts[2] != "train" else "test"
    lines[dup_rows[0]] = ",".join(parts)
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="leakage"):
        load_split(tmp_path / "bad.csv", scan)


def test_shipped_split_carves_val_and_drops_leaked_train_copies(tmp_path):
    for split, n in (("train", 20), ("test", 5)):
        for c in ("a", "b"):
            for i in range(n):
                write(tmp_path / split / c / f"{i}.jpg", jpeg_bytes(noise_rgb((8, 8), seed=1000 * (split == "test") + 100 * (c == "b") + i)))
    leak = (tmp_path / "test" / "a" / "0.jpg").read_bytes()
    write(tmp_path / "train" / "a" / "leak.jpg", leak)
    s = make_split(scan_folder(tmp_path), val_fraction=0.1, seed=0)
    assert s.dropped == ("train/a/leak.jpg",)
    assert len(s.of("test")) == 10 and len(s.of("val")) == 4 and len(s.of("train")) == 36


def test_val_only_layout_uses_val_as_test(hymenoptera_root):
    s = make_split(scan_folder(hymenoptera_root), val_fraction=0.1, seed=0)
    assert len(s.of("test")) == 153 and len(s.of("val")) > 0
    assert all(r.path.startswith("val/") for r in s.of("test"))


def test_file_hashes_are_remembered_until_a_file_changes(tmp_path, monkeypatch):
    """A settled file is not read again; an edit is seen even with its size and modification time put back."""
    root = tmp_path / "data"
    for name, data in {"a.jpg": b"first", "b.jpg": b"other"}.items():
        write(root / name, data)
    reads = []
    monkeypatch.setattr(hashes, "sha256_file", lambda p: reads.append(Path(p).name) or
                        hashlib.sha256(Path(p).read_bytes()).hexdigest())
    monkeypatch.setattr(hashes, "RACY_SECONDS", 0.0)
    truth = {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in ("a.jpg", "b.jpg")}
    assert hashes.file_hashes(root, ["a.jpg", "b.jpg"]) == truth and sorted(reads) == ["a.jpg", "b.jpg"]
    reads.clear()
    assert hashes.file_hashes(root, ["a.jpg", "b.jpg"]) == truth and reads == []
    before = os.stat(root / "a.jpg")
    time.sleep(0.05)  # past the kernel's coarse clock tick, or the edit could share the first write's ctime
    (root / "a.jpg").write_bytes(b"FIRST")  # same size, then the old modification time restored
    os.utime(root / "a.jpg", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert hashes.file_hashes(root, ["a.jpg", "b.jpg"])["a.jpg"] == hashlib.sha256(b"FIRST").hexdigest()
    assert reads == ["a.jpg"]


def test_file_hashes_forget_racy_files_and_survive_a_broken_cache(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write(root / "a.jpg", b"just written")
    reads = []
    monkeypatch.setattr(hashes, "sha256_file", lambda p: reads.append(p) or
                        hashlib.sha256(Path(p).read_bytes()).hexdigest())
    for _ in range(2):  # changed within RACY_SECONDS: a second write in the same tick could look unchanged
        hashes.file_hashes(root, ["a.jpg"])
    assert len(reads) == 2
    monkeypatch.setattr(hashes, "RACY_SECONDS", 0.0)
    hashes.file_hashes(root, ["a.jpg"])
    assert hashes.store_for(root).is_file()
    hashes.store_for(root).write_text('{"a.jpg": [1, 2')  # cut short
    assert hashes.file_hashes(root, ["a.jpg"]) == {"a.jpg": hashlib.sha256(b"just written").hexdigest()}


def test_tensor_cache_is_reused_and_keeps_order(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (10, 10), (i * 30, 0, 0 if c == "a" else 200)).save(tmp_path / "d" / c / f"{i}.png")
    write(tmp_path / "d" / "b" / "broken.png", b"garbage")
    split = make_split(scan_folder(tmp_path / "d"), val_fraction=0.25, test_fraction=0.25)
    rows = list(split.rows)
    x1, e1 = cached_arrays(tmp_path / "d", rows, 8, workers=1, log=lambda m: None)
    logged = []
    x2, e2 = cached_arrays(tmp_path / "d", rows[::-1], 8, workers=1, log=logged.append)
    assert not logged  # second call: no decoding
    assert (x1 == x2[::-1]).all() and e1 == e2[::-1]
    bad = [r.path for r, e in zip(rows, e1) if e]
    assert bad == ["b/broken.png"]
    for r, img in zip(rows, x1):
        if not r.path.endswith("broken.png"):
            assert img[0, 0, 0] == int(r.path[-5]) * 30


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_records_the_files_it_drops(tmp_path, workers):
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (10, 10), (i * 30, 0, 0 if c == "a" else 200)).save(tmp_path / "d" / c / f"{i}.png")
    split = make_split(scan_folder(tmp_path / "d"), val_fraction=0.25, test_fraction=0.25)
    # break one file of every split after the split was made: only the streaming decode can find them
    broken = sorted({r.split: r.path for r in split.rows}.values())
    for path in broken:
        write(tmp_path / "d" / path, b"garbage")
    loaders = make_loaders(tmp_path / "d", split, 8, 4, 4, loader="stream", workers=workers,
                           mean_std=((0.5,) * 3, (0.25,) * 3), log=lambda m: None)
    assert loaders.kind == "stream" and loaders.dropped() == []
    seen = {s: sum(len(idx) for _, _, idx in getattr(loaders, s)) for s in ("train", "val", "test")}
    assert sum(seen.values()) == len(split.rows) - len(broken)
    list(loaders.train)  # a second epoch drops the same file again: listed once
    dropped = loaders.dropped()
    assert sorted(p for p, _ in dropped) == broken and all(reason for _, reason in dropped)


def test_batched_crop_and_flip_are_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert torch.equal(random_crop(x, 0, g), x)
    out = random_crop(x, 2, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for n in range(2):  # every output sample is some 6x6 window of its padded input
        assert any(torch.equal(out[n], padded[n, :, i:i + 6, j:j + 6]) for i in range(5) for j in range(5))
    f = random_flip(x.repeat(50, 1, 1, 1), torch.Generator().manual_seed(2))
    flipped = [torch.equal(f[k], x[k % 2].flip(2)) for k in range(100)]
    kept = [torch.equal(f[k], x[k % 2]) for k in range(100)]
    assert all(a or b for a, b in zip(flipped, kept)) and 20 < sum(flipped) < 80


def test_alternating_flips_show_each_image_both_ways_every_two_epochs():
    """flip_alternate: a seeded half mirrored in even epochs, the other half in odd ones, whatever the order."""
    n = 200
    x = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    x[:, :, :, 1] = 1  # the right column marks the unmirrored view
    loader = Loader(MemorySource(x), torch.zeros(n, dtype=torch.long), [str(i) for i in range(n)], 64, (0, 0, 0),
                    (1 / 255,) * 3, train=True, augment=("flip_alternate",), seed=3)

    def mirrored(epoch):
        loader.set_epoch(epoch)
        seen = torch.zeros(n, dtype=torch.bool)
        for xb, _, idx in loader:
            seen[idx] = xb[:, 0, 0, 1] == 0
        return seen

    views = [mirrored(e) for e in range(4)]
    assert 60 < int(views[0].sum()) < 140
    for e in range(3):
        assert torch.equal(views[e + 1], ~views[e])
    loader.seed = 4
    assert not torch.equal(mirrored(0), views[0])


def test_normalisation_statistics_match_the_direct_formula():
    import torch

    from cnnlab.data.loaders import _mean_std

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3000, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    x[:, 0] //= 2  # channels with different statistics
    direct = x.double() / 255
    mean, std = _mean_std(x)
    assert mean == tuple(round(v, 4) for v in direct.mean(dim=(0, 2, 3)).tolist())
    assert std == tuple(round(v, 4) for v in direct.std(dim=(0, 2, 3)).tolist())


def test_a_class_too_small_to_split_is_warned_about(tmp_path, capsys):
    for c, n in (("big", 10), ("tiny", 1)):
        for i in range(n):
            write(tmp_path / "d" / c / f"{i}.jpg", jpeg_bytes(noise_rgb((8, 8), seed=100 * (c == "tiny") + i)))
    r = audit(tmp_path / "d", workers=1)
    assert any("class tiny has 1 image: too few" in w for w in r.warnings)
    assert not any("class big" in w for w in r.warnings)
    assert "warning: class tiny has 1 image" in format_report(r)
