"""Prepare a dataset for training: read it, cache resized images, write the split manifest.

    python -m handclip.data.prepare --root data/11k --format 11k --aspect "dorsal right"

only reads the dataset folder (it may be read-only or shared). What it derives goes in the dataset's
own folder under the cache (`derived_folder`: `.cache/data/<folder name>-<digest of its path>/`):
`splits/<name>.csv` (one row per image and split) and `<name>.json` (the settings that made it, the
hashes of the files it was read from, the split sizes and any images left out), resized copies
under `images/<size>/`, and the stored activations of `handclip.data.activations`. The source
(`handclip.data.sources`) reads the folder and splits it; everything here is the same for every source.

Nothing derived is trusted by name: every call reads the dataset's files again, splits them, and
compares the manifest on disk with the one they give now; the resized cache checks each copy
against the original it was made from (`handclip.data.images.ImageCache`). A stale manifest or
copy is made again, with a message saying what changed. Reading and splitting take well under a
second even for 11k Hands; only the images that changed are resized again. `train.py` runs this
on every start.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from handclip.checks import integer, one_of
from handclip.data.hands import ASPECTS
from handclip.data.images import BAD_IMAGE_POLICIES, ImageCache, cache_dir, not_a_file, stamp
from handclip.data.readers import check_distinct_files, inside_root
from handclip.data.sources import HD, CaptionCSV, DataSource, Hands11k, ImageFolder
from handclip.data.split import MANIFEST_COLUMNS, check_protocol, check_records, check_test_set, split_sizes
from handclip.errors import ConfigError, DataError, exit_with
from handclip.io import write_json_atomic, write_text_atomic

MANIFEST_VERSION = 2  # 2: keyed by the content of the source's files; `draw` for `seed`


def derived_folder(folder: str | Path, cache_root: str | Path) -> Path:
    """Where the files derived from the dataset in `folder` go: one folder under `cache_root` per dataset folder,
    named by the folder's name and a digest of its full path (links resolved). The dataset folder is only read."""
    real = os.path.realpath(folder)
    digest = hashlib.sha256(real.encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(real).name).strip("-.") or "data"
    return Path(cache_root) / f"{name}-{digest}"


@dataclass(frozen=True)
class PrepareSettings:
    """What a manifest is made from: the source, the draw (seeds the split), the runs, the cache."""

    source: DataSource
    draw: int = 0
    runs: int = 10
    cache_size: int = 0  # 0: no cache, read the originals
    on_bad_image: str = "skip"
    cache_root: str | Path | None = None  # derived files' root (data.cache_root); None: $HANDCLIP_CACHE/data

    def check(self) -> PrepareSettings:
        if not isinstance(self.source, DataSource):
            raise ConfigError(f"data.source={self.source!r} must be a data source: a mapping whose _target_ names a "
                              "handclip.data.sources.DataSource (conf/data/*.yaml name the built-in ones)")  # fmt: skip
        integer("data.draw", self.draw, 0, 2**32 - 1)
        integer("data.runs", self.runs, 1, 100)
        integer("data.cache_size", self.cache_size, 0, 100_000, hint=" (0: no cache, or a size in pixels)")
        one_of("data.on_bad_image", self.on_bad_image, BAD_IMAGE_POLICIES)
        return self

    @property
    def folder(self) -> Path:
        return self.source.folder(self.draw)

    @property
    def derived(self) -> Path:
        """The folder of what is derived from this draw's data: manifests, resized images, stored activations."""
        from handclip.model.backbone import default_cache_dir

        return derived_folder(self.folder, self.cache_root or default_cache_dir() / "data")

    @property
    def image_cache(self) -> Path | None:
        """The folder of the resized copies images are read from, or None (read the originals)."""
        return cache_dir(self.derived, self.cache_size) if self.cache_size else None

    @property
    def name(self) -> str:
        return f"{self.source.name}_draw{self.draw}_runs{self.runs}"

    def as_dict(self) -> dict:
        return {"version": MANIFEST_VERSION, "source": self.source.settings(), "draw": self.draw, "runs": self.runs,
                "cache_size": self.cache_size}  # fmt: skip


def manifest_path(settings: PrepareSettings) -> Path:
    return settings.derived / "splits" / f"{settings.name}.csv"


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


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _manifest_text(rows: list[dict]) -> str:
    columns = MANIFEST_COLUMNS + sorted({k for r in rows for k in r} - set(MANIFEST_COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _by_image(rows: list[dict]) -> dict[str, set]:
    grouped: dict[str, set] = defaultdict(set)
    for row in rows:
        grouped[row["image"]].add(tuple(sorted((k, v) for k, v in row.items() if v not in ("", None))))
    return grouped


def _what_changed(path: Path, old: dict, new: dict, rows: list[dict]) -> str:
    """What differs between the manifest on disk (`old` its .json) and the one the dataset gives now."""
    reasons = []
    if old.get("settings") != new["settings"]:
        reasons.append("made with other settings or by an older HandCLIP")
    old_inputs = old.get("inputs") or {}
    reasons += [f"{name} changed" for name, digest in new["inputs"].items() if old_inputs.get(name) != digest]
    try:
        before = _by_image(read_manifest(path))
    except (OSError, DataError, csv.Error):
        before = {}
    now = _by_image(rows)
    for what, names in (
        ("new", sorted(set(now) - set(before))),
        ("gone", sorted(set(before) - set(now))),
        ("listed differently (identity, split, caption or attributes)",
         sorted(n for n in set(now) & set(before) if now[n] != before[n])),
    ):  # fmt: skip
        if names:
            reasons.append(f"{len(names)} image{'s' if len(names) > 1 else ''} {what}, e.g. {names[0]}")
    unreadable = sorted(set(new["bad_images"]) - set(old.get("bad_images") or []))
    if unreadable:
        reasons.append(f"{len(unreadable)} images unreadable now, e.g. {unreadable[0]}")
    return "; ".join(reasons) or "it differs from what the dataset gives (edited by hand?)"


def _writable(folder: Path, what: str) -> None:
    """Refuse before anything is written when `folder` cannot be made or written."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise DataError(f"{probe} is a file where a folder should be: {what} go in {folder}; move the file away")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DataError(f"{probe} is not writable: {what} go in {folder}; make it writable, or copy the "
                        "dataset to a folder you can write")  # fmt: skip


def prepare(settings: PrepareSettings, quiet: bool = False) -> Path:
    """Make sure the manifest (and image cache) for `settings` match the dataset; return the manifest path.

    `quiet` leaves out the summary of a newly written manifest; what was stale is always said.
    """
    settings.check()
    source, folder = settings.source, settings.folder
    if not folder.is_dir():
        why = source.missing(settings.draw) or "point data.source.root at the dataset"
        raise DataError(f"{folder} is not a folder: {why}")
    path = manifest_path(settings)
    records = source.read(folder)
    for record in records:  # whichever source read them: nothing is read or cached outside the folder
        inside_root(folder, record.image, record.where or f"{type(source).__name__} record")
    check_records(records)
    check_distinct_files(folder, records)
    rows = source.split(records, settings.draw, settings.runs)
    check_protocol(rows, f"the split of {folder} by {type(source).__name__}")
    check_test_set(rows, f"the split of {folder} by {type(source).__name__}")
    images = sorted({r["image"] for r in rows})
    cache = ImageCache(folder, settings.cache_size, settings.derived) if settings.cache_size else None
    todo, bad = cache.plan(images) if cache else ({}, {n: not_a_file(folder / n) for n in images
                                                       if stamp(folder / n) is None})  # fmt: skip
    inputs = {p.relative_to(folder).as_posix(): _sha256(p) for p in source.inputs(folder)}
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            old = {}
    if todo or old.get("inputs") != inputs or old.get("settings") != settings.as_dict() or not path.is_file():
        _writable(path.parent, "split manifests")
        if cache:
            _writable(cache.folder, "resized images")
    try:
        if cache:
            bad = dict.fromkeys(cache.build(images, settings.on_bad_image), "")
        elif bad and settings.on_bad_image == "fail":
            raise DataError(f"bad image {bad[min(bad)]} (data.on_bad_image=fail; use skip to leave it out)")
        else:
            for name in sorted(set(bad) - set(old.get("bad_images") or [])):  # said once, as the cache says it
                warnings.warn(f"skipping bad image {bad[name]}", stacklevel=2)
        rows = [r for r in rows if r["image"] not in bad]
        text = _manifest_text(rows)
        stamps = [[name, stamp(folder / name)] for name in sorted({r["image"] for r in rows})]
        sizes = split_sizes(rows)
        info = {
            "settings": settings.as_dict(),
            "inputs": inputs,
            "manifest_sha256": hashlib.sha256(text.encode()).hexdigest(),
            # the images as they are now (size, modification time): what anything made from them is keyed by
            "images_sha256": hashlib.sha256(json.dumps(stamps).encode()).hexdigest(),
            "sizes": {k: {"identities": v[0], "images": v[1]} for k, v in sorted(sizes.items())},
            "bad_images": sorted(bad),
        }
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text and old == info:
            return path
        _writable(path.parent, "split manifests")
        if current is not None and current != text:
            print(f"{path} is out of date ({_what_changed(path, old, info, rows)}): made again", flush=True)
        write_text_atomic(path, text)
        write_json_atomic(path.with_suffix(".json"), info)
    except OSError as error:
        raise DataError(f"cannot write {error.filename or folder}: {error.strerror or error}") from None
    if not quiet and current != text:
        if "test" in sizes:  # the retrieval protocol: a split by image
            shown = {k: sizes[k] for k in ("train", "val", "test") if k in sizes}
            print(f"prepared {path}: " + ", ".join(f"{k} {v[1]} images" for k, v in shown.items())
                  + "; no identity has two images, so validation and test score caption → image retrieval (R@k)")
        else:
            shown = {k: v for k, v in sorted(sizes.items())
                     if k in ("train", "val", "query0", "gallery0", "gallery_all0")}  # fmt: skip
            print(f"prepared {path}: " + ", ".join(f"{k} {v[0]} ids/{v[1]} images" for k, v in shown.items()))
    return path


# the sources the command line knows by a short name (any other: a config's data.source._target_)
FORMATS = {"11k": Hands11k, "hd": HD, "csv": CaptionCSV, "imagefolder": ImageFolder}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--format", choices=list(FORMATS), default="11k")
    parser.add_argument("--aspect", choices=ASPECTS, default="dorsal right", help="11k: the aspect split")
    parser.add_argument("--with-accessories", action="store_true", help="11k: keep images with accessories")
    parser.add_argument("--csv", default="captions.csv", help="csv: the caption file, relative to --root")
    parser.add_argument("--caption-column", default="text", help="imagefolder: metadata.jsonl's caption column")
    parser.add_argument("--identity-column", default=None, help="imagefolder: metadata.jsonl's identity column")
    parser.add_argument("--draw", type=int, default=0, help="which draw of the split (seeds it)")
    parser.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cache-size", type=int, default=256, help="shortest edge of cached copies; 0 = none")
    parser.add_argument(
        "--cache",
        default=".cache/data",
        help="where derived files go (train.py: paths.cache/data); the dataset folder is only read",
    )
    parser.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES, default="skip")
    args = parser.parse_args(argv)
    if args.seed is not None:
        parser.error("--seed was renamed to --draw (it seeds the split)")
    source_settings = {
        "11k": {"aspect": args.aspect, "no_accessories": not args.with_accessories},
        "csv": {"csv": args.csv},
        "imagefolder": {"caption_column": args.caption_column, "identity_column": args.identity_column},
    }.get(args.format, {})
    try:
        source = FORMATS[args.format](root=args.root, **source_settings)
        prepare(PrepareSettings(source, args.draw, args.runs, args.cache_size, args.on_bad_image, args.cache))
    except (DataError, ConfigError) as error:
        exit_with(error)


if __name__ == "__main__":
    main()
