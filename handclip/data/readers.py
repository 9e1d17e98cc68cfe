"""Readers that turn a dataset folder into one record format (`ImageRecord`).

11k Hands: `Hands/*.jpg` + `HandInfo.csv`. HD: folders `1-501` and `502-712` whose file names
start with the subject number (`12_3.jpg`); subjects 502-712 are distractors. The synthetic
generator writes the 11k format, so it goes through `read_11k` like the real data.
"""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from handclip.data.hands import ASPECTS, HANDINFO_COLUMNS, HD_FOLDERS
from handclip.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageRecord:
    """One image: its path relative to the dataset root, whose hand it is and what it shows."""

    image: str
    person: str
    aspect: str
    attributes: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def identity(self) -> str:
        """Identity label: one person's hand seen from one aspect (aspects never match)."""
        return f"{self.aspect.replace(' ', '_')}/{self.person}" if self.aspect else self.person


def aspect_slug(aspect: str) -> str:
    return aspect.replace(" ", "_")


def read_11k(root: str | Path, no_accessories: bool = True) -> list[ImageRecord]:
    """Records of an 11k Hands folder; with `no_accessories`, only images without accessories."""
    root = Path(root)
    csv_path = root / "HandInfo.csv"
    if not csv_path.is_file():
        raise DataError(
            f"{csv_path} not found: an 11k Hands folder holds HandInfo.csv and Hands/. "
            "Get the data from the 11k Hands project page, unpack it there, or run the demo "
            "on synthetic hands: python train.py experiment=demo"
        )
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in HANDINFO_COLUMNS if c not in header]
            if missing:
                raise DataError(
                    f"{csv_path}: column '{missing[0]}' is missing; HandInfo.csv needs the columns "
                    f"{', '.join(HANDINFO_COLUMNS)} (found: {', '.join(header) or 'none'})"
                )
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{csv_path} cannot be read: {error}") from None
    records = []
    for line, row in enumerate(rows, start=2):
        # the real file has an id with a trailing space: strip() above tolerates it
        if not re.fullmatch(r"\d+", row["id"]):
            raise DataError(f"{csv_path} line {line}: id {row['id']!r} is not a number")
        if row["aspectOfHand"] not in ASPECTS:
            raise DataError(
                f"{csv_path} line {line}: aspectOfHand {row['aspectOfHand']!r} is not one of {', '.join(ASPECTS)}"
            )
        if row["accessories"] not in ("0", "1"):
            raise DataError(f"{csv_path} line {line}: accessories {row['accessories']!r} must be 0 or 1")
        if no_accessories and row["accessories"] == "1":
            continue
        attributes = {k: row[k] for k in ("age", "gender", "skinColor", "accessories", "nailPolish", "irregularities")}
        records.append(
            ImageRecord(
                image=f"Hands/{row['imageName']}",
                person=f"{int(row['id']):07d}",
                aspect=row["aspectOfHand"],
                attributes=attributes,
            )
        )
    return records


def read_hd(root: str | Path) -> list[ImageRecord]:
    """Records of the HD hand dorsal dataset; `attributes['distractor']` marks subjects 502-712."""
    root = Path(root)
    folders = [root / name for name in HD_FOLDERS]
    if not folders[0].is_dir():
        raise DataError(f"{folders[0]} not found: the HD dataset folder holds '1-501' and '502-712' subfolders")
    records = []
    for folder in folders:
        if not folder.is_dir():
            warnings.warn(f"{folder} not found: HD galleries will have no distractors", stacklevel=2)
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            match = re.match(r"(\d+)", path.name)
            if not match:
                raise DataError(f"{path}: HD file names must start with the subject number (e.g. 12_3.jpg)")
            subject = int(match.group(1))
            records.append(
                ImageRecord(
                    image=str(path.relative_to(root)),
                    person=f"{subject:04d}",
                    aspect="dorsal",
                    attributes={"distractor": str(int(folder.name == "502-712"))},
                )
            )
    return records


def _inside(root: Path, name: str, where: str) -> str:
    path = Path(name)
    if not name or path.is_absolute() or ".." in path.parts:
        raise DataError(f"{where}: image path {name!r} points outside the dataset root {root}")
    return path.as_posix()


def read_caption_csv(csv_path: str | Path) -> list[ImageRecord]:
    """Records of a generic image-caption CSV (any domain).

    Columns: `image` (path relative to the CSV's folder) and `caption`, required; `identity`
    (images of one identity are positives of each other; default: each image its own) and
    `split` (`train` or `test`; default: a seeded split by identity), optional.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path} not found: a caption CSV needs the columns image, caption")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            for column in ("image", "caption"):
                if column not in header:
                    raise DataError(f"{csv_path}: column '{column}' is missing (found: {', '.join(header) or 'none'})")
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError as error:
        raise DataError(
            f"{csv_path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8, "
            "e.g. iconv -f latin1 -t utf-8"
        ) from None
    records = []
    for line, row in enumerate(rows, start=2):
        image = _inside(csv_path.parent, row["image"], f"{csv_path} line {line}")
        split = row.get("split", "")
        if split not in ("", "train", "test"):
            raise DataError(f"{csv_path} line {line}: split {split!r} must be train or test")
        attributes = {"caption": row["caption"]}
        if split:
            attributes["split"] = split
        records.append(ImageRecord(image=image, person=row.get("identity") or image, aspect="", attributes=attributes))
    return records
