import json
from collections import Counter, defaultdict

import pytest

from handclip.data.prepare import PrepareSettings, prepare, read_manifest
from handclip.data.readers import read_11k
from handclip.data.sources import Hands11k
from handclip.data.split import THRESHOLDS_11K, split_11k, split_sizes
from handclip.data.synthetic import generate_hands

# DESIGN.md section 6: (identities, images) of train, val and test per aspect on the real data
REAL = {
    "dorsal right": ((72, 890), (72, 72), (71, 1042)),
    "dorsal left": ((73, 735), (73, 73), (73, 1061)),
    "palmar right": ((72, 905), (72, 72), (71, 988)),
    "palmar left": ((76, 928), (76, 76), (75, 1023)),
}


def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@pytest.fixture(scope="module")
def real_sized_hands(tmp_path_factory):
    """A synthetic folder with the real per-aspect identity and image counts (tiny images)."""
    plan = {}
    for aspect, ((train_ids, train_images), (_, val_images), (test_ids, test_images)) in REAL.items():
        threshold = THRESHOLDS_11K[aspect]
        train = list(range(threshold - train_ids + 1, threshold + 1))
        test = list(range(1100, 1100 + test_ids))
        counts = _spread(train_images + val_images, train_ids) + _spread(test_images, test_ids)
        plan[aspect] = list(zip(train + test, counts, strict=True))
    root = tmp_path_factory.mktemp("real_sized")
    generate_hands(root, seed=0, image_size=(32, 24), plan=plan)
    return root


@pytest.mark.parametrize("aspect", list(REAL))
def test_split_sizes_equal_the_published_table(real_sized_hands, aspect):
    rows = split_11k(read_11k(real_sized_hands, no_accessories=False), aspect, draw=0)
    sizes = split_sizes(rows)
    (train, val, test) = REAL[aspect]
    assert sizes["train"] == train and sizes["val"] == val
    for run in range(10):
        query, gallery = sizes[f"query{run}"], sizes[f"gallery{run}"]
        assert gallery == (test[0], test[0])  # one gallery image per identity
        assert query[1] + gallery[1] == test[1]


def test_protocol_invariants(synthetic_hands):
    records = read_11k(synthetic_hands)
    rows = split_11k(records, "dorsal left", draw=4, runs=10)
    by_split = defaultdict(list)
    for row in rows:
        by_split[row["split"]].append(row)
    train_ids = {r["person"] for r in by_split["train"] + by_split["val"]}
    test_ids = {r["person"] for r in by_split["query0"] + by_split["gallery0"]}
    assert train_ids and test_ids and not train_ids & test_ids
    assert all(int(p) <= 1037 for p in train_ids) and all(int(p) > 1037 for p in test_ids)
    assert Counter(r["identity"] for r in by_split["val"]).most_common(1)[0][1] == 1
    test_images = {r["image"] for r in by_split["query0"] + by_split["gallery0"]}
    for run in range(10):
        query = {r["image"] for r in by_split[f"query{run}"]}
        gallery = {r["image"] for r in by_split[f"gallery{run}"]}
        assert not query & gallery and query | gallery == test_images
        assert Counter(r["identity"] for r in by_split[f"gallery{run}"]).most_common(1)[0][1] == 1
        merged = by_split[f"gallery_all{run}"]
        # the merged gallery holds every aspect, each identity labelled with its aspect
        assert {r["aspect"] for r in merged} == {"dorsal right", "dorsal left", "palmar right", "palmar left"}
        assert gallery <= {r["image"] for r in merged}
        assert all(r["identity"].startswith(r["aspect"].replace(" ", "_") + "/") for r in merged)
    # different runs draw different galleries
    assert {r["image"] for r in by_split["gallery0"]} != {r["image"] for r in by_split["gallery1"]}


def test_same_seed_same_manifest_other_seed_differs(synthetic_hands):
    records = read_11k(synthetic_hands)
    assert split_11k(records, "palmar right", draw=1) == split_11k(records, "palmar right", draw=1)
    assert split_11k(records, "palmar right", draw=1) != split_11k(records, "palmar right", draw=2)


def test_prepare_writes_manifest_settings_and_cache(synthetic_hands):
    settings = PrepareSettings(Hands11k(root=str(synthetic_hands), aspect="dorsal right"), draw=0, cache_size=48)
    path = prepare(settings, quiet=True)
    rows = read_manifest(path)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["settings"]["draw"] == 0 and info["settings"]["cache_size"] == 48
    assert info["sizes"]["val"]["identities"] == info["sizes"]["train"]["identities"]
    cached = settings.image_cache / rows[0]["image"]
    assert synthetic_hands not in cached.parents  # derived files go under the cache, never in the dataset folder
    from PIL import Image

    assert min(Image.open(cached).size) == 48
    before = path.read_bytes()
    assert prepare(settings, quiet=True) == path and path.read_bytes() == before
    # a new cache size makes a new cache
    other = PrepareSettings(Hands11k(root=str(synthetic_hands), aspect="dorsal right"), cache_size=40)
    prepare(other, quiet=True)
    assert min(Image.open(other.image_cache / rows[0]["image"]).size) == 40


def test_a_caption_csv_with_several_captions_per_image_never_puts_one_image_on_both_sides(tmp_path):
    from handclip.data.readers import read_caption_csv
    from handclip.data.split import split_captions

    lines = ["image,caption,identity"]
    for person in range(10):
        for image in range(3):
            for caption in range(4):  # COCO style: several captions of one image
                lines.append(f"p{person}_{image}.jpg,caption {caption} of {person},{person}")
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    rows = split_captions(read_caption_csv(tmp_path / "captions.csv"), draw=0, runs=3)
    sides = {}
    for row in rows:
        sides.setdefault(row["image"], set()).add(row["split"])
    for splits in sides.values():
        assert not ({"train", "val"} <= splits)
        for run in range(3):
            assert not ({f"query{run}", f"gallery{run}"} <= splits)
    # every caption of an image goes with it
    assert sum(1 for r in rows if r["split"] == "val") % 4 == 0


def test_a_caption_csv_without_identities_is_split_by_image_for_caption_retrieval(tmp_path):
    from handclip.data.readers import read_caption_csv
    from handclip.data.split import check_protocol, check_test_set, split_captions
    from handclip.eval.protocol import images_needed, is_retrieval, protocol_pairs

    lines = ["image,caption"] + [f"img{i}.jpg,caption {k} of image {i}" for i in range(20) for k in range(5)]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    records = read_caption_csv(tmp_path / "captions.csv")
    rows = split_captions(records, draw=0)
    check_protocol(rows, "here")
    check_test_set(rows, "here")
    side = {}
    for row in rows:
        side.setdefault(row["image"], set()).add(row["split"])
    assert all(len(s) == 1 for s in side.values())  # an image's 5 captions stay on its side
    count = {split: sum(1 for s in side.values() if s == {split}) for split in ("train", "val", "test")}
    assert count == {"train": 14, "val": 2, "test": 4}  # a fifth tests, a tenth (at least 2) validates
    assert is_retrieval(rows) and is_retrieval([r for r in rows if r["split"] in ("train", "val")])
    assert protocol_pairs(rows) == [("val", None, "val", "val"), ("test", None, "test", "test")]
    assert len(images_needed(rows)) == 6  # each validation and test image once
    other = split_captions(records, draw=1)
    assert {r["image"] for r in other if r["split"] == "test"} != {r["image"] for r in rows if r["split"] == "test"}


def test_a_caption_csv_without_identities_keeps_its_own_split_and_draws_validation_from_training(tmp_path):
    from handclip.data.readers import read_caption_csv
    from handclip.data.split import split_captions
    from handclip.errors import DataError

    lines = ["image,caption,split"] + [f"img{i}.jpg,a caption of {i},{'test' if i < 5 else 'train'}" for i in range(30)]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    rows = split_captions(read_caption_csv(tmp_path / "captions.csv"))
    test = {r["image"] for r in rows if r["split"] == "test"}
    assert test == {f"img{i}.jpg" for i in range(5)}
    assert len({r["image"] for r in rows if r["split"] == "val"}) == 3  # a tenth of 30, from the training rows
    lines[2] = lines[2].replace(",test", ",val") + "\nimg1.jpg,another caption of 1,test"  # one image, two sides
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="img1.jpg is marked test and val on different rows"):
        split_captions(read_caption_csv(tmp_path / "captions.csv"))


def test_caption_retrieval_scores_each_caption_against_the_images_and_counts_every_image_that_has_it():
    import torch

    from handclip.eval.protocol import score_protocol

    # val: images a, b, c; a has two captions, "x" is shared by b and c
    rows = [{"image": "t.jpg", "identity": "t.jpg", "split": "train", "caption": "t"}]
    rows += [{"image": i, "identity": i, "split": "val", "caption": c}
             for i, c in (("a", "red"), ("a", "round"), ("b", "x"), ("c", "x"))]  # fmt: skip
    image_rows = [{"image": i, "identity": i, "split": "val"} for i in "abc"]
    images = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    # "red" finds a; "round" finds b first (wrong), then a; "x" finds c (right: c has it)
    text = {"red": [1.0, 0, 0], "round": [0.1, 1.0, 0], "x": [0, 0.2, 1.0]}
    result = score_protocol(images, image_rows, rows, include_test=False,
                            texts=lambda captions: torch.tensor([text[c] for c in captions]))  # fmt: skip
    assert result["metrics"]["val/rank1"] == pytest.approx(3 / 4)
    # AP: red 1, round 1/2, x (b and c right, both first) 1, 1
    assert result["metrics"]["val/mAP"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    with pytest.raises(ValueError, match="give score_protocol its texts"):
        score_protocol(images, image_rows, rows, include_test=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("train image as a query", r"image a/1.jpg is in training and in test"),
        ("val image also trains", r"image a/2.jpg is both a training and a validation image"),
        ("query image in the gallery", r"image c/1.jpg is both query and gallery of run 0"),
        ("training identity tested", r"identity a is in training and in test"),
    ],
)
def test_every_manifest_is_refused_when_it_scores_what_the_model_has_seen(change, message):
    from handclip.data.split import check_protocol
    from handclip.errors import DataError

    def row(image, split):
        return {"image": image, "identity": image.split("/")[0], "split": split}

    rows = [row("a/1.jpg", "train"), row("a/2.jpg", "val"), row("b/1.jpg", "train"), row("b/2.jpg", "val"),
            row("c/1.jpg", "query0"), row("c/2.jpg", "gallery0")]  # fmt: skip
    check_protocol(rows, "m")  # a sound split passes
    extra = {
        "train image as a query": row("a/1.jpg", "query1"),
        "val image also trains": row("a/2.jpg", "train"),
        "query image in the gallery": row("c/1.jpg", "gallery0"),
        "training identity tested": row("a/3.jpg", "query0"),
    }[change]
    with pytest.raises(DataError, match=f"^m: {message}"):
        check_protocol([*rows, extra], "m")


def test_other_aspects_add_only_their_training_identities_and_leave_validation_and_test_alone(synthetic_hands):
    records = read_11k(synthetic_hands)
    plain = split_11k(records, "dorsal right", draw=3, runs=2)
    more = split_11k(records, "dorsal right", draw=3, runs=2, other_aspects=True)
    extra = [r for r in more if r not in plain]
    assert extra and all(r["split"] == "train" and r["aspect"] != "dorsal right" for r in extra)
    assert all(int(r["person"]) <= THRESHOLDS_11K[r["aspect"]] for r in extra)  # training identities only
    assert [r for r in more if r["split"] != "train"] == [r for r in plain if r["split"] != "train"]
    tested = {r["identity"] for r in more if r["split"].startswith(("query", "gallery"))}
    assert not tested & {r["identity"] for r in more if r["split"] == "train"}  # no test identity of any aspect trains
    both = Hands11k(root=str(synthetic_hands), other_aspects=True)
    assert both.name != Hands11k(root=str(synthetic_hands)).name  # its own manifest
