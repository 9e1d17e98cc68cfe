"""Prepare a dataset for training: read it, cache resized images, write the split manifest.

    python -m handclip.data.prepare --root data/11k --format 11k --aspect "dorsal right"

writes `ROOT/splits/<name>.csv` (one row per image and split) and `<name>.json` (the settings
that made it, the split sizes and any images left out), and resized copies under
`ROOT/cache/<size>/`. The same settings give the same manifest; it is rebuilt only when they
change. `train.py` runs this automatically when the manifest is missing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from handclip.data.hands import ASPECTS
from handclip.data.images import build_cache
from handclip.data.readers import aspect_slug, read_11k, read_caption_csv, read_hd
from handclip.data.split import MANIFEST_COLUMNS, split_11k, split_captions, split_hd, split_sizes
from handclip.errors import ConfigError, DataError, exit_with
from handclip.io import write_text_atomic

FORMATS = ("11k", "hd", "csv")
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PrepareSettings:
    root: str
    format: str = "11k"
    csv: str = "captions.csv"  # format csv: the caption file, relative to root
    aspect: str = "dorsal right"
    seed: int = 0
    runs: int = 10
    no_accessories: bool = True
    cache_size: int = 0  # 0: no cache, read the originals
    on_bad_image: str = "skip"

    def check(self) -> PrepareSettings:
        if self.format not in FORMATS:
            raise ConfigError(f"data.format={self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.format == "11k" and self.aspect not in ASPECTS:
            raise ConfigError(f"data.aspect={self.aspect!r}: choose one of {', '.join(ASPECTS)}")
        if not 1 <= int(self.runs) <= 100:
            raise ConfigError(f"data.runs={self.runs!r} must be an integer from 1 to 100")
        if int(self.cache_size) < 0:
            raise ConfigError(f"data.cache_size={self.cache_size!r} must be 0 (no cache) or a size in pixels")
        return self

    @property
    def name(self) -> str:
        what = {"hd": "hd", "csv": f"csv_{Path(self.csv).stem}"}.get(self.format, f"11k_{aspect_slug(self.aspect)}")
        return f"{what}_seed{self.seed}_runs{self.runs}{'' if self.no_accessories else '_withacc'}"

    def as_dict(self) -> dict:
        settings = dict(self.__dict__)
        settings.pop("root")
        settings.pop("on_bad_image")
        if self.format != "csv":
            settings.pop("csv")
        return {"version": MANIFEST_VERSION, **settings}


def manifest_path(settings: PrepareSettings) -> Path:
    return Path(settings.root) / "splits" / f"{settings.name}.csv"


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a manifest CSV; paths that leave the dataset root are refused."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: manifest column '{missing[0]}' is missing (needs {', '.join(MANIFEST_COLUMNS)})")
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        image = Path(row["image"])
        if image.is_absolute() or ".." in image.parts:
            raise DataError(f"{path} line {line}: image path {row['image']!r} points outside the dataset root")
    return rows


def prepare(settings: PrepareSettings, quiet: bool = False) -> Path:
    """Make sure the manifest (and image cache) for `settings` exist; return the manifest path."""
    settings.check()
    path = manifest_path(settings)
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings.as_dict() and info.get("cache_ready", {}).get(str(settings.cache_size)):
            return path
    root = Path(settings.root)
    if settings.format == "11k":
        records = read_11k(root, no_accessories=settings.no_accessories)
        rows = split_11k(records, settings.aspect, settings.seed, settings.runs)
    elif settings.format == "hd":
        records = read_hd(root)
        rows = split_hd(records, settings.seed, settings.runs)
    else:
        records = read_caption_csv(root / settings.csv)
        rows = split_captions(records, settings.seed, settings.runs)
    bad: list[str] = []
    if settings.cache_size:
        bad = build_cache(root, {r["image"] for r in rows}, settings.cache_size, settings.on_bad_image)
    else:
        missing = sorted({r["image"] for r in rows if not (root / r["image"]).is_file()})
        if missing and settings.on_bad_image == "fail":
            raise DataError(f"bad image {root / missing[0]}: listed but not found (data.on_bad_image=fail)")
        bad = missing
    if bad:
        bad_set = set(bad)
        rows = [r for r in rows if r["image"] not in bad_set]
    columns = MANIFEST_COLUMNS + sorted({k for r in rows for k in r} - set(MANIFEST_COLUMNS))
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
    sizes = split_sizes(rows)
    info = {
        "settings": settings.as_dict(),
        "sizes": {k: {"identities": v[0], "images": v[1]} for k, v in sorted(sizes.items())},
        "bad_images": bad,
        "cache_ready": {str(settings.cache_size): True},
    }
    write_text_atomic(info_path, json.dumps(info, indent=2))
    if not quiet:
        shown = {k: v for k, v in sorted(sizes.items()) if k in ("train", "val", "query0", "gallery0", "gallery_all0")}
        print(f"prepared {path}: " + ", ".join(f"{k} {v[0]} ids/{v[1]} images" for k, v in shown.items()))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--format", choices=FORMATS, default="11k")
    parser.add_argument("--aspect", choices=ASPECTS, default="dorsal right")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--with-accessories", action="store_true", help="keep images with accessories")
    parser.add_argument("--cache-size", type=int, default=256, help="shortest edge of cached copies; 0 = none")
    parser.add_argument("--on-bad-image", choices=("skip", "fail"), default="skip")
    args = parser.parse_args(argv)
    settings = PrepareSettings(
        root=args.root, format=args.format, aspect=args.aspect, seed=args.seed, runs=args.runs,
        no_accessories=not args.with_accessories, cache_size=args.cache_size, on_bad_image=args.on_bad_image,
    )  # fmt: skip
    try:
        prepare(settings)
    except (DataError, ConfigError) as error:
        exit_with(error)


if __name__ == "__main__":
    main()
