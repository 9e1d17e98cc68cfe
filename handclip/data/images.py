"""Opening images safely (any mode to 8-bit RGB) and the resized image cache.

The cache keeps, beside the resized copies (`DERIVED/images/<size>/<image>`, in the dataset's folder of derived
files under the cache, never in the dataset folder), an index of what each was
made from: the original's size and modification time, and the copy's own. Before any use every
entry is checked against the files on disk, so a replaced original is resized again and a damaged
or deleted copy is made again from its original, each with a message; a copy is never trusted on
its name alone.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from handclip.errors import DataError
from handclip.io import atomic_write, waiting_lock, write_text_atomic

BAD_IMAGE_POLICIES = ("skip", "fail")
# a dataset where more than this share of images is unreadable is broken, not noisy
MAX_BAD_SHARE = 0.5
# modes Pillow converts to RGB faithfully; the wide ones (16-bit, 32-bit, float) are scaled first
DIRECT_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
INDEX_VERSION = 1


def _eight_bit(image: Image.Image, path: str | Path) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image scaled to 8 bits over its format's range.

    `convert` would clip instead (a 16-bit PNG turns white, a float TIFF black). 16-bit images
    span 0-65535; 32-bit integer ones are read as 16-bit data (how 16-bit PNGs and PGMs arrive);
    float ones as 0-1 when every value lies there, else as 0-255.
    """
    pixels = np.asarray(image, dtype=np.float64)
    if not np.isfinite(pixels).all():
        raise DataError(f"{path}: float image with NaN or infinite pixels; save it with finite values or as 8-bit")
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if image.mode == "F":
        top = 1.0 if low >= 0 and high <= 1 else 255.0
    else:
        top = 65535.0
    if low < 0 or high > top:
        raise DataError(
            f"{path}: mode {image.mode} pixels span {low:g} to {high:g}, outside 0-{top:g}; "
            "save the image with 8 or 16 bits per channel"
        )
    return Image.fromarray(np.round(pixels * (255.0 / top)).astype(np.uint8), "L")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB (see `to_rgb`)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image), path)


def to_rgb(image: Image.Image, path: str | Path) -> Image.Image:
    """`image` as 8-bit RGB: greyscale, 16-bit, float, CMYK, palette, alpha composed on white. A mode
    that cannot be converted faithfully is refused, naming `path` and the mode."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = _eight_bit(image, path)
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode not in DIRECT_MODES:
        raise DataError(f"{path}: image mode {image.mode} is not supported; save it as RGB, greyscale or RGBA")
    return image.convert("RGB")


def _resize_shortest(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    if scale >= 1:
        return image
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)


def cache_dir(derived: str | Path, size: int) -> Path:
    """The resized copies (shortest edge `size`) in a dataset's folder of derived files (`handclip.data.prepare`)."""
    return Path(derived) / "images" / str(size)


def stamp(path: Path) -> list[int] | None:
    """[size, modification time in ns] of a regular file, or None when there is none (`not_a_file` says why)."""
    try:
        info = os.stat(path)
    except OSError:  # missing, a name too long, a loop of links, no permission
        return None
    return [info.st_size, info.st_mtime_ns] if stat.S_ISREG(info.st_mode) else None


def not_a_file(path: Path) -> str:
    """Why `path` cannot be read as an image file, in words: a pipe is never opened (reading it would wait
    forever), a folder or a broken name is never a traceback."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return f"{path}: listed but not found"
    except OSError as error:
        return f"{path}: cannot be opened ({error.strerror or error})"
    if stat.S_ISDIR(info.st_mode):
        return f"{path}: a folder, not an image file"
    return f"{path}: not a regular file (a pipe, socket or device), so it is not read"


def _cache_one(source: Path, target: Path, size: int) -> str | None:
    """Write one resized copy atomically; return an error message or None."""
    try:
        image = _resize_shortest(load_rgb(source), size)
    except FileNotFoundError:
        return f"{source}: listed but not found"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        # a decompression bomb (more pixels than Pillow allows) is one more image that cannot be used
        return f"{source}: cannot be decoded ({error})"
    with atomic_write(target, "wb", sync=False) as handle:
        image.save(handle, "JPEG", quality=95)
    return None


# why a cached copy is made (again), and what to say about it; new copies need no message
REMAKE = {
    "changed": ("originals changed since they were resized", "resized again"),
    "damaged": ("cached copies changed, damaged or deleted", "made again from their originals"),
    "unrecorded": ("cached copies with no record of the original they were made from", "made again"),
}


class ImageCache:
    """Resized copies (shortest edge `size`) of the images of dataset folder `root`, under `derived/images/<size>/`,
    each recorded in `.index.json` with the original it was made from."""

    def __init__(self, root: str | Path, size: int, derived: str | Path):
        self.root, self.size = Path(root), int(size)
        self.folder = cache_dir(derived, size)
        self.index_path = self.folder / ".index.json"

    def _index(self) -> dict:
        try:
            index = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            return {}
        return index.get("images", {}) if index.get("version") == INDEX_VERSION else {}

    def plan(self, images: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
        """({image: why it must be made}, {image: why it is unusable}) for `images`, from the files on disk."""
        index, todo, bad = self._index(), {}, {}
        for name in sorted(set(images)):
            source, entry = stamp(self.root / name), index.get(name)
            if source is None:
                bad[name] = not_a_file(self.root / name)
            elif entry is None:
                todo[name] = "unrecorded" if (self.folder / name).exists() else "new"
            elif entry.get("source") != source:
                todo[name] = "changed"
            elif "bad" in entry:
                bad[name] = entry["bad"]
            elif stamp(self.folder / name) != entry.get("copy"):
                todo[name] = "damaged"
        return todo, bad

    def build(self, images: Iterable[str], on_bad_image: str = "skip", workers: int = 4) -> list[str]:
        """Make every copy that is missing or out of date; return the images that cannot be used.

        A bad image (missing, zero bytes, truncated, not an image) is skipped with a warning the
        first time it is seen, or stops everything at once with `on_bad_image='fail'`. Runs under
        a lock, so processes preparing the same dataset at once make each copy once.
        """
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise DataError(f"data.on_bad_image={on_bad_image!r}: choose one of {', '.join(BAD_IMAGE_POLICIES)}")
        images = sorted(set(images))
        todo, bad = self.plan(images)
        index = self._index()
        if todo or any(index.get(n) != {"source": stamp(self.root / n), "bad": p} for n, p in bad.items()):
            bad = self._make(images, on_bad_image, workers)
        elif bad and on_bad_image == "fail":
            raise DataError(f"bad image {bad[min(bad)]} (data.on_bad_image=fail; use skip to leave it out)")
        if images and len(bad) > MAX_BAD_SHARE * len(images):
            raise DataError(
                f"{len(bad)} of {len(images)} images under {self.root} are missing or unreadable "
                f"(e.g. {sorted(bad)[0]}): the dataset looks incomplete; re-download or unpack it again"
            )
        return sorted(bad)

    def _make(self, images: list[str], on_bad_image: str, workers: int) -> dict[str, str]:
        from tqdm.auto import tqdm

        self.folder.mkdir(parents=True, exist_ok=True)
        with waiting_lock(self.folder / ".lock"):
            index = self._index()
            todo, bad = self.plan(images)
            if bad and on_bad_image == "fail":
                raise DataError(f"bad image {bad[min(bad)]} (data.on_bad_image=fail; use skip to leave it out)")
            for why, (what, done) in REMAKE.items():
                names = [name for name, reason in todo.items() if reason == why]
                if names:
                    print(f"{self.folder}: {what}: {len(names)}, e.g. {names[0]}; {done}", flush=True)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                jobs = pool.map(lambda name: (name, _cache_one(self.root / name, self.folder / name, self.size)), todo)
                for name, problem in tqdm(jobs, total=len(todo), desc=f"caching images at {self.size}px", leave=False):
                    if problem is None:
                        index[name] = {"source": stamp(self.root / name), "copy": stamp(self.folder / name)}
                    elif on_bad_image == "fail":
                        raise DataError(f"bad image {problem} (data.on_bad_image=fail; use skip to leave it out)")
                    else:
                        bad[name] = problem
            changed = bool(todo)
            for name, problem in sorted(bad.items()):
                entry = {"source": stamp(self.root / name), "bad": problem}
                if index.get(name) != entry:  # a verdict already recorded for this very file was warned about then
                    warnings.warn(f"skipping bad image {problem}", stacklevel=2)
                    index[name], changed = entry, True
            if changed:
                write_text_atomic(self.index_path, json.dumps({"version": INDEX_VERSION, "images": index}))
        return bad


def build_cache(
    root: str | Path,
    images: Iterable[str],
    size: int,
    derived: str | Path,
    on_bad_image: str = "skip",
    workers: int = 4,
) -> list[str]:
    """Resize every image (shortest edge `size`) into `cache_dir(derived, size)`; return the bad ones (see
    `ImageCache`)."""
    return ImageCache(root, size, derived).build(images, on_bad_image, workers)
