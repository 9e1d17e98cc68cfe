import pytest
from PIL import Image

from handclip.data.prepare import PrepareSettings, prepare, read_manifest
from handclip.data.readers import read_11k, read_caption_csv, read_hd
from handclip.data.sources import CaptionCSV
from handclip.data.split import split_hd, split_sizes
from handclip.errors import DataError


def make_hd(root, train=(1, 2, 447, 448, 460), distractors=(502, 600)):
    for folder, subjects in (("1-501", train), ("502-712", distractors)):
        (root / folder).mkdir(parents=True)
        for s in subjects:
            for n in range(3):
                Image.new("RGB", (40, 30), (s % 255, n * 40, 90)).save(root / folder / f"{s}_{n}.jpg")
    return root


def test_hd_split_puts_distractors_in_every_gallery(tmp_path):
    records = read_hd(make_hd(tmp_path))
    rows = split_hd(records, draw=0, runs=3)
    sizes = split_sizes(rows)
    assert sizes["train"][0] == 3 and sizes["val"] == (3, 3)  # subjects 1, 2, 447
    for run in range(3):
        gallery = [r for r in rows if r["split"] == f"gallery{run}"]
        persons = {r["person"] for r in gallery}
        assert persons == {"0448", "0460", "0502", "0600"}
        assert sum(r["person"] == "0502" for r in gallery) == 3  # every distractor image
        assert not {r["person"] for r in rows if r["split"] == f"query{run}"} & {"0502", "0600"}


def test_11k_reader_tolerates_the_malformed_id_and_names_bad_rows(tmp_path):
    header = "id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,irregularities\n"
    (tmp_path / "HandInfo.csv").write_text(header + "0000012 ,20,male,fair,0,0,dorsal right,Hand_0000001.jpg,0\n")
    (record,) = read_11k(tmp_path)
    assert record.person == "0000012" and record.identity == "dorsal_right/0000012"
    (tmp_path / "HandInfo.csv").write_text(header + "12,20,male,fair,0,0,dorsal centre,Hand_0000001.jpg,0\n")
    with pytest.raises(DataError, match="line 2: aspectOfHand 'dorsal centre' is not one of"):
        read_11k(tmp_path)


def test_caption_csv_dataset_goes_through_prepare(tmp_path):
    (tmp_path / "img").mkdir()
    lines = ["image,caption,identity"]
    for identity in range(10):
        for n in range(3):
            name = f"img/{identity}_{n}.png"
            Image.new("RGB", (48, 40), (identity * 20, n * 50, 100)).save(tmp_path / name)
            lines.append(f"{name},a red object number {identity},obj{identity}")
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    assert len(read_caption_csv(tmp_path / "captions.csv")) == 30
    path = prepare(PrepareSettings(CaptionCSV(root=str(tmp_path)), cache_size=32, runs=2), quiet=True)
    rows = read_manifest(path)
    sizes = split_sizes(rows)
    assert sizes["val"][0] == 8 and sizes["gallery0"] == (2, 2) and sizes["query0"] == (2, 4)
    assert rows[0]["caption"].startswith("a red object number")


def test_caption_csv_paths_may_not_leave_the_root(tmp_path):
    (tmp_path / "captions.csv").write_text("image,caption\n../secret.jpg,x\n")
    with pytest.raises(DataError, match="points outside the dataset root"):
        read_caption_csv(tmp_path / "captions.csv")


@pytest.mark.parametrize("folder, subject", [("502-712", 460), ("1-501", 650), ("502-712", 2)])
def test_an_hd_subject_outside_its_folders_range_is_refused(tmp_path, folder, subject):
    # its folder says whether it is a distractor; a test subject's picture in 502-712 was a second gallery match
    # labelled as that subject in every run, a subject 650 in 1-501 a test identity
    root = make_hd(tmp_path)
    Image.new("RGB", (40, 30), (9, 9, 9)).save(root / folder / f"{subject}_7.jpg")
    with pytest.raises(DataError, match=rf"{folder}/{subject}_7.jpg: subject {subject} in {folder}/, the folder of "
                                        r"subjects \d+ to \d+; move the file"):  # fmt: skip
        read_hd(root)
