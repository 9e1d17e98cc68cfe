"""Data sources: each reads its folder and splits it; prepare holds every one to the same rules."""

import hashlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from handclip.data.prepare import PrepareSettings, prepare, read_manifest
from handclip.data.readers import ImageRecord
from handclip.data.sources import CaptionCSV, DataSource, ImageFolder, SyntheticHands
from handclip.data.split import split_sizes
from handclip.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def digest(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# --- a Hugging Face image folder ----------------------------------------------------------------


def image_folder(root: Path, layout: str) -> Path:
    """Ten people with four pictures each: in split folders with their own metadata, in split folders
    named by one top-level metadata file, or all in one folder."""
    entries: dict[str, list[dict]] = {}
    for person in range(10):
        for n in range(4):
            split = "test" if person >= 7 else ("validation" if n == 3 and person >= 2 else "train")
            folder = "" if layout == "flat" else f"{split}/"
            name = f"{folder}{person}_{n}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (person * 25, n * 60, 90)).save(root / name)
            where = split if layout == "per_split" else ""
            file_name = name[len(where) + 1 :] if where else name
            entries.setdefault(where, []).append({"file_name": file_name, "text": f"hand {n} of {person}",
                                                  "person": f"id{person}"})  # fmt: skip
    for where, lines in entries.items():
        (root / where / "metadata.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return root


@pytest.mark.parametrize("layout", ["per_split", "top_level"])
def test_an_image_folder_with_split_folders_keeps_its_splits(tmp_path, layout):
    source = ImageFolder(root=str(image_folder(tmp_path, layout)), identity_column="person")
    rows = read_manifest(prepare(PrepareSettings(source, runs=2), quiet=True))
    sizes = split_sizes(rows)
    assert sizes["train"] == (7, 23) and sizes["val"] == (5, 5)  # validation/: held-out images of training people
    assert {r["person"] for r in rows if r["split"] == "query0"} == {"id7", "id8", "id9"}
    assert sizes["gallery0"] == (3, 3) and sizes["query0"] == (3, 9)
    assert {r["caption"] for r in rows if r["image"].endswith("/2_3.png")} == {"hand 3 of 2"}


def test_an_image_folder_without_splits_is_split_by_identity_and_draw(tmp_path):
    source = ImageFolder(root=str(image_folder(tmp_path, "flat")), identity_column="person")
    first = read_manifest(prepare(PrepareSettings(source, draw=0, runs=2), quiet=True))
    other = read_manifest(prepare(PrepareSettings(source, draw=1, runs=2), quiet=True))
    assert split_sizes(first)["val"] == (8, 8) and split_sizes(first)["gallery0"] == (2, 2)
    assert {r["person"] for r in first if r["split"] == "gallery0"} != {
        r["person"] for r in other if r["split"] == "gallery0"
    }


def test_an_image_folder_line_without_the_named_column_is_named(tmp_path):
    root = image_folder(tmp_path, "flat")
    with pytest.raises(
        DataError, match=r"metadata.jsonl line 1: 'identity' is missing or empty \(found columns: file_name, text"
    ):
        ImageFolder(root=str(root), identity_column="identity").read(root)
    (root / "metadata.jsonl").write_text('{"file_name": "../x.png", "text": "out"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl line 1: image path '../x.png' points outside"):
        ImageFolder(root=str(root)).read(root)
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a hand", "identity": 3.0}\n')
    # (it said "missing or empty")
    with pytest.raises(DataError, match=r"line 1: 'identity' is 3.0: give it as text or a whole number"):
        ImageFolder(root=str(root), identity_column="identity").read(root)


# --- every source, held to the same rules -------------------------------------------------------


@dataclass
class Leaky(DataSource):
    """A source whose split puts one image in train and in test: prepare refuses it whatever the source."""

    def read(self, folder):
        return [ImageRecord(f"{p}_{n}.jpg", str(p), "") for p in range(6) for n in range(3)]

    def split(self, records, draw, runs):
        rows = super().split(records, draw, runs)
        test = next(r for r in rows if r["split"].startswith("query"))
        return rows + [{**next(r for r in rows if r["split"] == "train"), "image": test["image"]}]


def test_a_split_that_leaks_test_images_into_training_is_refused_for_any_source(tmp_path):
    with pytest.raises(DataError, match=r"split of .* by Leaky: image \d_\d.jpg is listed under two identities"):
        prepare(settings := PrepareSettings(Leaky(root=str(tmp_path)), runs=1), quiet=True)
    assert not settings.derived.exists() and list(tmp_path.iterdir()) == []


def test_a_source_giving_a_path_outside_its_folder_is_refused(tmp_path):
    @dataclass
    class Escaping(DataSource):
        def read(self, folder):
            return [ImageRecord("../../etc/passwd", "a", "")]

    with pytest.raises(DataError, match="Escaping record: image path '../../etc/passwd' points outside"):
        prepare(PrepareSettings(Escaping(root=str(tmp_path))), quiet=True)


def test_a_caption_csv_in_a_sub_folder_reads_its_images_beside_it(tmp_path):
    from tests.test_prepare import caption_folder

    caption_folder(tmp_path / "meta")
    source = CaptionCSV(root=str(tmp_path), csv="meta/captions.csv")
    rows = read_manifest(prepare(PrepareSettings(source, runs=1, cache_size=32), quiet=True))
    assert rows[0]["image"].startswith("meta/img/") and all((tmp_path / r["image"]).is_file() for r in rows)
    assert source.name != CaptionCSV(root=str(tmp_path)).name  # another file, another manifest


def test_settings_are_checked_with_the_key():
    with pytest.raises(ConfigError, match=r"data.source.identities=2 must be an integer from 4 to 1000"):
        SyntheticHands(root="x", identities=2)
    with pytest.raises(ConfigError, match=r"data.source.aspect='dorsal': choose one of dorsal right"):
        SyntheticHands(root="x", aspect="dorsal")
    with pytest.raises(ConfigError, match=r"data.draw=-1 must be an integer"):
        PrepareSettings(SyntheticHands(root="x"), draw=-1).check()
    for csv in (".", ""):  # a folder, not the caption file (`.` was a traceback: "has an empty name")
        with pytest.raises(ConfigError, match=r"data.source.csv=.* must name a caption file inside data.source.root"):
            CaptionCSV(root="x", csv=csv)
    refused = [
        ({"csv": {"train": "a.csv"}}, "give one file per split as train, test and optionally val (train and test"),
        ({"csv": {"train": "a.csv", "test": "b.csv", "dev": "c.csv"}}, "(not 'dev')"),
        ({"csv": {"train": "a.csv", "test": "a.csv"}}, "names one file for two splits"),
        ({"separator": ";;"}, "data.source.separator=';;' must be one character"),
        ({"image_column": ""}, "data.source.image_column='' must be a column name"),
        ({"caption_column": "image"}, "image_column, caption_column, identity_column and split_column must differ"),
    ]
    for settings, message in refused:
        with pytest.raises(ConfigError, match=re.escape(message)):
            CaptionCSV(root="x", **settings)
    assert CaptionCSV(root="x", separator="tab").separator == "\t"  # as typed on a command line


def test_data_seed_says_it_was_renamed_to_draw(tmp_path):
    from handclip.train.config import check_config
    from tests.test_config import compose_plain

    with pytest.raises(ConfigError, match=r"data.seed was renamed: use data.draw \(it seeds the split"):
        check_config(compose_plain(tmp_path, "experiment=demo", "data.seed=3"))
    with pytest.raises(ConfigError, match=r"data.root was renamed: use data.source.root"):
        check_config(compose_plain(tmp_path, "experiment=demo", "+data.root=/data/11k"))


# --- synthetic hands: one folder per draw and setting ---------------------------------------------


def test_draw_0_of_the_quick_demo_data_is_what_it_always_was(tmp_path):
    # the settings of tests/test_train.py's QUICK runs; these hashes were taken before data sources existed
    source = SyntheticHands(root=str(tmp_path), identities=10, image_size=[96, 72])
    source.make(0)
    path = prepare(PrepareSettings(source, draw=0, runs=2, cache_size=37), quiet=True)
    assert (
        hashlib.sha256(path.read_bytes()).hexdigest()
        == "2883464d367a6364fabcfe1de152ef6de82ee652f3a818176dd399a8eac87faf"
    )
    folder = source.folder(0)
    assert digest((folder / "Hands").iterdir()) == "c442be3678945781c6ed07e625b88091507f111d16863e60eecd9f998335b0bd"


@pytest.mark.slow
def test_draw_0_of_the_demo_data_is_what_it_always_was(tmp_path):
    # conf/data/synthetic.yaml's settings and make demo's cache size (96 px input x 1.15)
    source = SyntheticHands(root=str(tmp_path), identities=64, image_size=[320, 240])
    source.make(0)
    path = prepare(PrepareSettings(source, draw=0, runs=10, cache_size=110), quiet=True)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == (
        "41116c0a756ab80f784ecace2976231e0ed8d8067f61d4832303647f545ef610"
    )
    assert hashlib.sha256((source.folder(0) / "HandInfo.csv").read_bytes()).hexdigest() == (
        "386dc2f9739571d0766590d42fa96255923a74caf08406811b35a24f2a5393d7"
    )


def test_draws_and_settings_never_share_a_folder_and_stay_clear_of_the_pretraining_people(tmp_path):
    from handclip.model.pretrain import FIRST_ID

    folders = {
        SyntheticHands(root=str(tmp_path), identities=i, image_size=s).folder(d)
        for i in (4, 6) for s in ([64, 48], [96, 72]) for d in (0, 1)
    }  # fmt: skip
    assert len(folders) == 8
    people = {}
    for draw in range(3):
        source = SyntheticHands(root=str(tmp_path), identities=4, image_size=[64, 48])
        source.make(draw)
        people[draw] = {r.person for r in source.read(source.folder(draw))}
        assert max(int(p) for p in people[draw]) < FIRST_ID  # ids of the demo's tiny CLIP's corpus start there
    assert people[0] != people[1]  # another draw, other people


def test_processes_on_different_draws_at_once_do_not_collide(tmp_path):
    script = (
        "import sys\n"
        "from handclip.data.prepare import PrepareSettings, prepare\n"
        "from handclip.data.sources import SyntheticHands\n"
        "source = SyntheticHands(root=sys.argv[1], identities=4, image_size=[64, 48])\n"
        "source.make(int(sys.argv[2]))\n"
        "print(prepare(PrepareSettings(source, draw=int(sys.argv[2]), runs=2, cache_size=32), quiet=True))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HANDCLIP_CACHE": str(tmp_path / "cache")}
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "data"), str(d)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for d in (0, 1, 0)]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    manifests = {Path(out.strip().splitlines()[-1]) for out, _ in outputs}
    assert len(manifests) == 2
    for path in manifests:
        info = json.loads(path.with_suffix(".json").read_text())
        assert path.parent.parent.name.startswith(f"4people_64x48_draw{info['settings']['draw']}-")
