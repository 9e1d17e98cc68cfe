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
    return {
        "image": record.image,
        "identity": record.identity,
        "person": record.person,
        "aspect": record.aspect,
        "split": split,
        **record.attributes,
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


def split_11k(records: list[ImageRecord], aspect: str, seed: int = 0, runs: int = 10) -> list[dict]:
    """Manifest rows of one 11k aspect: train, val, query/gallery runs and merged galleries."""
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
            rows += _train_val(train, np.random.default_rng([seed, index]))
            rows += _query_gallery(test, [seed, index], runs)
        # the merged gallery draws every aspect's galleries with that aspect's own seed
        rows += _query_gallery(test, [seed, index], runs, prefix="_all")
    return rows


def split_hd(records: list[ImageRecord], seed: int = 0, runs: int = 10) -> list[dict]:
    """Manifest rows of HD: train/val, then query/gallery runs with distractors in every gallery."""
    distractors = [r for r in records if r.attributes.get("distractor") == "1"]
    groups = _by_identity(r for r in records if r.attributes.get("distractor") != "1")
    train = {k: v for k, v in groups.items() if int(v[0].person) <= HD_TRAIN_MAX}
    test = {k: v for k, v in groups.items() if int(v[0].person) > HD_TRAIN_MAX}
    if not train or not test:
        raise DataError(f"HD has {len(train)} training and {len(test)} test identities: both must be non-empty")
    _check_test(test, "HD")
    rows = _train_val(train, np.random.default_rng([seed, 0]))
    rows += _query_gallery(test, [seed, 0], runs)
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


def split_captions(records: list[ImageRecord], seed: int = 0, runs: int = 10, test_share: float = 0.2) -> list[dict]:
    """Manifest rows of a generic caption dataset: the `split` column, or a seeded split by
    identity; training identities give validation images, test ones query/gallery runs."""
    groups = _by_identity(records)
    chosen = {k: v[0].attributes.get("split") for k, v in groups.items()}
    if not any(chosen.values()):
        rng = np.random.default_rng([seed, 99])
        order = list(groups)
        rng.shuffle(order)
        test_count = max(1, int(round(test_share * len(order))))
        chosen = {k: ("test" if i < test_count else "train") for i, k in enumerate(order)}
    train = {k: v for k, v in groups.items() if chosen[k] != "test"}
    test = {k: v for k, v in groups.items() if chosen[k] == "test"}
    if not train or not test:
        raise DataError(
            f"the caption CSV has {len(train)} training and {len(test)} test identities: both must be non-empty"
        )
    rows = _train_val(train, np.random.default_rng([seed, 0]))
    rows += _query_gallery(test, [seed, 0], runs)
    return rows
