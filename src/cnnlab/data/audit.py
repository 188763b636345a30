"""`cnnlab audit`: decode every file of a dataset and say what is in it.

Reports per-class and per-split counts with the imbalance ratio, sizes, colour modes and formats,
byte-identical duplicates within and across splits, every rejected file with its reason, and
every ignored path; writes the JSON, a bar chart of images per class and split, and a grid of
samples per class. A bad file is a finding, never a crash.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnlab.core.errors import UserError
from cnnlab.core.runs import atomic_write, save_json
from cnnlab.core.workers import process_map
from cnnlab.data.decode import DecodeError, decode_image, fit_square
from cnnlab.data.sources import Scan, scan_folder


@dataclass(frozen=True)
class AuditReport:
    root: str
    has_split: bool
    classes: dict  # class -> {split: count, "total": count} (decodable images only)
    total_files: int
    valid_images: int
    imbalance_ratio: float  # largest class / smallest class
    sizes: dict  # "WxH" -> count, most common first
    modes: dict
    formats: dict
    duplicates: list  # [{sha256, paths, splits, labels}]
    rejected: list  # [{path, reason}]
    ignored: list
    empty_classes: list
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _inspect(args):
    root, paths = args
    out = []
    for p in paths:
        try:
            raw = (Path(root) / p).read_bytes()
        except OSError as e:
            out.append({"path": p, "error": f"cannot read ({e.strerror})"})
            continue
        info = {"path": p, "sha256": hashlib.sha256(raw).hexdigest()}
        try:
            d = decode_image(raw)
            info.update(format=d.format, mode=d.mode, size=f"{d.width}x{d.height}", frames=d.frames)
        except DecodeError as e:
            info["error"] = str(e)
        out.append(info)
    return out


def audit(data: Path | Scan, workers: int = 2) -> AuditReport:
    """Decode every image under `data` fully and summarise it (see module docstring)."""
    scan = data if isinstance(data, Scan) else scan_folder(Path(data))
    paths = [i.path for i in scan.items]
    chunk = max(32, math.ceil(len(paths) / max(1, workers * 8)))
    jobs = [(str(scan.root), paths[i:i + chunk]) for i in range(0, len(paths), chunk)]
    infos = [x for part in process_map(_inspect, jobs, workers) for x in part]
    by_path = {i["path"]: i for i in infos}
    classes = {c: {} for c in scan.classes}
    rejected, sizes, modes, formats = [], Counter(), Counter(), Counter()
    groups = defaultdict(list)
    for item in scan.items:
        info = by_path[item.path]
        if "error" in info:
            rejected.append({"path": item.path, "reason": info["error"]})
            continue
        split = item.split or "all"
        classes[item.label][split] = classes[item.label].get(split, 0) + 1
        sizes[info["size"]] += 1
        modes[info["mode"]] += 1
        formats[info["format"]] += 1
        groups[info["sha256"]].append(item)
    for c in classes.values():
        c["total"] = sum(v for k, v in c.items())
    totals = [c["total"] for c in classes.values() if c["total"]]
    duplicates = [
        {"sha256": h, "paths": [i.path for i in items], "splits": sorted({i.split or "all" for i in items}),
         "labels": sorted({i.label for i in items})}
        for h, items in groups.items() if len(items) > 1
    ]
    return AuditReport(
        root=str(scan.root), has_split=scan.has_split, classes=classes, total_files=len(scan.items),
        valid_images=sum(totals), imbalance_ratio=round(max(totals) / min(totals), 3) if totals else 0.0,
        sizes=dict(sizes.most_common()), modes=dict(modes.most_common()), formats=dict(formats.most_common()),
        duplicates=duplicates, rejected=rejected, ignored=list(scan.ignored), empty_classes=list(scan.empty_classes),
        warnings=list(scan.warnings),
    )


def format_report(r: AuditReport, max_lines: int = 20) -> str:
    """The human summary printed by `cnnlab audit`."""
    splits = [s for s in ("train", "val", "test", "all") if any(s in c for c in r.classes.values())]
    lines = [f"audit of {r.root}: {r.total_files:,} image files, {r.valid_images:,} decodable, "
             f"{len(r.classes)} classes" + (" (ships its own split)" if r.has_split else "")]
    width = max([5] + [len(c) for c in r.classes])
    lines.append(f"  {'class':<{width}}  " + "  ".join(f"{s:>7}" for s in splits + ["total"]))
    for name, c in r.classes.items():
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{c.get(s, 0):>7,}" for s in splits + ["total"]))
    sums = {s: sum(c.get(s, 0) for c in r.classes.values()) for s in splits + ["total"]}
    lines.append(f"  {'all':<{width}}  " + "  ".join(f"{sums[s]:>7,}" for s in splits + ["total"]))
    lines.append(f"imbalance ratio (largest / smallest class): {r.imbalance_ratio}")
    lines.append("sizes: " + ", ".join(f"{k} x{v:,}" for k, v in list(r.sizes.items())[:8])
                 + (f" (+{len(r.sizes) - 8} more)" if len(r.sizes) > 8 else ""))
    lines.append("colour modes: " + ", ".join(f"{k} x{v:,}" for k, v in r.modes.items()))
    lines.append("formats: " + ", ".join(f"{k} x{v:,}" for k, v in r.formats.items()))
    across = [d for d in r.duplicates if len(d["splits"]) > 1]
    lines.append(f"byte-identical duplicates: {len(r.duplicates)} groups ({len(across)} across splits)")
    for d in r.duplicates[:5]:
        lines.append(f"  {', '.join(d['paths'][:4])}" + (" (different classes!)" if len(d["labels"]) > 1 else ""))
    lines.append(f"rejected: {len(r.rejected)}")
    for x in r.rejected[:max_lines]:
        lines.append(f"  {x['path']}: {x['reason']}")
    if len(r.rejected) > max_lines:
        lines.append(f"  ... {len(r.rejected) - max_lines} more in the JSON")
    lines.append(f"ignored (hidden or not an image): {len(r.ignored)}"
                 + (": " + ", ".join(r.ignored[:8]) + (" ..." if len(r.ignored) > 8 else "") if r.ignored else ""))
    for w in r.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def write_audit(r: AuditReport, scan: Scan, out: Path, samples_per_class: int = 8) -> list[Path]:
    """Write the JSON, the class-count chart and the sample grid next to it; return the paths."""
    from cnnlab.core.figures import image_grid, plot_class_counts, save_figure

    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name such as {out / 'audit.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the audit to {out}: its folder {out.parent} cannot be made ({e.strerror}); "
                        "pass --out a file in a writable folder") from None
    written = [save_json(out, r.to_dict())]
    counts = {c: {k: v for k, v in d.items() if k != "total"} for c, d in r.classes.items()}
    if counts:
        written.append(save_figure(plot_class_counts(counts), out.with_name(out.stem + "_classes.png")))
    bad = {x["path"] for x in r.rejected}
    images, titles = [], []
    for c in scan.classes:
        picked = [i for i in scan.items if i.label == c and i.path not in bad][:samples_per_class]
        for i in picked:
            images.append(np.asarray(fit_square(decode_image(scan.root / i.path).image, 64)))
            titles.append(c)
    if images:
        grid = image_grid(images, titles, ncols=samples_per_class, title="Samples per class")
        written.append(atomic_write(out.with_name(out.stem + "_samples.png"), grid))
    return written
