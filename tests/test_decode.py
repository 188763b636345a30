"""The one decoder: odd-but-valid images become correct RGB, bad ones fail with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from hostile import BLUE, RED, build_hostile_folder, exif_jpeg, png_bomb

from cnnlab.data.decode import DecodeError, NotAnImage, decode_image, fit_square, load_array


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return root, build_hostile_folder(root)


def rgb(root, rel):
    d = decode_image(root / rel)
    assert d.image.mode == "RGB"
    return np.asarray(d.image).astype(int), d


def near(a, b, tol=12):
    return np.all(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)) <= tol)


def test_every_odd_file_becomes_rgb(hostile):
    root, info = hostile
    for rel in info["valid_odd"]:
        a, _ = rgb(root, rel)
        assert a.ndim == 3 and a.shape[2] == 3, rel


def test_modes_convert_pixelwise(hostile):
    root, _ = hostile
    a, d = rgb(root, "cats/grey.png")
    assert d.mode == "L" and (a == 77).all()
    a, _ = rgb(root, "cats/palette.png")
    assert (a == (10, 200, 30)).all()
    a, _ = rgb(root, "cats/palette_transparent.png")
    assert tuple(a[0, 0]) == (10, 200, 30) and tuple(a[5, 5]) == (255, 255, 255)  # transparent -> white
    a, d = rgb(root, "cats/rgba.png")
    assert d.mode == "RGBA" and (a[:5] == 255).all() and (a[5:] == (0, 128, 0)).all()
    a, _ = rgb(root, "cats/la.png")
    assert (a == 40).all()
    a, d = rgb(root, "cats/cmyk.tif")
    assert d.mode == "CMYK" and (a == (0, 255, 255)).all()
    a, d = rgb(root, "cats/cmyk.jpg")
    assert d.mode == "CMYK" and near(a, 255, 3)
    a, _ = rgb(root, "dogs/onebit.png")
    assert (a == 255).all()


def test_sixteen_bit_is_scaled_not_saturated(hostile):
    root, _ = hostile
    a, d = rgb(root, "dogs/sixteen.png")
    assert d.mode.startswith("I")
    # 0, 1000, 32896, 65535 -> 0, 4, 128, 255 (a naive convert would clip 1000 to 255)
    assert a[0, :, 0].tolist() == [0, 4, 128, 255]


def test_animated_gives_first_frame_and_content_beats_name(hostile):
    root, _ = hostile
    a, d = rgb(root, "dogs/animated.gif")
    assert d.frames == 2 and near(a, RED, 20)
    a, d = rgb(root, "dogs/png_named.jpg")
    assert d.format == "PNG" and (a == (9, 99, 199)).all()


def test_exif_orientation_applied_pixelwise():
    # stored: 40x20, left half red, right half blue
    d6 = decode_image(exif_jpeg(6))  # display = stored rotated 90 degrees clockwise
    a = np.asarray(d6.image).astype(int)
    assert d6.image.size == (20, 40)
    assert near(a[5, 10], RED, 40) and near(a[35, 10], BLUE, 40)
    d3 = decode_image(exif_jpeg(3))  # 180 degrees: red moves to the right
    a = np.asarray(d3.image).astype(int)
    assert d3.image.size == (40, 20)
    assert near(a[10, 35], RED, 40) and near(a[10, 5], BLUE, 40)


@pytest.mark.parametrize("rel,reason", [
    ("cats/truncated.jpg", "truncated"), ("cats/empty.jpg", "empty"), ("dogs/garbage.png", "not a recognised image"),
    ("dogs/bomb.png", "decompression bomb"), ("dogs/big_claim.png", "decompression bomb"),
])
def test_bad_files_raise_with_reason(hostile, rel, reason):
    root, _ = hostile
    with pytest.raises(DecodeError, match=reason):
        decode_image(root / rel)


def test_a_jpeg_cut_inside_its_header_is_damaged_not_unknown(hostile):
    """Pillow knows the format and fails inside its header: a damaged image (the server's 422), not bytes of
    an unknown format (415)."""
    root, _ = hostile
    with pytest.raises(DecodeError, match="OSError") as e:
        decode_image((root / "dogs/exif6.jpg").read_bytes()[:200])
    assert not isinstance(e.value, NotAnImage)


def test_bytes_and_paths_decode_alike(hostile):
    root, _ = hostile
    a = np.asarray(decode_image(root / "dogs/exif6.jpg").image)
    b = np.asarray(decode_image((root / "dogs/exif6.jpg").read_bytes()).image)
    assert (a == b).all()
    with pytest.raises(DecodeError):
        decode_image(png_bomb(50_000, 50_000))


def test_fit_square_resizes_shorter_side_and_centre_crops():
    from PIL import Image

    img = Image.new("RGB", (60, 30))
    img.paste((255, 0, 0), (0, 0, 15, 30))  # a red strip on the left quarter: cropped away
    out = fit_square(img, 16)
    assert out.size == (16, 16)
    assert (np.asarray(out)[:, :, 0] < 30).all()
    assert load_array(_png(img), 16).shape == (3, 16, 16)


def _png(img):
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
