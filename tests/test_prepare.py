"""`python -m handclip.data.prepare`: the dataset on disk decides what the manifest says.

Edits after the first run are read again (never an old split file reused by name), nothing is read
or written outside the dataset folder, a split never leaks an image or identity into test, a bad
row is named by file and line, and a folder that cannot be written is one `error:` line, exit 2,
with nothing written. The tests go through the command line, as a user does.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from handclip.data.prepare import derived_folder, main, read_manifest
from handclip.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def prepare(root, *args) -> int:
    """Exit status of `python -m handclip.data.prepare --root ROOT ARGS` (run in this process)."""
    try:
        main(["--root", str(root), "--cache", str(cache_root(root)), "--cache-size", "40", "--runs", "2", *args])
    except SystemExit as exit:
        return int(exit.code)
    return 0


def cache_root(root) -> Path:
    """Where the tests' `prepare` puts what it derives: beside the dataset folder, never in it."""
    return Path(root).parent / "derived"


def derived(root) -> Path:
    """The folder of what is derived from the dataset in `root`."""
    return derived_folder(root, cache_root(root))


def manifest(root) -> list[dict]:
    (path,) = sorted((derived(root) / "splits").glob("*.csv"))  # one setting, one manifest
    return read_manifest(path)


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def hands(tmp_path, synthetic_hands):
    """A private, editable copy of the synthetic 11k folder."""
    root = tmp_path / "hands"
    shutil.copytree(synthetic_hands, root, ignore=shutil.ignore_patterns("cache", "splits"))
    return root


def handinfo(root) -> list[dict]:
    with open(root / "HandInfo.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def write_handinfo(root, rows) -> None:
    with open(root / "HandInfo.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def caption_folder(root, captions=None, identities=None, split=None) -> Path:
    """`root/captions.csv` over 24 small images in `root/img` (8 identities of 3; `identities=False`: no identity
    column)."""
    (root / "img").mkdir(parents=True)
    named = identities is not False
    lines = ["image,caption" + (",identity" if named else "") + (",split" if split else "")]
    for number in range(24):
        name = f"img/{number}.jpg"
        Image.new("RGB", (48, 48), (number * 9 % 255, 120, 80)).save(root / name)
        caption = (captions or {}).get(number, f"a hand number {number}")
        identity = f",{(identities or {}).get(number, f'p{number // 3}')}" if named else ""
        lines.append(f"{name},{caption}{identity}" + (f",{split(number)}" if split else ""))
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root


# --- edits after the first run ----------------------------------------------------------------


def test_an_edited_handinfo_is_read_again_and_the_change_named(hands, capsys):
    assert prepare(hands) == 0
    rows = handinfo(hands)
    plain = [r for r in rows if r["aspectOfHand"] == "dorsal right" and r["accessories"] == "0"]
    training = sorted({int(r["id"]) for r in plain if int(r["id"]) <= 1037})  # below every threshold
    mine = [r for r in plain if int(r["id"]) == training[0]]
    others = training[1:]
    mine[0]["id"] = f"{others[0]:07d}"  # relabelled
    gone = mine[1]["imageName"]
    write_handinfo(hands, [r for r in rows if r["imageName"] != gone])  # a row deleted
    capsys.readouterr()
    assert prepare(hands) == 0
    now = {r["image"]: r for r in manifest(hands)}
    assert f"Hands/{gone}" not in now
    assert now[f"Hands/{mine[0]['imageName']}"]["person"] == f"{others[0]:07d}"
    said = capsys.readouterr().out
    assert "is out of date (HandInfo.csv changed;" in said and "made again" in said


def test_edited_captions_are_read_again(tmp_path, capsys):
    root = caption_folder(tmp_path / "c")
    assert prepare(root, "--format", "csv") == 0
    caption_folder(tmp_path / "d", captions={0: "a left hand with a scar"})
    shutil.copy(tmp_path / "d" / "captions.csv", root / "captions.csv")
    assert prepare(root, "--format", "csv") == 0
    assert {r["caption"] for r in manifest(root) if r["image"] == "img/0.jpg"} == {"a left hand with a scar"}
    assert "captions.csv changed; 1 image listed differently" in capsys.readouterr().out


def test_a_manifest_edited_by_hand_is_made_again(tmp_path):
    root = caption_folder(tmp_path)
    assert prepare(root, "--format", "csv") == 0
    (path,) = (derived(root) / "splits").glob("*.csv")
    good = path.read_text()
    path.write_text(good.replace("a hand number 5", "a hand number 6"))
    assert prepare(root, "--format", "csv") == 0
    assert path.read_text() == good


# --- what the split may not do ------------------------------------------------------------------


def test_an_image_under_two_identities_is_refused(tmp_path, capsys):
    # it would land in training and in test at once, and test Rank-1 and mAP read 100%
    root = caption_folder(tmp_path)
    lines = (root / "captions.csv").read_text().splitlines()
    lines.append("img/4.jpg,the same picture again,p7")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    assert prepare(root, "--format", "csv") == 2
    line = error_line(capsys)
    assert "captions.csv line 26: image img/4.jpg is listed under identity 'p7' here and under 'p1' at " in line
    assert "captions.csv line 6;" in line
    assert not derived(root).exists()


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_one_picture_under_two_names_is_refused(tmp_path, capsys, link):
    # a link inside the folder is a second name for one file: by name, two images, so one picture could be a training
    # and a test image (or query and gallery), and the scores count what the model has seen
    root = caption_folder(tmp_path)
    alias = root / "img" / "alias.jpg"
    alias.symlink_to("4.jpg") if link == "symlink" else os.link(root / "img" / "4.jpg", alias)
    with open(root / "captions.csv", "a") as handle:
        handle.write("img/alias.jpg,someone else,p7\n")
    assert prepare(root, "--format", "csv") == 2
    line = error_line(capsys)
    assert "captions.csv line 26: image img/alias.jpg is the same file as img/4.jpg (" in line and "line 6)" in line
    assert not derived(root).exists()


def test_names_that_are_not_image_files_are_skipped_with_the_reason_never_opened(tmp_path):
    # a pipe would be opened and waited on forever; a loop of links or a name too long was a traceback
    root = caption_folder(tmp_path)
    os.mkfifo(root / "img" / "pipe.jpg")
    (root / "img" / "loop.jpg").symlink_to("loop.jpg")
    (root / "img" / "folder.jpg").mkdir()
    long = "x" * 300 + ".jpg"
    with open(root / "captions.csv", "a") as handle:
        for number, name in enumerate(["pipe.jpg", "loop.jpg", "folder.jpg", long]):
            handle.write(f"img/{name},odd file {number},p{number}\n")
    for cache in ("0", "40"):  # read from the originals, or through the resized cache
        shutil.rmtree(derived(root), ignore_errors=True)
        command = [sys.executable, "-m", "handclip.data.prepare", "--root", str(root), "--format", "csv",
                   "--runs", "2", "--cache-size", cache, "--cache", str(cache_root(root))]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        for why in ("pipe.jpg: not a regular file (a pipe, socket or device)", "folder.jpg: a folder, not an image",
                    "loop.jpg: cannot be opened (Too many levels of symbolic links)",
                    "x.jpg: cannot be opened (File name too long)"):  # fmt: skip
            assert why in done.stderr, (cache, why, done.stderr[-2000:])
        listed = {row["image"] for row in manifest(root)}
        assert "img/0.jpg" in listed and not listed & {"img/pipe.jpg", "img/loop.jpg", "img/folder.jpg"}


def test_a_split_column_is_honoured_with_val_images_and_refused_when_it_mixes_sides(tmp_path, capsys):
    sides = {0: "test", 1: "test", 2: "test"}
    root = caption_folder(
        tmp_path / "a", split=lambda n: "val" if n % 3 == 0 and n >= 9 else sides.get(n // 3, "train")
    )
    assert prepare(root, "--format", "csv") == 0
    rows = manifest(root)
    assert {r["person"] for r in rows if r["split"].startswith("query")} <= {"p0", "p1", "p2"}
    assert {r["image"] for r in rows if r["split"] == "val"} == {f"img/{n}.jpg" for n in (9, 12, 15, 18, 21)}
    root = caption_folder(tmp_path / "b", split=lambda n: "test" if n == 4 else "train")
    assert prepare(root, "--format", "csv") == 2
    assert "identity 'p1' is marked train (" in error_line(capsys)


def prepare_source(source) -> list[dict]:
    from handclip.data.prepare import PrepareSettings
    from handclip.data.prepare import prepare as prepare_settings

    settings = PrepareSettings(source, runs=2, cache_root=Path(source.root).parent / "derived")
    return read_manifest(prepare_settings(settings, quiet=True))


def test_a_caption_file_with_its_own_column_names_and_separator_is_read(tmp_path):
    # as run_clip.py's --image_column/--caption_column and open_clip's --csv-img-key name them
    from handclip.data.sources import CaptionCSV

    root = caption_folder(tmp_path / "data", split=lambda n: "test" if n >= 18 else "train")
    lines = (root / "captions.csv").read_text().splitlines()
    renamed = ["file_name;text;person;subset"] + [line.replace(",", ";") for line in lines[1:]]
    (root / "captions.csv").write_text("\n".join(renamed) + "\n")
    source = CaptionCSV(root=str(root), image_column="file_name", caption_column="text", identity_column="person",
                        split_column="subset", separator=";")  # fmt: skip
    rows = prepare_source(source)
    assert {r["person"] for r in rows if r["split"].startswith("gallery")} == {"p6", "p7"}
    assert {r["caption"] for r in rows if r["image"] == "img/5.jpg"} == {"a hand number 5"}
    with pytest.raises(DataError, match="column 'image' is missing .*the header holds ';': is that the separator"):
        prepare_source(CaptionCSV(root=str(root)))


def test_one_caption_file_per_split_is_read_with_its_split(tmp_path):
    from handclip.data.sources import CaptionCSV

    root = caption_folder(tmp_path / "data")
    header, *lines = (root / "captions.csv").read_text().splitlines()
    parts = {"train": [x for x in lines if int(x.split("/")[1].split(".")[0]) < 15],
             "val": [x for x in lines if 15 <= int(x.split("/")[1].split(".")[0]) < 18 and "p5" in x],
             "test": [x for x in lines if int(x.split("/")[1].split(".")[0]) >= 18]}  # fmt: skip
    for split, chosen in parts.items():
        (root / f"{split}.csv").write_text("\n".join([header, *chosen]) + "\n")
    # p5's images 15-17 are val only: held out of training, no train image of their own -> refused by name
    files = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
    with pytest.raises(DataError, match="identity 'p5' has val images .* but no train images"):
        prepare_source(CaptionCSV(root=str(root), csv=files))
    (root / "val.csv").write_text("\n".join([header, lines[12]]) + "\n")  # image 12, of p4 (train)
    (root / "train.csv").write_text("\n".join([header, *(x for x in parts["train"] if x != lines[12])]) + "\n")
    rows = prepare_source(CaptionCSV(root=str(root), csv=files))
    assert {r["image"] for r in rows if r["split"] == "val"} == {"img/12.jpg"}
    assert {r["person"] for r in rows if r["split"].startswith("gallery")} == {"p6", "p7"}
    (root / "val.csv").write_text(header + "\n")
    with pytest.raises(DataError, match="val.csv has no rows under its header"):
        prepare_source(CaptionCSV(root=str(root), csv=files))
    (root / "val.csv").write_text("\n".join([header, lines[12]]) + "\n")
    marked = [f"{header},split", *(f"{x},test" for x in parts["test"][:-1]), f"{parts['test'][-1]},train"]
    (root / "test.csv").write_text("\n".join(marked) + "\n")
    with pytest.raises(DataError, match="split is 'train' in the file of the test split"):
        prepare_source(CaptionCSV(root=str(root), csv=files))


def test_a_test_split_of_one_identity_is_refused_and_a_small_one_warned(tmp_path):
    # identity = class: 24 images of 4 classes leave 1 test class, and Rank-1 would read 100% whatever the model
    root = caption_folder(tmp_path / "classes", identities={n: f"class{n % 4}" for n in range(24)})
    from handclip.data.sources import CaptionCSV

    with pytest.raises(DataError, match="the test split has 1 identity .* Rank-1 and mAP read 100% whatever the model"):
        prepare_source(CaptionCSV(root=str(root)))
    root = caption_folder(tmp_path / "few")  # 8 people: 2 test identities
    with pytest.warns(UserWarning, match=r"the test split has only 2 identities and 4 queries per run: chance Rank-1"):
        prepare_source(CaptionCSV(root=str(root)))


# --- paths that come from the data --------------------------------------------------------------


def outside(tmp_path) -> Path:
    target = tmp_path / "outside.jpg"
    Image.new("RGB", (160, 120), (9, 9, 9)).save(target)
    return target


def test_a_handinfo_path_leaving_the_folder_is_refused(hands, tmp_path, capsys):
    outside(tmp_path)
    rows = handinfo(hands)
    rows[0]["imageName"] = "../../outside.jpg"
    write_handinfo(hands, rows)
    assert prepare(hands, "--with-accessories") == 2
    assert "HandInfo.csv line 2" in (line := error_line(capsys)) and "points outside the dataset root" in line
    assert not derived(hands).exists()


def test_a_symlink_out_of_the_folder_is_refused(hands, tmp_path, capsys):
    name = handinfo(hands)[3]["imageName"]
    (hands / "Hands" / name).unlink()
    (hands / "Hands" / name).symlink_to(outside(tmp_path))
    assert prepare(hands, "--with-accessories") == 2
    line = error_line(capsys)
    assert f"line 5, imageName: image path 'Hands/{name}' resolves to {tmp_path / 'outside.jpg'}" in line
    assert "outside the dataset root" in line


def test_an_hd_file_linked_out_of_the_folder_is_refused(tmp_path, capsys):
    from tests.test_readers import make_hd

    root = make_hd(tmp_path / "HD")
    (root / "1-501" / "3_0.jpg").symlink_to(outside(tmp_path))
    assert prepare(root, "--format", "hd") == 2
    assert "1-501/3_0.jpg' resolves to" in error_line(capsys)


# --- rows that do not fit their header ----------------------------------------------------------


@pytest.mark.parametrize("change", ["extra", "short"])
def test_a_ragged_handinfo_row_is_named_by_file_and_line(hands, capsys, change):
    lines = (hands / "HandInfo.csv").read_text().splitlines()
    lines[6] = lines[6] + ",left" if change == "extra" else lines[6].rsplit(",", 2)[0]
    (hands / "HandInfo.csv").write_text("\n".join(lines) + "\n")
    assert prepare(hands) == 2
    fields = 10 if change == "extra" else 7
    assert f"HandInfo.csv line 7: {fields} fields, but the header has 9" in error_line(capsys)


def test_an_unquoted_comma_in_a_caption_is_named_not_read_as_the_identity(tmp_path, capsys):
    root = caption_folder(tmp_path, captions={5: "a hand, left"})  # the identity would read ' left'
    assert prepare(root, "--format", "csv") == 2
    assert "captions.csv line 7: 4 fields, but the header has 3" in error_line(capsys)


# --- folders that cannot be written -------------------------------------------------------------


@pytest.mark.parametrize("blocked", ["splits", "images", "images/40"])
def test_a_file_where_a_folder_should_be_is_one_error_and_nothing_is_written(tmp_path, capsys, blocked):
    root = caption_folder(tmp_path / "data")
    (derived(root) / blocked).parent.mkdir(parents=True, exist_ok=True)
    (derived(root) / blocked).write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert prepare(root, "--format", "csv") == 2
    line = error_line(capsys)
    assert f"{derived(root) / blocked} is a file where a folder should be" in line and "Traceback" not in line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (derived(root) / blocked).read_text() == "mine"


def test_a_read_only_dataset_folder_is_prepared_and_never_written(tmp_path):
    """What is derived from a dataset goes under the cache: the dataset folder may be read-only (a shared or mounted
    copy), and nothing is written into it even when it is writable."""
    root = caption_folder(tmp_path / "data" / "captions")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    command = [sys.executable, "-m", "handclip.data.prepare", "--root", str(root), "--format", "csv",
               "--cache", str(tmp_path / "cache")]  # fmt: skip
    if os.geteuid() == 0:  # permissions do not stop root: the folder is mounted read-only instead
        if not shutil.which("unshare"):
            pytest.skip("running as root without unshare: no way to make a folder read-only here")
        mount = f'mount --bind {root} {root} && mount -o remount,ro,bind {root} && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", mount, "sh", *command]
    else:
        root.chmod(0o555)
    try:
        result = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        root.chmod(0o755)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if tmp_path / "cache" not in p.parents
            and p != tmp_path / "cache"} == before  # fmt: skip
    (folder,) = (tmp_path / "cache").iterdir()
    assert folder.name.startswith("captions-")
    assert len(list((folder / "splits").glob("*.csv"))) == 1 and any((folder / "images" / "256").rglob("*.jpg"))


def test_an_up_to_date_dataset_is_only_read(tmp_path):
    root = caption_folder(tmp_path / "c")
    assert prepare(root, "--format", "csv") == 0
    times = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert prepare(root, "--format", "csv") == 0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == times  # read, not written


def test_a_replaced_image_changes_the_content_key_but_not_the_split(hands):
    # the manifest's .json keys what is computed from the images (e.g. stored activations) by their content
    assert prepare(hands) == 0
    (path,) = (derived(hands) / "splits").glob("*.csv")
    text, key = path.read_text(), json.loads(path.with_suffix(".json").read_text())["images_sha256"]
    Image.new("RGB", (160, 120), (250, 0, 0)).save(hands / manifest(hands)[0]["image"], "JPEG")
    assert prepare(hands) == 0
    assert path.read_text() == text and json.loads(path.with_suffix(".json").read_text())["images_sha256"] != key
