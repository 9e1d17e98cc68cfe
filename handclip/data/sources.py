"""Data sources: a dataset format and its split protocol, named in the config by `_target_`.

    data:
      source:
        _target_: handclip.data.sources.Hands11k
        root: ${paths.data}/11k
        aspect: dorsal right
      draw: 0        # which draw of the data: seeds the split (and a synthetic source's people)

A source is a dataclass holding its own settings (checked when it is made) and answering:

- `read(folder)`: the folder's images as `ImageRecord`s (paths relative to `folder`);
- `split(records, draw, runs)`: manifest rows (train, val, queryR, galleryR, ...) seeded by `draw`;
  the default is a split by identity (the records' own `split` attribute where they give one);
- `inputs(folder)`: the files `read` takes its records from; their content keys the manifest;
- `name`: the manifest's file stem, different for any two settings of the source;
- `folder(draw)` and `make(draw)`: where the data of a draw lives, and making it when the source
  generates its data (synthetic hands); other sources read `root` as it is;
- `galleries`: what each evaluation's gallery is, in the data's own words (tables, cards, summaries);
- `prompts()`: the zero-shot prompt tasks its images can be scored on: {task: (manifest column,
  {class value: prompt})} (hands: aspect, gender, skin, ...; a caption CSV: those its user names).

`handclip.data.prepare` does the rest, the same for every source: every image path must stay inside
the folder, no image or identity may sit on both sides of train and test, and the manifest and image
cache are checked against what they were made from. A source of your own is a subclass in any
importable module, named by `data.source._target_` (see tests/test_extension.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handclip.checks import flag, integer, one_of
from handclip.data.hands import ASPECTS
from handclip.data.readers import (
    CaptionColumns,
    ImageRecord,
    aspect_slug,
    inside_root,
    read_11k,
    read_caption_csv,
    read_hd,
    read_imagefolder,
)
from handclip.data.split import split_11k, split_captions, split_hd
from handclip.errors import ConfigError, DataError

KEY = "data.source"


@dataclass
class DataSource:
    """A dataset in a folder: how to read it and how to split it (see the module's docstring)."""

    root: str

    def __post_init__(self):
        if not isinstance(self.root, (str, Path)) or not str(self.root):
            raise ConfigError(f"{KEY}.root={self.root!r} must be the dataset folder")
        self.root = str(self.root)

    # what a source gives --------------------------------------------------------------------
    def read(self, folder: Path) -> list[ImageRecord]:
        raise NotImplementedError(f"{type(self).__name__}.read(folder) must return the folder's ImageRecords")

    def split(self, records: list[ImageRecord], draw: int, runs: int) -> list[dict]:
        """Identities split into train (one val image each) and test (query/gallery runs), seeded by `draw`."""
        return split_captions(records, draw, runs)

    def inputs(self, folder: Path) -> list[Path]:
        """The files the records are read from (a folder listing needs none: the manifest diff shows it)."""
        return []

    def settings(self) -> dict:
        """What the manifest records it was made with: the target and every setting but the folder."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "root"}
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}", **values}

    @property
    def name(self) -> str:
        """The manifest's file stem: the source's kind and a digest of its settings."""
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True, default=str).encode()).hexdigest()
        return f"{_slug(type(self).__name__)}_{digest[:8]}"

    # where the data is ----------------------------------------------------------------------
    def folder(self, draw: int) -> Path:
        """The folder holding draw `draw` of the data."""
        return Path(self.root)

    def make(self, draw: int) -> None:
        """Make the data of draw `draw` where it is made rather than read (nothing here)."""

    @property
    def galleries(self) -> dict[str, str]:
        """{evaluation: what its gallery is}: `test` (queryR against galleryR), and any other the split makes."""
        return {"test": "queries against each run's gallery", "val": "validation"}

    def prompts(self) -> dict[str, tuple[str, dict[str, str]]]:
        """Zero-shot prompt tasks: {task: (manifest column, {class value: prompt})}; none by default."""
        return {}

    def missing(self, draw: int) -> str | None:
        """Why the data cannot be had (one line naming the key), or None."""
        if Path(self.root).exists():
            return None
        return (f"{KEY}.root={self.root} does not exist. Put the dataset there (see data/README.md), point "
                f"{KEY}.root at it, or try the demo on synthetic hands: python train.py experiment=demo")  # fmt: skip


class TemplatePrompts(dict):
    """{class value: prompt} for a template: the named classes, or (with none named) any value asked for."""

    def __init__(self, template: str, classes=None):
        self.template, self.named = template, classes is not None
        super().__init__({str(c): template.replace("{}", str(c)) for c in classes or []})

    def __contains__(self, value) -> bool:
        return super().__contains__(value) or (not self.named and bool(str(value).strip()))

    def __missing__(self, value):
        if self.named:
            raise KeyError(value)
        return self.template.replace("{}", str(value))


def _plain(value: Any) -> Any:
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def _check_zero_shot(tasks: Any, key: str, reserved, error=ConfigError) -> None:
    """Each task names a column of the file (not the image, caption, identity or split) and gives prompts or a
    template with {} where the class goes."""
    example = '{colour: {column: colour, template: "a photo of a {} flower"}}'
    if not isinstance(tasks, dict) or not tasks:
        raise error(f"{key} must map task names to a column and prompts, e.g. {example}")
    for task, spec in tasks.items():
        where = f"{key}.{task}"
        if not isinstance(spec, dict) or not isinstance(spec.get("column"), str) or not spec["column"]:
            raise error(f"{where} must name a column of the caption file (column: ...) and give prompts or a template, "
                        f"e.g. {example}")  # fmt: skip
        if spec["column"] in reserved:
            raise error(f"{where}.column={spec['column']!r} is the file's {spec['column']} column: a zero-shot task "
                        "scores another column (a class per image, e.g. colour or species)")  # fmt: skip
        unknown = sorted(set(spec) - {"column", "prompts", "template", "classes"})
        if unknown:
            raise error(f"{where}.{unknown[0]} is not a setting; a task has column, and prompts or template "
                        "(and classes)")  # fmt: skip
        if ("prompts" in spec) == ("template" in spec):
            raise error(f"{where}: give prompts ({{value: prompt}}) or a template (with {{}} for the class), "
                        "one of them")  # fmt: skip
        if "prompts" in spec and (not isinstance(spec["prompts"], dict) or len(spec["prompts"]) < 2):
            raise error(f"{where}.prompts must map two or more class values to their prompts")
        if "template" in spec and (not isinstance(spec["template"], str) or "{}" not in spec["template"]):
            raise error(f"{where}.template={spec.get('template')!r} must hold {{}} where the class goes")
        classes = spec.get("classes")
        if classes is not None and (not isinstance(classes, list) or len(classes) < 2):
            raise error(f"{where}.classes must list two or more class values (or leave it out: every value a class)")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, default=str).encode()).hexdigest()[:8]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


@dataclass
class Hands11k(DataSource):
    """11k Hands (`HandInfo.csv` + `Hands/`), one aspect split by the published protocol."""

    aspect: str = "dorsal right"
    no_accessories: bool = True  # the protocol keeps images with accessories == 0
    # also train on the other aspects' training identities (unused by the published protocol)
    other_aspects: bool = False

    def __post_init__(self):
        super().__post_init__()
        one_of(f"{KEY}.aspect", self.aspect, ASPECTS)
        flag(f"{KEY}.no_accessories", self.no_accessories)
        flag(f"{KEY}.other_aspects", self.other_aspects)

    @property
    def name(self) -> str:
        extra = ("" if self.no_accessories else "_withacc") + ("_allaspects" if self.other_aspects else "")
        return f"11k_{aspect_slug(self.aspect)}{extra}"

    def inputs(self, folder: Path) -> list[Path]:
        return [folder / "HandInfo.csv"]

    @property
    def galleries(self) -> dict[str, str]:
        return {"test": "same-aspect gallery", "test_all": "gallery merged over aspects", "val": "validation"}

    def prompts(self) -> dict[str, tuple[str, dict[str, str]]]:
        from handclip.eval.zeroshot import HAND_PROMPTS

        return HAND_PROMPTS

    def read(self, folder: Path) -> list[ImageRecord]:
        return read_11k(folder, no_accessories=self.no_accessories)

    def split(self, records: list[ImageRecord], draw: int, runs: int) -> list[dict]:
        return split_11k(records, self.aspect, draw, runs, self.other_aspects)


@dataclass
class SyntheticHands(Hands11k):
    """Procedurally drawn hands in the 11k format (`handclip.data.synthetic`), generated on first use.

    `draw` seeds the people drawn as well as the split; each draw and each setting of `identities`
    and `image_size` has its own folder under `root`, so runs of different draws never touch each
    other's data. The people's ids stay below 11k's largest (1590), far from the ids the demo's tiny
    backbone was pretrained on (`handclip.model.pretrain.FIRST_ID`).
    """

    identities: int = 64
    image_size: tuple[int, int] = (320, 240)  # width, height

    def __post_init__(self):
        super().__post_init__()
        integer(f"{KEY}.identities", self.identities, 4, 1000)
        size = self.image_size
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise ConfigError(f"{KEY}.image_size={size!r} must be [width, height], each at least 32 pixels")
        self.image_size = tuple(integer(f"{KEY}.image_size", v, 32, 10_000) for v in size)

    def folder(self, draw: int) -> Path:
        width, height = self.image_size
        return Path(self.root) / f"{self.identities}people_{width}x{height}_draw{draw}"

    def make(self, draw: int) -> None:
        from handclip.data.synthetic import ensure_synthetic

        ensure_synthetic(self.folder(draw), self.identities, draw, self.image_size)

    def missing(self, draw: int) -> str | None:
        return None  # generated on first use


@dataclass
class HD(DataSource):
    """The HD hand dorsal dataset: folders `1-501` and `502-712`; 502-712 are distractors in every gallery."""

    @property
    def name(self) -> str:
        return "hd"

    @property
    def galleries(self) -> dict[str, str]:
        return {"test": "gallery with the distractor subjects 502-712", "val": "validation"}

    def read(self, folder: Path) -> list[ImageRecord]:
        return read_hd(folder)

    def split(self, records: list[ImageRecord], draw: int, runs: int) -> list[dict]:
        return split_hd(records, draw, runs)


CSV_SPLITS = ("train", "val", "test")  # the keys of `csv` given as one file per split


@dataclass
class CaptionCSV(DataSource):
    """Any image-caption dataset: `root/<csv>` with columns image, caption [, identity, split], or one file per
    split (`csv: {train: train.csv, val: val.csv, test: test.csv}`; val optional). Column names and the
    separator are settings (a tab-separated file: `separator: "\\t"`)."""

    csv: Any = "captions.csv"  # relative to root; or {train: ..., test: ..., val: ...}
    image_column: str = "image"
    caption_column: str = "caption"
    identity_column: str = "identity"  # optional in the file: without it each image is its own identity
    split_column: str = "split"  # optional in the file: without it a seeded split by identity
    separator: str = ","
    # zero-shot prompt tasks: {task: {column: C, prompts: {value: prompt}}} or {task: {column: C, template: "a photo
    # of a {} flower"}} (every value of column C a class, or those in `classes`); or a JSON/YAML file of them in root
    zero_shot: Any = None

    def __post_init__(self):
        super().__post_init__()
        if hasattr(self.csv, "items"):  # a mapping from the config: plain, so the manifest records it as it is
            self.csv = {str(k): v for k, v in self.csv.items()}
        if isinstance(self.separator, str) and self.separator.lower() in ("\\t", "tab"):
            self.separator = "\t"  # as typed on a command line
        files = self.files()
        for split, name in files.items():
            key = f"{KEY}.csv" + (f".{split}" if split else "")
            if not isinstance(name, str) or not Path(name).name:  # `.`, `` or `/`: a folder, not a file
                raise ConfigError(f"{key}={name!r} must name a caption file inside {KEY}.root, e.g. captions.csv")
            inside_root(self.root, str(name), key)  # lexically: no '..', not absolute
        if len(set(files.values())) < len(files):
            raise ConfigError(f"{KEY}.csv names one file for two splits ({self.csv}): give each split its own file")
        for key in ("image_column", "caption_column", "identity_column", "split_column"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise ConfigError(f"{KEY}.{key}={getattr(self, key)!r} must be a column name of the caption file")
        names = [self.image_column, self.caption_column, self.identity_column, self.split_column]
        if len(set(names)) < len(names):
            raise ConfigError(f"{KEY}: image_column, caption_column, identity_column and split_column must differ "
                              f"(given {', '.join(names)})")  # fmt: skip
        if not isinstance(self.separator, str) or len(self.separator) != 1 or self.separator in "\"\r\n":
            raise ConfigError(f"{KEY}.separator={self.separator!r} must be one character such as ',', ';', '|' or "
                              "'\\t' (a tab)")  # fmt: skip
        if hasattr(self.zero_shot, "items"):
            self.zero_shot = _plain(self.zero_shot)
        if self.zero_shot is not None and not isinstance(self.zero_shot, str):
            _check_zero_shot(self.zero_shot, f"{KEY}.zero_shot", names)

    def files(self) -> dict[str, str]:
        """{split: file} for one file per split, {"": file} for one file."""
        if hasattr(self.csv, "items"):
            files = dict(self.csv.items())
            unknown = sorted(set(files) - set(CSV_SPLITS))
            if unknown or "train" not in files or "test" not in files:
                raise ConfigError(
                    f"{KEY}.csv={files}: give one file per split as train, test and optionally val "
                    f"({f'not {unknown[0]!r}' if unknown else 'train and test are needed'})"
                )
            return {split: files[split] for split in CSV_SPLITS if split in files}
        return {"": self.csv}

    def columns(self) -> CaptionColumns:
        return CaptionColumns(self.image_column, self.caption_column, self.identity_column, self.split_column,
                              self.separator)  # fmt: skip

    @property
    def name(self) -> str:
        files = "_".join(Path(name).with_suffix("").as_posix() for name in self.files().values())
        default = self.columns() == CaptionColumns()
        return f"csv_{_slug(files)}" + ("" if default else f"_{_digest(dataclasses.astuple(self.columns()))}")

    def inputs(self, folder: Path) -> list[Path]:
        return [folder / name for name in self.files().values()]

    def read(self, folder: Path) -> list[ImageRecord]:
        records = []
        for split, name in self.files().items():
            inside_root(folder, str(name), f"{KEY}.csv")
            records += read_caption_csv(folder / name, folder, self.columns(), split)
        self._tasks = self._zero_shot_tasks(folder)
        for task, spec in self._tasks.items():
            if not any(r.attributes.get(spec["column"]) for r in records):
                raise DataError(f"{KEY}.zero_shot.{task}: column {spec['column']!r} is not in the caption file, or "
                                "empty in every row")  # fmt: skip
        return records

    def _zero_shot_tasks(self, folder: Path) -> dict:
        if not isinstance(self.zero_shot, str):
            return self.zero_shot or {}
        path = Path(folder) / inside_root(folder, self.zero_shot, f"{KEY}.zero_shot")
        try:
            import yaml

            tasks = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise DataError(f"{KEY}.zero_shot: {path} cannot be read as JSON or YAML: {error}") from None
        _check_zero_shot(tasks, f"{path}", dataclasses.astuple(self.columns())[:4], DataError)
        return tasks

    def prompts(self) -> dict[str, tuple[str, dict[str, str]]]:
        """The user's tasks: explicit prompts, or a template over the classes (named, or every value the data has:
        the prompt for a class value is the template with the value in place of {})."""
        tasks = getattr(self, "_tasks", None)
        if tasks is None:
            tasks = self._zero_shot_tasks(Path(self.root))
        out = {}
        for task, spec in tasks.items():
            if "prompts" in spec:
                out[task] = (spec["column"], {str(k): str(v) for k, v in spec["prompts"].items()})
            else:
                out[task] = (spec["column"], TemplatePrompts(spec["template"], spec.get("classes")))
        return out


@dataclass
class ImageFolder(DataSource):
    """A Hugging Face `datasets` image folder: images and `metadata.jsonl` (`file_name`, a caption column,
    optionally an identity column), optionally in `train/`, `validation/` and `test/` sub-folders."""

    caption_column: str = "text"
    identity_column: str | None = None  # none: each image its own identity

    def __post_init__(self):
        super().__post_init__()
        for key in ("caption_column", "identity_column"):
            value: Any = getattr(self, key)
            if value is None and key == "identity_column":
                continue
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{KEY}.{key}={value!r} must be a column name of metadata.jsonl")

    @property
    def name(self) -> str:
        return "imagefolder_" + _slug(f"{self.caption_column}_{self.identity_column or 'noid'}")

    def inputs(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("metadata.jsonl") if p.is_file())

    def read(self, folder: Path) -> list[ImageRecord]:
        return read_imagefolder(folder, self.caption_column, self.identity_column)
