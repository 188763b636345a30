"""The one image decoder: every path that reads an image (audit, cache, training, prediction,
serving) goes through `decode_image`, so what the model saw in training is what it sees later.

It decodes fully (not just the header), applies EXIF orientation, and turns every colour mode
Pillow knows into 8-bit RGB: 16-bit data is scaled (65535 -> 255), never clipped; alpha is
composited on a white background; palette, CMYK, 1-bit and grey become RGB; animated files give
their first frame. The content decides the format, never the file name, so a PNG named `.jpg`
loads. Anything that cannot be decoded raises `DecodeError` with a short reason: `NotAnImage` for
bytes that are no image at all (or none), `ImageTooLarge` for a decompression bomb, and plain
`DecodeError` for an image that is damaged or unusable.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# File endings we treat as candidate images; anything else in a data folder is ignored (and
# reported as ignored). The content is still sniffed, so a mislabelled ending is fine.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .bmp .dib .webp .tif .tiff .ppm .pgm .pbm .pnm .tga .ico".split()
)
MAX_PIXELS = 64_000_000  # larger claimed sizes are treated as decompression bombs
BACKGROUND = (255, 255, 255)  # alpha is composited on white


class DecodeError(Exception):
    """The file is not a usable image; str(error) is the reason shown to the user."""


class NotAnImage(DecodeError):
    """Empty, or bytes no image format recognises (the server's 415)."""


class ImageTooLarge(DecodeError):
    """A decompression bomb: the image claims more pixels than MAX_PIXELS (the server's 413)."""


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, EXIF orientation applied
    format: str  # what the content is (PNG, JPEG, ...), whatever the file is called
    mode: str  # the original colour mode (L, P, RGBA, CMYK, I;16, ...)
    width: int  # original size, before orientation
    height: int
    frames: int


def is_image_name(path: str | Path) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def decode_image(source: bytes | str | Path, max_pixels: int = MAX_PIXELS) -> Decoded:
    """Decode `source` (raw bytes or a file path) fully into an RGB image.

    Raises:
        NotAnImage: empty, or not an image format Pillow recognises.
        ImageTooLarge: larger than `max_pixels` (a decompression bomb).
        DecodeError: truncated, zero-sized, undecodable, or an unsupported colour mode.
    """
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    if not data:
        raise NotAnImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we reject instead.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLarge("decompression bomb: claimed size is too large") from None
        # No format opened the bytes (Pillow's plugins turn most of their own header errors into this too), or
        # one began to read them and failed: a damaged image (e.g. a JPEG cut short: "Truncated File Read").
        except Image.UnidentifiedImageError:
            raise NotAnImage("not a recognised image format") from None
        except Exception as e:
            raise DecodeError(f"damaged or truncated image ({type(e).__name__}: {str(e)[:80]})") from None
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"decompression bomb: {width}x{height} pixels is over the {max_pixels:,} limit")
        if width == 0 or height == 0:
            raise DecodeError("image has zero width or height")
        fmt, mode = img.format or "unknown", img.mode
        frames = getattr(img, "n_frames", 1)
        try:
            img.seek(0)
            img.load()
        except Exception as e:
            reason = "truncated file" if "truncat" in str(e).lower() else f"cannot decode ({type(e).__name__}: {e})"
            raise DecodeError(reason) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # broken EXIF: keep the pixels as stored rather than reject a readable image
    try:
        rgb = to_rgb(img)
    except Exception as e:
        raise DecodeError(f"unsupported colour mode {img.mode} ({type(e).__name__})") from None
    return Decoded(rgb, fmt, mode, width, height, frames)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (16-bit scaled, alpha on BACKGROUND)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    if (mode == "P" and "transparency" in img.info) or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = a.astype(np.float64)
    if mode.startswith("I;16"):
        top = 65535.0
    elif mode == "F":
        top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
    else:  # "I": 32-bit container; 16-bit PNGs often arrive here
        peak = a.max(initial=0)
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    return np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)


def fit_square(img: Image.Image, size: int, crop: float = 1.0) -> Image.Image:
    """The resize policy: scale the shorter side to `size / crop` (antialiased), then centre-crop `size`.

    `crop` below 1 is the pretrained networks' evaluation crop (timm's crop_pct, 0.875 = resize to
    256 and cut the central 224).
    """
    w, h = img.size
    if (w, h) == (size, size):
        return img
    short = max(size, round(size / crop))
    scale = short / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_array(source: bytes | str | Path, size: int, crop: float = 1.0) -> np.ndarray:
    """Decode and fit one image: uint8 array (3, size, size), the model's input before scaling."""
    img = fit_square(decode_image(source).image, size, crop)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
