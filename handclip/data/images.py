"""Opening images safely (any mode to RGB) and the resized image cache."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from handclip.errors import DataError
from handclip.io import atomic_write

BAD_IMAGE_POLICIES = ("skip", "fail")
# a dataset where more than this share of images is unreadable is broken, not noisy
MAX_BAD_SHARE = 0.5


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully and return it as RGB (greyscale, CMYK, palette, alpha on white)."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return image.convert("RGB")


def _resize_shortest(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    if scale >= 1:
        return image
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)


def cache_dir(root: str | Path, size: int) -> Path:
    return Path(root) / "cache" / str(size)


def _cache_one(source: Path, target: Path, size: int) -> str | None:
    """Write one resized copy atomically; return an error message or None."""
    if target.is_file() and target.stat().st_size > 0:
        return None
    try:
        image = _resize_shortest(load_rgb(source), size)
    except FileNotFoundError:
        return f"{source}: listed but not found"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        # a decompression bomb (more pixels than Pillow allows) is one more image that cannot be used
        return f"{source}: cannot be decoded ({error})"
    # an empty file (a crash before the data reached the disk) counts as missing next time
    with atomic_write(target, "wb", sync=False) as handle:
        image.save(handle, "JPEG", quality=95)
    return None


def build_cache(
    root: str | Path, images: Iterable[str], size: int, on_bad_image: str = "skip", workers: int = 4
) -> list[str]:
    """Resize every image (shortest edge `size`) into `root/cache/size`; return the bad ones.

    A bad image (missing, zero bytes, truncated, not an image) is skipped with a warning, or
    stops everything at once with `on_bad_image='fail'`.
    """
    from tqdm.auto import tqdm

    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise DataError(f"data.on_bad_image={on_bad_image!r}: choose one of {', '.join(BAD_IMAGE_POLICIES)}")
    root, out = Path(root), cache_dir(root, size)
    images = sorted(set(images))
    bad: list[str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(lambda name: (name, _cache_one(root / name, out / name, size)), images)
        for name, problem in tqdm(jobs, total=len(images), desc=f"caching images at {size}px", leave=False):
            if problem is None:
                continue
            if on_bad_image == "fail":
                raise DataError(f"bad image {problem} (data.on_bad_image=fail; use skip to leave it out)")
            warnings.warn(f"skipping bad image {problem}", stacklevel=2)
            bad.append(name)
    if images and len(bad) > MAX_BAD_SHARE * len(images):
        raise DataError(
            f"{len(bad)} of {len(images)} images under {root} are missing or unreadable (e.g. {bad[0]}): "
            "the dataset looks incomplete; re-download or unpack it again"
        )
    return bad
