import csv
import hashlib

import numpy as np
from PIL import Image

from handclip.data.readers import HANDINFO_COLUMNS, read_11k
from handclip.data.synthetic import ASPECTS, generate_hands, main


def digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate_hands(tmp_path / "a", identities=3, seed=5, image_size=(96, 72))
    generate_hands(tmp_path / "b", identities=3, seed=5, image_size=(96, 72))
    generate_hands(tmp_path / "c", identities=3, seed=6, image_size=(96, 72))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_writes_the_exact_11k_format(synthetic_hands):
    with open(synthetic_hands / "HandInfo.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(HANDINFO_COLUMNS)
    assert {r["aspectOfHand"] for r in rows} == set(ASPECTS)
    assert all(len(r["id"]) == 7 and r["id"].isdigit() for r in rows)
    assert all(r["imageName"].startswith("Hand_") and r["imageName"].endswith(".jpg") for r in rows)
    assert {r["accessories"] for r in rows} <= {"0", "1"}
    assert {r["skinColor"] for r in rows} <= {"very fair", "fair", "medium", "dark"}
    image = Image.open(synthetic_hands / "Hands" / rows[0]["imageName"])
    assert image.format == "JPEG" and image.size == (160, 120) and image.mode == "RGB"
    # half the identities fall below every split threshold, half above
    ids = sorted({int(r["id"]) for r in rows})
    assert sum(i <= 1037 for i in ids) == 6 and sum(i > 1051 for i in ids) == 6


def test_the_11k_reader_reads_it(synthetic_hands):
    records = read_11k(synthetic_hands, no_accessories=False)
    with open(synthetic_hands / "HandInfo.csv", newline="") as handle:
        assert len(records) == sum(1 for _ in handle) - 1
    filtered = read_11k(synthetic_hands)
    assert all(r.attributes["accessories"] == "0" for r in filtered)
    assert all((synthetic_hands / r.image).is_file() for r in records)


def test_left_and_right_are_mirror_images(tmp_path):
    # a dorsal right hand has its thumb on the left, so its skin's centre of mass leans left
    generate_hands(tmp_path, identities=2, seed=1, image_size=(160, 120))
    rows = list(csv.DictReader(open(tmp_path / "HandInfo.csv")))

    def skin_balance(aspect):
        values = []
        for row in rows:
            if row["aspectOfHand"] == aspect:
                pixels = np.asarray(Image.open(tmp_path / "Hands" / row["imageName"]), float)
                background = np.median(pixels[:8].reshape(-1, 3), axis=0)
                skin = np.abs(pixels - background).sum(axis=2) > 40
                columns = np.nonzero(skin)[1]
                values.append(columns.mean() - 80)  # centre of mass left (<0) or right (>0) of middle
        return np.mean(values)

    assert skin_balance("dorsal right") < 0 < skin_balance("dorsal left")
    assert skin_balance("palmar right") > 0 > skin_balance("palmar left")


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path / "x"), "--identities", "2", "--seed", "0", "--image-size", "64x48"])
    assert (tmp_path / "x" / "HandInfo.csv").is_file()
    assert "wrote" in capsys.readouterr().out


def test_the_command_line_also_writes_a_caption_dataset_that_trains_as_ones_own(tmp_path, capsys):
    from handclip.data.prepare import PrepareSettings, prepare
    from handclip.data.prepare import read_manifest as read
    from handclip.data.sources import CaptionCSV

    main(["--out", str(tmp_path / "x"), "--identities", "6", "--image-size", "64x48", "--captions"])
    assert "captions.csv" in capsys.readouterr().out
    source = CaptionCSV(root=str(tmp_path / "x"), zero_shot={"skin": {"column": "skin", "template": "a {} hand"}})
    records = source.read(tmp_path / "x")
    assert {r.identity.split("_", 1)[1] for r in records} == {"dorsal_right", "dorsal_left", "palmar_right",
                                                              "palmar_left"}  # one identity per person and aspect
    assert all(r.attributes["caption"].startswith("a photo of the ") and r.attributes["skin"] for r in records)
    rows = read(prepare(PrepareSettings(source, runs=2, cache_root=tmp_path / "cache"), quiet=True))
    assert {r["split"] for r in rows} >= {"train", "val", "query0", "gallery0"}


def test_a_generated_folder_is_made_anew_when_its_settings_change(tmp_path, capsys):
    from handclip.data.synthetic import ensure_synthetic

    root = tmp_path / "hands"
    ensure_synthetic(root, identities=4, seed=0, image_size=[64, 48])
    first = {p.name for p in (root / "Hands").iterdir()}
    ensure_synthetic(root, identities=4, seed=0, image_size=[64, 48])  # same settings: kept as is
    assert "making them anew" not in capsys.readouterr().out
    ensure_synthetic(root, identities=6, seed=0, image_size=[64, 48])
    assert "making them anew" in capsys.readouterr().out
    people = {r["id"] for r in csv.DictReader(open(root / "HandInfo.csv"))}
    assert len(people) == 6 and {p.name for p in (root / "Hands").iterdir()} != first
    assert not list(tmp_path.glob("hands.tmp*"))


def test_a_killed_generators_leftovers_are_cleaned_and_a_foreign_folder_is_left_alone(tmp_path):
    from handclip.data.synthetic import ensure_synthetic

    leftover = tmp_path / "hands.tmp999999999"  # no such process
    (leftover / "Hands").mkdir(parents=True)
    ensure_synthetic(tmp_path / "hands", identities=4, seed=0, image_size=[64, 48])
    assert not leftover.exists() and (tmp_path / "hands" / "HandInfo.csv").is_file()
    foreign = tmp_path / "mine"
    (foreign / "Hands").mkdir(parents=True)
    (foreign / "HandInfo.csv").write_text("id\n")
    ensure_synthetic(foreign, identities=4, seed=0, image_size=[64, 48])
    assert (foreign / "HandInfo.csv").read_text() == "id\n"


def test_two_first_runs_at_once_generate_the_dataset_once(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys; from handclip.data.synthetic import ensure_synthetic\n"
        "ensure_synthetic(sys.argv[1], identities=4, seed=0, image_size=[64, 48])\n"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "hands")], stderr=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert sum("generating synthetic hands" in out for out, _ in outputs) == 1
    assert not list(tmp_path.glob("hands.tmp*"))
