"""Images reach the model as they look: every mode Pillow opens becomes faithful 8-bit RGB, and a
resized copy in the cache is always the copy of the original as it is now."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from handclip.data.images import build_cache, cache_dir, load_rgb, to_rgb
from handclip.errors import DataError

# a horizontal grey ramp, dark to light: what every encoding below must give back
RAMP = np.tile(np.linspace(0, 1, 64), (16, 1))


def _encoded(mode: str) -> Image.Image:
    """The ramp stored in `mode`, at that mode's own scale."""
    grey = np.round(RAMP * 255).astype(np.uint8)
    if mode.startswith("I;16"):  # little- or big-endian 16-bit
        wide = np.round(RAMP * 65535).astype("<u2" if mode == "I;16" else ">u2")
        return Image.frombytes(mode, (64, 16), wide.tobytes())
    if mode == "I":
        return Image.fromarray(np.round(RAMP * 65535).astype(np.int32))
    if mode == "F":
        return Image.fromarray(RAMP.astype(np.float32))
    if mode == "1":
        return Image.fromarray(grey).convert("1", dither=Image.Dither.NONE)
    if mode == "P":
        return Image.fromarray(np.stack([grey] * 3, -1), "RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    if mode in ("LA", "RGBA", "PA", "RGBa"):
        alpha = np.full_like(grey, 255)
        return Image.fromarray(np.stack([grey] * 3 + [alpha], -1), "RGBA").convert(mode)
    return Image.fromarray(np.stack([grey] * 3, -1), "RGB").convert(mode)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("I;16", "png"), ("I;16", "tif"), ("I;16B", "tif"), ("I", "tif"), ("F", "tif"), ("L", "png"),
     ("1", "png"), ("P", "png"), ("PA", "mem"), ("LA", "png"), ("RGBA", "png"), ("CMYK", "tif"),
     ("CMYK", "jpg"), ("YCbCr", "tif"), ("LAB", "tif"), ("RGB", "jpg"), ("HSV", "mem"), ("RGBX", "mem"),
     ("RGBa", "mem")],
)  # fmt: skip
def test_every_mode_becomes_the_same_8_bit_picture(tmp_path, mode, suffix):
    # a 16-bit PNG used to turn white and a float TIFF black (convert clips): the ramp must survive
    image = _encoded(mode)
    if suffix == "mem":  # modes Pillow cannot write to a file, only decode from some
        loaded = to_rgb(image, "memory")
    else:
        image.save(tmp_path / f"ramp.{suffix}")
        assert Image.open(tmp_path / f"ramp.{suffix}").mode == mode  # the file really holds such pixels
        loaded = load_rgb(tmp_path / f"ramp.{suffix}")
    pixels = np.asarray(loaded, float).mean(axis=(0, 2))  # the grey level along the ramp
    assert loaded.mode == "RGB" and loaded.size == (64, 16)
    tolerance = 130 if mode == "1" else 6  # a bilevel image keeps only black and white
    assert np.abs(pixels - RAMP[0] * 255).max() <= tolerance, (mode, pixels[::8].round())
    assert pixels[-4:].mean() - pixels[:4].mean() > 200  # dark on the left, light on the right


def test_out_of_range_wide_pixels_are_refused_with_the_mode_and_range(tmp_path):
    Image.fromarray(np.full((8, 8), 3.0e6, np.float32)).save(tmp_path / "huge.tif")
    with pytest.raises(DataError, match=r"huge.tif: mode F pixels span 3e\+06 to 3e\+06, outside 0-255"):
        load_rgb(tmp_path / "huge.tif")
    Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match="nan.tif: float image with NaN"):
        load_rgb(tmp_path / "nan.tif")


def test_a_16_bit_image_is_cached_as_it_looks(tmp_path):
    (tmp_path / "img").mkdir()
    _encoded("I;16").resize((256, 64)).save(tmp_path / "img" / "deep.png")
    assert build_cache(tmp_path, ["img/deep.png"], 32, tmp_path / "derived") == []
    cached = np.asarray(Image.open(cache_dir(tmp_path / "derived", 32) / "img" / "deep.png"), float)
    cached = cached.mean(axis=(0, 2))
    assert cached[:8].mean() < 40 and cached[-8:].mean() > 215  # not a white page


@pytest.fixture
def cached(tmp_path, synthetic_hands):
    """A copy of a few synthetic hands and their resized cache (32 px)."""
    root = tmp_path / "hands"
    shutil.copytree(synthetic_hands / "Hands", root / "Hands")
    names = sorted(f"Hands/{p.name}" for p in (root / "Hands").iterdir())[:6]
    assert build_cache(root, names, 32, root.parent / "derived") == []
    return root, names


def test_a_replaced_original_is_resized_again(cached, capsys):
    root, names = cached
    Image.new("RGB", (160, 120), (250, 0, 0)).save(root / names[0], "JPEG")
    capsys.readouterr()
    assert build_cache(root, names, 32, root.parent / "derived") == []
    red = np.asarray(Image.open(cache_dir(root.parent / "derived", 32) / names[0]), float).mean(axis=(0, 1))
    assert red[0] > 200 and red[1] < 60  # the copy shows the new picture, not the old hand
    said = capsys.readouterr().out
    assert f"originals changed since they were resized: 1, e.g. {names[0]}; resized again" in said


@pytest.mark.parametrize("damage", ["truncate", "delete", "garble"])
def test_a_damaged_cached_copy_is_made_again_from_its_original(cached, capsys, damage):
    root, names = cached
    copy = cache_dir(root.parent / "derived", 32) / names[1]
    before = copy.read_bytes()
    if damage == "truncate":
        copy.write_bytes(before[: len(before) // 2])
    elif damage == "delete":
        copy.unlink()
    else:  # same size, other bytes, a later time
        copy.write_bytes(before[:200] + bytes(len(before) - 200))
        os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert build_cache(root, names, 32, root.parent / "derived") == []
    assert copy.read_bytes() == before
    Image.open(copy).load()  # decodes whole
    assert f"cached copies changed, damaged or deleted: 1, e.g. {names[1]}; made again" in capsys.readouterr().out


def test_an_up_to_date_cache_is_read_not_written(cached):
    root, names = cached
    folder = cache_dir(root.parent / "derived", 32)
    times = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    assert build_cache(root, names, 32, root.parent / "derived") == []
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == times
