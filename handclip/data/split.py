"""The published hand re-identification split, seeded and written as a manifest.

11k Hands, per aspect (MBA-Net / CLIP-HandID protocol): identities with id <= threshold train,
the rest test; one random image per training identity is the validation image; for each of
`runs` runs, one random image per test identity is the gallery and the rest are queries. The
merged-aspect gallery `gallery_allR` joins the run-R galleries of all four aspects, whose
identity labels (aspect/person) keep one person's different hands apart.

HD: subjects <= 447 train, 448-501 test, and every image of subjects 502-712 joins every
gallery as a distractor.

A manifest has one row per (image, split): columns `image, identity, person, aspect, split`
and the record's attributes.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from handclip.data.hands import ASPECTS, HD_TRAIN_MAX, THRESHOLDS_11K
from handclip.data.readers import ImageRecord
from handclip.errors import DataError

MANIFEST_COLUMNS = ["image", "identity", "person", "aspect", "split"]


def _by_identity(records: Iterable[ImageRecord]) -> dict[str, list[ImageRecord]]:
    groups: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        groups[record.identity].append(record)
    return {k: sorted(v, key=lambda r: r.image) for k, v in sorted(groups.items())}


def _row(record: ImageRecord, split: str) -> dict:
    # a record's own `split` attribute (a caption CSV's request) is what this split decided: not a column
    extra = {k: v for k, v in record.attributes.items() if k not in MANIFEST_COLUMNS}
    return {
        "image": record.image,
        "identity": record.identity,
        "person": record.person,
        "aspect": record.aspect,
        "split": split,
        **extra,
    }


def _by_image(records: list[ImageRecord]) -> list[list[ImageRecord]]:
    """An identity's records grouped by image file (a caption CSV may give one image several captions).

    Splits choose among distinct images, and every record of a chosen image goes with it, so no
    image is ever on both sides of train/val or query/gallery.
    """
    groups: dict[str, list[ImageRecord]] = {}
    for record in records:
        groups.setdefault(record.image, []).append(record)
    return list(groups.values())


def _train_val(train: dict[str, list[ImageRecord]], rng: np.random.Generator) -> list[dict]:
    rows = []
    for records in train.values():
        images = _by_image(records)
        if len(images) == 1:  # nothing left to train on if it became the validation image
            rows += [_row(r, "train") for r in images[0]]
            continue
        val = int(rng.integers(len(images)))
        rows += [_row(r, "val" if i == val else "train") for i, group in enumerate(images) for r in group]
    if not any(row["split"] == "val" for row in rows):
        raise DataError(
            f"none of the {len(train)} training identities has two or more distinct images, so there is no "
            "validation image for model selection; each training identity needs at least two images. "
            "(A caption CSV without an identity column makes each image its own identity: add an "
            "identity column naming whose images belong together)"
        )
    return rows


def _query_gallery(test: dict[str, list[ImageRecord]], seed: list[int], runs: int, prefix: str = "") -> list[dict]:
    rows = []
    for run in range(runs):
        rng = np.random.default_rng(seed + [run + 1])
        for records in test.values():
            images = _by_image(records)
            chosen = int(rng.integers(len(images)))
            for i, group in enumerate(images):
                for record in group:
                    if i == chosen:
                        rows.append(_row(record, f"gallery{prefix}{run}"))
                    elif not prefix:
                        rows.append(_row(record, f"query{run}"))
    return rows


def _check_test(test: dict[str, list[ImageRecord]], what: str) -> None:
    single = [identity for identity, records in test.items() if len(_by_image(records)) < 2]
    if single:
        warnings.warn(
            f"{what}: {len(single)} test identities have a single image (e.g. {single[0]}); "
            "they can only be gallery images, never queries",
            stacklevel=3,
        )


def split_11k(
    records: list[ImageRecord], aspect: str, draw: int = 0, runs: int = 10, other_aspects: bool = False
) -> list[dict]:
    """Manifest rows of one 11k aspect: train, val, query/gallery runs and merged galleries; `draw` seeds them.

    With `other_aspects`, the training identities of the other three aspects (at or below their own
    thresholds) train too: images the published protocol leaves unused, never a test identity of any
    aspect. Validation and the test runs stay the aspect's own."""
    if aspect not in THRESHOLDS_11K:
        raise DataError(f"aspect {aspect!r} is not one of {', '.join(ASPECTS)}")
    rows = []
    for index, other in enumerate(ASPECTS):
        groups = _by_identity(r for r in records if r.aspect == other)
        threshold = THRESHOLDS_11K[other]
        train = {k: v for k, v in groups.items() if int(v[0].person) <= threshold}
        test = {k: v for k, v in groups.items() if int(v[0].person) > threshold}
        if other == aspect:
            if not train or not test:
                raise DataError(
                    f"aspect '{aspect}' has {len(train)} training and {len(test)} test identities "
                    f"after filtering (threshold id <= {threshold} trains): both must be non-empty"
                )
            _check_test(test, f"aspect '{aspect}'")
            rows += _train_val(train, np.random.default_rng([draw, index]))
            rows += _query_gallery(test, [draw, index], runs)
        elif other_aspects:
            rows += [_row(record, "train") for records in train.values() for record in records]
        # the merged gallery draws every aspect's galleries with that aspect's own seed
        rows += _query_gallery(test, [draw, index], runs, prefix="_all")
    return rows


def split_hd(records: list[ImageRecord], draw: int = 0, runs: int = 10) -> list[dict]:
    """Manifest rows of HD: train/val, then query/gallery runs with distractors in every gallery."""
    distractors = [r for r in records if r.attributes.get("distractor") == "1"]
    groups = _by_identity(r for r in records if r.attributes.get("distractor") != "1")
    train = {k: v for k, v in groups.items() if int(v[0].person) <= HD_TRAIN_MAX}
    test = {k: v for k, v in groups.items() if int(v[0].person) > HD_TRAIN_MAX}
    if not train or not test:
        raise DataError(f"HD has {len(train)} training and {len(test)} test identities: both must be non-empty")
    _check_test(test, "HD")
    rows = _train_val(train, np.random.default_rng([draw, 0]))
    rows += _query_gallery(test, [draw, 0], runs)
    rows += [_row(r, f"gallery{run}") for run in range(runs) for r in distractors]
    return rows


def split_sizes(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """(identities, images) per split name, e.g. {'train': (72, 890), ...}."""
    identities: dict[str, set] = defaultdict(set)
    images: dict[str, int] = defaultdict(int)
    for row in rows:
        identities[row["split"]].add(row["identity"])
        images[row["split"]] += 1
    return {split: (len(identities[split]), images[split]) for split in images}


def split_captions(records: list[ImageRecord], draw: int = 0, runs: int = 10, test_share: float = 0.2) -> list[dict]:
    """Manifest rows of a generic caption dataset: the records' own `split` (train, val, test), or a
    split by identity seeded by `draw`; training identities give validation images (the ones marked
    val, else one drawn per identity), test ones query/gallery runs."""
    groups = _by_identity(records)
    if is_retrieval_only(groups):
        return _split_images(groups, draw, test_share)
    chosen = _requested_sides(records, groups) or _drawn_sides(groups, draw, test_share)
    train = {k: v for k, v in groups.items() if chosen[k] == "train"}
    test = {k: v for k, v in groups.items() if chosen[k] == "test"}
    if not train or not test:
        raise DataError(
            f"the dataset has {len(train)} training and {len(test)} test identities: both must be non-empty"
        )
    if any(r.attributes.get("split") == "val" for r in records):
        rows = [_row(r, "val" if r.attributes["split"] == "val" else "train") for v in train.values() for r in v]
    else:
        rows = _train_val(train, np.random.default_rng([draw, 0]))
    rows += _query_gallery(test, [draw, 0], runs)
    return rows


# the image-text retrieval protocol's validation share of the images, when a split is drawn
VAL_SHARE = 0.1


def is_retrieval_only(groups: dict[str, list[ImageRecord]]) -> bool:
    """Whether no identity has two distinct images (a caption file without identities): re-identification has
    no query to score, and the image-text retrieval protocol applies."""
    return all(len(_by_image(records)) < 2 for records in groups.values())


def _split_images(groups: dict[str, list[ImageRecord]], draw: int, test_share: float) -> list[dict]:
    """The image-text retrieval protocol's split: each image (with all its captions) trains, validates or tests,
    as the records' `split` asks or drawn by `draw` (a `test_share` of the images test, a VAL_SHARE validate).
    Validation and test score caption -> image retrieval among their own images."""
    asked = {identity: {r.attributes.get("split", "") for r in records} for identity, records in groups.items()}
    if any(any(sides) for sides in asked.values()):
        missing = next((records[0] for identity, records in groups.items() if "" in asked[identity]), None)
        if missing is not None:
            given = next(records[0] for identity, records in groups.items() if asked[identity] - {""})
            raise DataError(
                f"{missing.where or missing.image}: split is empty, but other rows give one (e.g. "
                f"{given.where or given.image}): give every row a split, or none for a seeded split"
            )
        torn = next((records for identity, records in groups.items() if len(asked[identity]) > 1), None)
        if torn is not None:
            raise DataError(f"{torn[0].image} is marked {' and '.join(sorted(asked[torn[0].identity]))} on different "
                            f"rows ({torn[0].where}, ...): an image's captions go to one split")  # fmt: skip
        sides = {identity: next(iter(split)) for identity, split in asked.items()}
        if "val" not in sides.values():  # validation drawn from the training images
            train = [k for k, side in sides.items() if side == "train"]
            rng = np.random.default_rng([draw, 98])
            rng.shuffle(train)
            sides.update(dict.fromkeys(train[: _share(VAL_SHARE, len(sides))], "val"))
    else:
        order = list(groups)
        rng = np.random.default_rng([draw, 99])
        rng.shuffle(order)
        test, val = _share(test_share, len(order)), _share(VAL_SHARE, len(order))
        sides = {k: "test" if i < test else "val" if i < test + val else "train" for i, k in enumerate(order)}
    count = {side: sum(1 for s in sides.values() if s == side) for side in CAPTION_SIDES}
    if count["train"] == 0 or count["test"] == 0:
        raise DataError(f"the dataset has {count['train']} training and {count['test']} test images: both must be "
                        "non-empty")  # fmt: skip
    return [_row(r, sides[identity]) for identity, records in groups.items() for r in records]


CAPTION_SIDES = ("train", "val", "test")


def _share(share: float, total: int) -> int:
    """How many of `total` images a share is: at least 2 (one image alone ranks first whatever the model)."""
    return max(2, int(round(share * total)))


def _drawn_sides(groups: dict[str, list[ImageRecord]], draw: int, test_share: float) -> dict[str, str]:
    rng = np.random.default_rng([draw, 99])
    order = list(groups)
    rng.shuffle(order)
    test_count = max(1, int(round(test_share * len(order))))
    return {k: ("test" if i < test_count else "train") for i, k in enumerate(order)}


def _requested_sides(records: list[ImageRecord], groups: dict[str, list[ImageRecord]]) -> dict[str, str]:
    """Train or test per identity, as the records' `split` asks; {} when none asks. Refuses a request
    that cannot hold: some rows without a split, one identity on both sides, val images of a test identity."""
    asked = [r for r in records if r.attributes.get("split")]
    if not asked:
        return {}
    unasked = next((r for r in records if not r.attributes.get("split")), None)
    if unasked is not None:
        raise DataError(
            f"{unasked.where or unasked.image}: split is empty, but other rows give one (e.g. "
            f"{asked[0].where or asked[0].image}): give every row a split, or none for a seeded split"
        )
    sides = {}
    for identity, group in groups.items():
        first = {}
        for record in group:
            first.setdefault(record.attributes["split"], record)
        if "train" in first and "test" in first:
            raise DataError(
                f"identity {identity!r} is marked train ({first['train'].where or first['train'].image}) and test "
                f"({first['test'].where or first['test'].image}): one identity on both sides leaks into the test "
                "scores; give all its images one side"
            )
        if "train" not in first and "val" in first:
            raise DataError(
                f"identity {identity!r} has val images ({first['val'].where or first['val'].image}) but no train "
                "images: val images are held-out images of training identities, matched against their train images"
            )
        sides[identity] = "test" if "test" in first else "train"
    return sides


def check_records(records: list[ImageRecord]) -> None:
    """Refuse an image listed under two identities, naming both places: in training and test at once,
    it would make the test scores read 100%."""
    first: dict[str, ImageRecord] = {}
    for record in records:
        seen = first.setdefault(record.image, record)
        if seen.identity != record.identity:
            raise DataError(
                f"{record.where or record.image}: image {record.image} is listed under identity {record.identity!r} "
                f"here and under {seen.identity!r} at {seen.where or 'an earlier record'}; an image shows one "
                "identity (under two it lands in training and in test at once and the test scores read 100%): "
                "keep it under one"
            )


# below this many test identities a re-identification score is coarse: said, with chance level
FEW_TEST_IDENTITIES = 10


def check_test_set(rows: list[dict], where: str) -> None:
    """Refuse a test split whose re-identification scores would mean nothing, whatever the model: fewer than two
    gallery identities (Rank-1 and mAP read 100%), or no query at all; warn when there are few identities."""
    gallery = {r["identity"] for r in rows if r["split"] == "gallery0"}
    queries = sum(r["split"] == "query0" for r in rows)
    if any(r["split"] == "test" for r in rows):
        _check_retrieval_sets(rows, where)
        return
    if not gallery and not queries:
        return  # a source without query/gallery runs
    if len(gallery) < 2:
        raise DataError(
            f"{where}: the test split has {len(gallery)} identity ({', '.join(sorted(gallery)) or 'none'}), so every "
            "query matches the only gallery identity and Rank-1 and mAP read 100% whatever the model. Give the test "
            "split more identities (more data, or a split column). If the identity column holds classes (identity = "
            "class), this is classification, not re-identification: give each individual its own identity"
        )
    if not queries:
        raise DataError(
            f"{where}: no test identity has two images, so there is no query (each identity's single image is its "
            "gallery image); re-identification needs test identities with two images or more"
        )
    if len(gallery) < FEW_TEST_IDENTITIES:
        warnings.warn(
            f"{where}: the test split has only {len(gallery)} identities and {queries} queries per run: chance "
            f"Rank-1 is {100 / len(gallery):.0f}% and one query moves it by {100 / queries:.0f} points",
            stacklevel=3,
        )


def _check_retrieval_sets(rows: list[dict], where: str) -> None:
    """The retrieval protocol's validation and test: each needs two images or more (one ranks first whatever the
    model); below FEW_TEST_IDENTITIES test images the score is coarse, said with its chance level."""
    for split, what in (("test", "test"), ("val", "validation")):
        images = {r["image"] for r in rows if r["split"] == split}
        if len(images) < 2:
            raise DataError(
                f"{where}: the {what} split has {len(images)} image, so every caption finds its image first whatever "
                f"the model and R@1 reads 100%: give the {what} split two images or more (more data, or a split "
                "column)"
            )
        if split == "test" and len(images) < FEW_TEST_IDENTITIES:
            warnings.warn(f"{where}: the test split has only {len(images)} images: chance R@1 is "
                          f"{100 / len(images):.0f}%", stacklevel=4)  # fmt: skip


def check_protocol(rows: list[dict], where: str) -> None:
    """Refuse a split in which an image shows two identities, an image or an identity is in training
    (train, val) and in test, an image is both a training and a validation image, or both query and
    gallery of one run: each inflates the scores. Checked on every manifest, whichever source made it.
    """
    identity_of: dict[str, str] = {}
    splits_of: dict[str, set] = defaultdict(set)
    sides_of: dict[str, set] = defaultdict(set)  # identity -> training and/or test
    for row in rows:
        image, identity, split = row["image"], row["identity"], row["split"]
        if identity_of.setdefault(image, identity) != identity:
            raise DataError(
                f"{where}: image {image} is listed under two identities, {identity_of[image]!r} and {identity!r}; "
                "an image shows one identity (under two it lands in training and test at once and the test "
                "scores read 100%): keep it under one"
            )
        splits_of[image].add(split)
        sides_of[identity].add("training" if split in ("train", "val") else "test")
    for image, splits in sorted(splits_of.items()):
        training = splits & {"train", "val"}
        clash = (
            "in training and in test" if training and splits - training
            else "both a training and a validation image" if len(training) == 2
            else next((f"both query and gallery of run {s[5:]}" for s in splits
                       if s.startswith("query") and f"gallery{s[5:]}" in splits), "")
        )  # fmt: skip
        if clash:
            raise DataError(f"{where}: image {image} is {clash}; the scores would count what the model has seen")
    both = sorted(k for k, v in sides_of.items() if len(v) > 1)
    if both:
        raise DataError(f"{where}: identity {both[0]} is in training and in test ({len(both)} such); "
                        "re-identification scores need test identities the model never trained on")  # fmt: skip
