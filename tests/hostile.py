"""Builders for small hostile inputs: odd-but-valid images, broken files, junk beside the data."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def noise_rgb(size=(48, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def halves(w=40, h=20) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = RED
    a[:, w // 2:] = BLUE
    return Image.fromarray(a, "RGB")


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(halves(), exif=exif.tobytes())


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def save(path: Path, img: Image.Image, fmt: str, **kw) -> Path:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return write(path, buf.getvalue())


def build_hostile_folder(root: Path) -> dict:
    """A flat two-class folder salted with every case the audit must handle.

    Returns a dict naming what is where: valid odd files, bad files, ignored paths.
    """
    cats, dogs = root / "cats", root / "dogs"
    for i in range(6):
        write(cats / f"ok_{i}.jpg", jpeg_bytes(noise_rgb(seed=i)))
        write(dogs / f"ok_{i}.jpg", jpeg_bytes(noise_rgb(seed=100 + i)))
    save(cats / "grey.png", Image.new("L", (20, 10), 77), "PNG")
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    save(cats / "palette.png", pal, "PNG")
    tpal = Image.new("P", (10, 10), 0)
    tpal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    tpal.putpixel((0, 0), 1)
    save(cats / "palette_transparent.png", tpal, "PNG", transparency=0)
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = (0, 128, 0)
    rgba[:5, :, 3] = 0  # top half fully transparent
    rgba[5:, :, 3] = 255
    save(cats / "rgba.png", Image.fromarray(rgba, "RGBA"), "PNG")
    save(cats / "la.png", Image.fromarray(np.dstack([np.full((8, 8), 40, np.uint8), np.full((8, 8), 255, np.uint8)]), "LA"), "PNG")
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    save(cats / "cmyk.tif", cmyk, "TIFF")
    write(cats / "cmyk.jpg", jpeg_bytes(Image.new("CMYK", (16, 16), (0, 0, 0, 0))))  # white, as CMYK JPEG
    sixteen = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16).repeat(4, 0)
    save(dogs / "sixteen.png", Image.fromarray(sixteen), "PNG")
    save(dogs / "onebit.png", Image.new("1", (9, 9), 1), "PNG")
    frames = [Image.new("RGB", (12, 12), RED), Image.new("RGB", (12, 12), BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    write(dogs / "animated.gif", buf.getvalue())
    save(dogs / "png_named.jpg", Image.new("RGB", (10, 10), (9, 99, 199)), "PNG")
    write(dogs / "exif6.jpg", exif_jpeg(6))
    write(dogs / "exif3.jpg", exif_jpeg(3))
    # bad files
    good = jpeg_bytes(noise_rgb((64, 64), seed=7))
    write(cats / "truncated.jpg", good[: len(good) // 2])
    write(cats / "empty.jpg", b"")
    write(dogs / "garbage.png", bytes(np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8)))
    write(dogs / "bomb.png", png_bomb(100_000, 100_000))
    write(dogs / "big_claim.png", png_bomb(9_000, 9_000))  # under Pillow's limit, over ours
    # junk that must be ignored and never become a class
    write(root / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(cats / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(root / ".ipynb_checkpoints" / "phantom" / "x.jpg", jpeg_bytes(noise_rgb(seed=9)))
    write(cats / ".ipynb_checkpoints" / "ok_0-checkpoint.jpg", jpeg_bytes(noise_rgb(seed=0)))
    write(dogs / "notes.txt", b"not an image")
    write(root / "SHA256SUMS", b"0" * 64 + b"  cats/ok_0.jpg\n")
    (root / "birds").mkdir()  # empty class folder
    return {
        "bad": {"cats/truncated.jpg", "cats/empty.jpg", "dogs/garbage.png", "dogs/bomb.png", "dogs/big_claim.png"},
        "ignored": {".DS_Store", "cats/.DS_Store", ".ipynb_checkpoints/", "cats/.ipynb_checkpoints/", "dogs/notes.txt",
                    "SHA256SUMS"},
        "valid_odd": ["cats/grey.png", "cats/palette.png", "cats/palette_transparent.png", "cats/rgba.png", "cats/la.png",
                      "cats/cmyk.tif", "cats/cmyk.jpg", "dogs/sixteen.png", "dogs/onebit.png", "dogs/animated.gif",
                      "dogs/png_named.jpg", "dogs/exif6.jpg", "dogs/exif3.jpg"],
    }
