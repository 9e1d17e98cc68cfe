"""Readers that turn a dataset folder into one record format (`ImageRecord`).

11k Hands: `Hands/*.jpg` + `HandInfo.csv`. HD: folders `1-501` and `502-712` whose file names
start with the subject number (`12_3.jpg`); subjects 502-712 are distractors. A caption CSV:
`image, caption [, identity, split]`. A Hugging Face image folder: images beside `metadata.jsonl`
(`file_name` and other columns), optionally in `train/`, `validation/` and `test/` sub-folders.
The synthetic generator writes the 11k format, so it goes through `read_11k` like the real data.

Every image path that comes from a dataset's own files is checked with `inside_root`: one that
leaves the dataset folder (`../`, an absolute path, a symlink pointing out) is refused, so nothing
is ever read, or cached, outside it. Every CSV row is checked against its header's width.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from handclip.data.hands import ASPECTS, HANDINFO_COLUMNS, HD_FOLDERS
from handclip.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# the manifest's own columns (handclip.data.split.MANIFEST_COLUMNS) and a caption: a file's column of that name is
# not kept as an attribute
MANIFEST_NAMES = ("image", "identity", "person", "aspect", "split", "caption")
CAPTION_SPLITS = ("train", "val", "test")  # a caption CSV's `split` values; val: held-out images of training identities


@dataclass(frozen=True)
class ImageRecord:
    """One image: its path relative to the dataset root, whose hand it is and what it shows.

    `where` says where the record came from (`captions.csv line 12`), for messages only.
    """

    image: str
    person: str
    aspect: str
    attributes: dict = field(default_factory=dict, hash=False, compare=False)
    where: str = field(default="", compare=False)

    @property
    def identity(self) -> str:
        """Identity label: one person's hand seen from one aspect (aspects never match)."""
        return f"{self.aspect.replace(' ', '_')}/{self.person}" if self.aspect else self.person


def aspect_slug(aspect: str) -> str:
    return aspect.replace(" ", "_")


def inside_root(root: str | Path, name: str, where: str) -> str:
    """`name` as a clean relative path if it stays inside `root` once resolved (symlinks followed).

    `where` names the file and line (or the reader) that gave `name`, for the message.
    """
    root = Path(root)
    path = Path(name)
    if not name or path.is_absolute() or ".." in path.parts:
        raise DataError(f"{where}: image path {name!r} points outside the dataset root {root}; give paths "
                        "relative to the dataset folder, inside it")  # fmt: skip
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(root / path))
    if real != real_root and real_root not in real.parents:
        raise DataError(
            f"{where}: image path {name!r} resolves to {real}, outside the dataset root {real_root} (a symlink "
            "pointing out of it); copy the file in, or link the whole dataset folder instead"
        )
    return path.as_posix()


def check_distinct_files(root: str | Path, records: list[ImageRecord]) -> None:
    """Refuse two image names for one file (a symlink or hard link inside the folder, `a.jpg` beside a link
    `b.jpg -> a.jpg`): by name they are two images, so one picture could train and be tested, or be both query
    and gallery, and the scores would count what the model has seen. Names of missing files are left to the
    reader of the images."""
    root, seen = Path(root), {}
    for record in records:
        try:
            info = os.stat(root / record.image)
        except OSError:
            continue
        first = seen.setdefault((info.st_dev, info.st_ino), record)
        if first.image != record.image:
            raise DataError(
                f"{record.where or record.image}: image {record.image} is the same file as {first.image} "
                f"({first.where or 'an earlier record'}), a link or a second name of one picture; under two names "
                "it can be a training and a test image at once: list it once (a picture shows one identity, on one "
                "side of the split)"
            )


def read_table(
    path: Path, required: tuple[str, ...], hint: str = "", delimiter: str = ","
) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of a UTF-8 CSV file (fields separated by `delimiter`) whose header holds `required`; values
    stripped.

    A row with more or fewer fields than the header is refused by file and line: read as it is,
    its fields would land in the wrong columns without a word.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                other = next((d for d in (",", "\t", ";", "|") if d != delimiter and d in ",".join(header)), None)
                guess = f"; the header holds {other!r}: is that the separator?" if other else ""
                raise DataError(
                    f"{path}: column '{missing[0]}' is missing{hint} (found: {', '.join(header) or 'none'}){guess}"
                )
            rows = []
            start = reader.line_num + 1
            for fields in reader:
                line, start = start, reader.line_num + 1  # a quoted field may span lines
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise DataError(
                        f"{path} line {line}: {len(fields)} fields, but the header has {len(header)} "
                        f"({', '.join(header)}); a field holding the separator {delimiter!r} must be quoted"
                    )
                rows.append((line, {k: v.strip() for k, v in zip(header, fields, strict=True) if k}))
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8, "
            "e.g. iconv -f latin1 -t utf-8"
        ) from None
    except (OSError, csv.Error) as error:
        raise DataError(f"{path} cannot be read: {error}") from None
    return rows


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
    hint = f"; HandInfo.csv needs the columns {', '.join(HANDINFO_COLUMNS)}"
    records = []
    for line, row in read_table(csv_path, HANDINFO_COLUMNS, hint):
        where = f"{csv_path} line {line}"
        # the real file has an id with a trailing space: read_table's strip() tolerates it
        if not re.fullmatch(r"\d+", row["id"]):
            raise DataError(f"{where}: id {row['id']!r} is not a number")
        if row["aspectOfHand"] not in ASPECTS:
            raise DataError(f"{where}: aspectOfHand {row['aspectOfHand']!r} is not one of {', '.join(ASPECTS)}")
        if row["accessories"] not in ("0", "1"):
            raise DataError(f"{where}: accessories {row['accessories']!r} must be 0 or 1")
        if no_accessories and row["accessories"] == "1":
            continue
        attributes = {k: row[k] for k in ("age", "gender", "skinColor", "accessories", "nailPolish", "irregularities")}
        image = inside_root(root, f"Hands/{row['imageName']}", f"{where}, imageName")
        records.append(ImageRecord(image, f"{int(row['id']):07d}", row["aspectOfHand"], attributes, where))
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
        low, high = (int(bound) for bound in folder.name.split("-"))
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            match = re.match(r"(\d+)", path.name)
            if not match:
                raise DataError(f"{path}: HD file names must start with the subject number (e.g. 12_3.jpg)")
            if not low <= int(match.group(1)) <= high:  # its folder says whether it is a distractor: they must agree
                raise DataError(
                    f"{path}: subject {int(match.group(1))} in {folder.name}/, the folder of subjects {low} to {high}; "
                    "move the file to its subject's folder or rename it (a subject's folder decides whether it is "
                    "a distractor)"
                )
            image = inside_root(root, path.relative_to(root).as_posix(), str(path))
            distractor = {"distractor": str(int(folder.name == "502-712"))}
            records.append(ImageRecord(image, f"{int(match.group(1)):04d}", "dorsal", distractor, str(path)))
    return records


@dataclass(frozen=True)
class CaptionColumns:
    """The columns of a caption CSV (as `run_clip.py`'s `--image_column`/`--caption_column` and open_clip's
    `--csv-img-key`/`--csv-caption-key` name them) and its separator. `identity` and `split` are optional: a file
    without them has each image its own identity and a seeded split."""

    image: str = "image"
    caption: str = "caption"
    identity: str = "identity"
    split: str = "split"
    separator: str = ","


def read_caption_csv(
    csv_path: str | Path, root: str | Path | None = None, columns: CaptionColumns = CaptionColumns(),
    split: str = "",
) -> list[ImageRecord]:  # fmt: skip
    """Records of a generic image-caption CSV (any domain), image paths relative to `root`
    (the dataset folder, which holds the CSV; by default the CSV's folder).

    Columns (names as `columns` gives them): the image (path relative to the CSV's folder) and its
    caption, required; the identity (images of one identity are positives of each other; default:
    each image its own) and the split (`train`, `val` or `test`; default: a seeded split by
    identity), optional. `split`: every row's split, for a file that holds one split (train.csv,
    test.csv); a split column in it must agree.
    """
    csv_path = Path(csv_path)
    folder = csv_path.parent.relative_to(root) if root is not None else Path()
    if not csv_path.is_file():
        raise DataError(f"{csv_path} not found: a caption CSV needs the columns {columns.image}, {columns.caption}")
    records = []
    for line, row in read_table(csv_path, (columns.image, columns.caption), delimiter=columns.separator):
        where = f"{csv_path} line {line}"
        image = (folder / inside_root(csv_path.parent, row[columns.image], where)).as_posix()
        own = row.get(columns.split, "")
        if split and own and own != split:
            raise DataError(f"{where}: {columns.split} is {own!r} in the file of the {split} split; leave the column "
                            "out, or make it agree")  # fmt: skip
        identity = row.get(columns.identity, "")
        record = _captioned(image, row[columns.caption], identity, split or own, where)
        mine = set(dataclasses.astuple(columns)[:4]) | set(MANIFEST_NAMES)
        record.attributes.update({k: v for k, v in row.items() if k not in mine and v})  # e.g. a zero-shot column
        records.append(record)
    if not records:
        raise DataError(f"{csv_path} has no rows under its header: nothing to train or test on")
    return records


def _captioned(image: str, caption: str, identity: str, split: str, where: str) -> ImageRecord:
    if split not in ("", *CAPTION_SPLITS):
        raise DataError(f"{where}: split {split!r} must be one of {', '.join(CAPTION_SPLITS)} (or empty)")
    attributes = {"caption": caption, **({"split": split} if split else {})}
    return ImageRecord(image=image, person=identity or image, aspect="", attributes=attributes, where=where)


# a Hugging Face image folder's split folders, as `datasets` names them, and what each is here
IMAGEFOLDER_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val",
                      "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}  # fmt: skip


def read_imagefolder(
    root: str | Path, caption_column: str = "text", identity_column: str | None = None
) -> list[ImageRecord]:
    """Records of a Hugging Face `datasets` image folder (what `load_dataset("imagefolder", data_dir=root)` reads).

    `metadata.jsonl` files, one JSON object a line, name each image by `file_name` (relative to the
    metadata file's folder) and give its caption in `caption_column` and, optionally, its identity
    in `identity_column`. A metadata file in a split folder (`train/`, `validation/`, `test/`; also
    `valid`, `val`, `dev`, `testing`, `eval`, `evaluation`), or a `file_name` that starts with one,
    puts the image in that split: train and test become training and test identities, validation
    images are held-out images of training identities. Without split folders the identities are
    split by seed.
    """
    root = Path(root)
    files = sorted(p for p in root.rglob("metadata.jsonl") if p.is_file())
    if not files:
        raise DataError(
            f"{root}: no metadata.jsonl found; a Hugging Face image folder has images and a metadata.jsonl whose "
            'lines are JSON objects such as {"file_name": "0001.png", "text": "a caption"}'
        )
    records = []
    for path in files:
        for line, entry in _json_lines(path):
            where = f"{path} line {line}"
            for column in ("file_name", caption_column, *([identity_column] if identity_column else [])):
                value = entry.get(column)
                if value is None or str(value).strip() == "":
                    raise DataError(
                        f"{where}: '{column}' is missing or empty (found columns: {', '.join(entry)}); every line "
                        "needs file_name, the caption column and, if one is set, the identity column"
                    )
                if not isinstance(value, (str, int)) or isinstance(value, bool):
                    raise DataError(f"{where}: '{column}' is {json.dumps(value)}: give it as text or a whole number")
            image = inside_root(root, (path.parent.relative_to(root) / str(entry["file_name"])).as_posix(), where)
            parts = Path(image).parts
            split = IMAGEFOLDER_SPLITS.get(parts[0], "") if len(parts) > 1 else ""
            identity = str(entry[identity_column]).strip() if identity_column else ""
            records.append(_captioned(image, str(entry[caption_column]).strip(), identity, split, where))
    return records


def _json_lines(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    except OSError as error:
        raise DataError(f"{path} cannot be read: {error}") from None
    entries = []
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            entry = json.loads(content)
        except ValueError as error:
            raise DataError(f"{path} line {line}: not a JSON object ({error})") from None
        if not isinstance(entry, dict):
            raise DataError(f"{path} line {line}: not a JSON object but {type(entry).__name__}")
        entries.append((line, entry))
    return entries
