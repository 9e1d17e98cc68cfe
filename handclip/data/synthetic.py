"""Procedurally drawn hands written in the exact 11k Hands format.

    python -m handclip.data.synthetic --out DIR --identities N --seed S [--image-size 1600x1200]

writes `DIR/Hands/Hand_XXXXXXX.jpg` and `DIR/HandInfo.csv` with 11k's columns and values.
Identity fixes the hand's geometry (finger lengths, widths, spread, palm), skin tone, moles,
palm creases and nail polish; the aspect fixes dorsal/palmar look and left/right mirroring;
every image varies pose, scale, finger bend, light, background and noise. A ring appears on
some images of some people and is flagged in `accessories`, as in the real data.
Same arguments, same bytes.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from handclip.data.hands import ASPECTS, HANDINFO_COLUMNS, THRESHOLDS_11K
from handclip.io import atomic_path, atomic_write, remove_dead_leftovers, waiting_lock

SKIN = {  # 11k's skinColor values and a base RGB for each
    "very fair": (236, 200, 178),
    "fair": (222, 178, 148),
    "medium": (190, 140, 105),
    "dark": (130, 90, 64),
}
PALM = (238, 196, 182)  # the colour palms tend towards
# split thresholds of the published protocol: the lowest one, and the highest
_LOW_THRESHOLD, _HIGH_THRESHOLD, _MAX_ID = min(THRESHOLDS_11K.values()), max(THRESHOLDS_11K.values()), 1590


@dataclass
class Person:
    id: int
    age: int
    gender: str
    skin: str
    tone: np.ndarray
    palm: tuple[float, float]
    finger_lengths: np.ndarray  # thumb, index, middle, ring, little (in palm heights)
    finger_widths: np.ndarray
    spread: np.ndarray  # degrees
    thumb_angle: float
    moles: np.ndarray  # (k, 2) in palm coordinates
    creases: np.ndarray  # (3, 3) offsets of the palm lines
    nail_colour: tuple[int, int, int] | None
    ring_share: float
    irregular: bool


def make_person(seed: int, pid: int) -> Person:
    """Person `pid` of the population drawn with `seed` (the same person for the same pair)."""
    rng = np.random.default_rng([seed, pid])
    skin = list(SKIN)[rng.integers(len(SKIN))]
    gender = "male" if rng.random() < 0.5 else "female"
    size = 1.06 if gender == "male" else 0.96
    lengths = np.array([0.55, 0.78, 0.88, 0.82, 0.64]) * rng.uniform(0.85, 1.15, 5)
    polish = rng.random() < 0.2
    return Person(
        id=pid,
        age=int(rng.integers(18, 76)),
        gender=gender,
        skin=skin,
        tone=np.array(SKIN[skin], float) + rng.normal(0, 9, 3),
        palm=(size * rng.uniform(0.85, 1.15), size * rng.uniform(0.9, 1.15)),
        finger_lengths=lengths * size,
        finger_widths=np.array([0.24, 0.19, 0.2, 0.19, 0.16]) * rng.uniform(0.8, 1.2) * rng.uniform(0.9, 1.1, 5),
        spread=np.array([-14.0, -5.0, 3.0, 12.0]) + rng.normal(0, 4, 4),
        thumb_angle=float(rng.uniform(35, 70)),
        moles=rng.uniform([-0.45, -0.45], [0.45, 0.45], (int(rng.integers(0, 5)), 2)),
        creases=rng.uniform(-0.12, 0.12, (3, 3)),
        nail_colour=tuple(int(c) for c in rng.integers(40, 230, 3)) if polish else None,
        ring_share=0.5 if rng.random() < 0.15 else 0.0,
        irregular=bool(rng.random() < 0.08),
    )


def _polygon_circle(cx: float, cy: float, r: float, n: int = 14) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _finger(base: np.ndarray, angle: float, length: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Finger as a quad from its base along `angle` (degrees from straight up) plus a round tip."""
    direction = np.array([math.sin(math.radians(angle)), -math.cos(math.radians(angle))])
    normal = np.array([-direction[1], direction[0]])
    tip = base + direction * length
    quad = np.array(
        [base + normal * width / 2, tip + normal * width / 2, tip - normal * width / 2, base - normal * width / 2]
    )
    return quad, tip


def render_hand(
    person: Person, aspect: str, rng: np.random.Generator, size: tuple[int, int], ring: bool
) -> Image.Image:
    """Draw one image of `person`'s hand seen from `aspect`."""
    width, height = size
    dorsal = aspect.startswith("dorsal")
    # a right hand seen from the back has its thumb on the left; palmar or left hands mirror that
    mirror = (aspect == "dorsal left") or (aspect == "palmar right")
    background = np.clip(np.array([246, 244, 240]) + rng.normal(0, 6, 3), 200, 255)
    image = Image.new("RGB", size, tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)

    light = rng.uniform(0.85, 1.12)
    # palms are lighter and pinker than the back of the hand, the more so the darker the skin
    tone = (person.tone if dorsal else 0.55 * person.tone + 0.45 * np.array(PALM)) * light
    skin = tuple(int(c) for c in np.clip(tone, 0, 255))
    shade = tuple(int(c) for c in np.clip(tone * 0.78, 0, 255))

    unit = height * 0.24 * rng.uniform(0.88, 1.08)  # palm height in pixels
    angle = math.radians(rng.normal(0, 9))
    centre = np.array([width / 2, height * 0.62]) + rng.normal(0, 0.04, 2) * [width, height]
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def to_pixels(points: np.ndarray) -> list[tuple[float, float]]:
        points = np.asarray(points, float).reshape(-1, 2).copy()
        if mirror:
            points[:, 0] = -points[:, 0]
        return [tuple(p) for p in (points * unit) @ rotation.T + centre]

    palm_w, palm_h = 0.5 * person.palm[0], 0.5 * person.palm[1]
    palm = np.array(
        [
            [-palm_w, -palm_h],
            [palm_w, -palm_h],
            [palm_w * 1.05, palm_h * 0.6],
            [palm_w * 0.7, palm_h * 1.3],
            [-palm_w * 0.7, palm_h * 1.3],
            [-palm_w * 1.05, palm_h * 0.6],
        ]
    )
    draw.polygon(to_pixels(palm), fill=skin)
    # wrist
    draw.polygon(
        to_pixels(
            [
                [-palm_w * 0.7, palm_h * 1.2],
                [palm_w * 0.7, palm_h * 1.2],
                [palm_w * 0.75, palm_h * 3],
                [-palm_w * 0.75, palm_h * 3],
            ]
        ),
        fill=skin,
    )

    fingers = []
    bends = rng.uniform(0.9, 1.0, 5)
    bases_x = np.linspace(-palm_w * 0.75, palm_w * 0.75, 4)
    for i in range(4):  # index .. little
        base = np.array([bases_x[i], -palm_h * 0.92])
        spread = person.spread[i] + rng.normal(0, 2.5)
        fingers.append(
            (
                i + 1,
                *_finger(base, spread, person.finger_lengths[i + 1] * bends[i + 1], person.finger_widths[i + 1]),
                spread,
            )
        )
    thumb_base = np.array([-palm_w * 0.95, palm_h * 0.1])
    thumb_angle = -person.thumb_angle + rng.normal(0, 4)
    fingers.append(
        (
            0,
            *_finger(thumb_base, thumb_angle, person.finger_lengths[0] * bends[0], person.finger_widths[0]),
            thumb_angle,
        )
    )

    for index, quad, tip, finger_angle in fingers:
        w = person.finger_widths[index]
        draw.polygon(to_pixels(quad), fill=skin)
        draw.polygon(to_pixels(_polygon_circle(*tip, w / 2)), fill=skin)
        direction = np.array([math.sin(math.radians(finger_angle)), -math.cos(math.radians(finger_angle))])
        normal = np.array([-direction[1], direction[0]])
        if dorsal:
            nail_centre = tip - direction * w * 0.35
            colour = person.nail_colour or tuple(int(c) for c in np.clip(tone * 1.12 + 10, 0, 255))
            draw.polygon(to_pixels(_polygon_circle(*nail_centre, w * 0.3)), fill=colour)
            for knuckle in (0.35, 0.65):  # knuckle wrinkles across the finger
                p = tip - direction * person.finger_lengths[index] * knuckle
                draw.line(
                    to_pixels([p - normal * w * 0.3, p + normal * w * 0.3]), fill=shade, width=max(1, int(unit * 0.012))
                )
        else:
            for joint in (0.3, 0.62):  # finger joint creases
                p = tip - direction * person.finger_lengths[index] * joint
                draw.line(
                    to_pixels([p - normal * w * 0.4, p + normal * w * 0.4]), fill=shade, width=max(1, int(unit * 0.015))
                )
        if ring and index == 3:
            p = tip - direction * person.finger_lengths[index] * 0.82
            band = np.array(
                [
                    p - normal * w * 0.6,
                    p + normal * w * 0.6,
                    p + normal * w * 0.6 + direction * 0.05,
                    p - normal * w * 0.6 + direction * 0.05,
                ]
            )
            draw.polygon(to_pixels(band), fill=(212, 175, 55))

    if dorsal:
        for mole in person.moles:
            draw.polygon(
                to_pixels(_polygon_circle(mole[0] * palm_w * 2, mole[1] * palm_h * 2, 0.035, 8)), fill=(70, 45, 35)
            )
        for k in range(3):  # tendons
            x = bases_x[k + 1] * 0.8
            draw.line(
                to_pixels([[x, -palm_h * 0.8], [x * 0.5, palm_h * 0.9]]), fill=shade, width=max(1, int(unit * 0.01))
            )
    else:
        for k, (a, b, c) in enumerate(person.creases):  # heart, head and life lines
            y = -palm_h * 0.5 + k * palm_h * 0.45
            curve = [[x, y + (a * x * x + b * x + c) * palm_h] for x in np.linspace(-palm_w * 0.9, palm_w * 0.9, 9)]
            draw.line(to_pixels(curve), fill=shade, width=max(1, int(unit * 0.02)))

    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2)) * height / 600))
    pixels = np.asarray(image, np.float32) + rng.normal(0, 4.0, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def person_images(
    person: Person, aspect: str, count: int, seed: int, size: tuple[int, int]
) -> list[tuple[bool, bytes]]:
    """`count` images of `person` from `aspect`, as (wears a ring, JPEG bytes); the same for the same arguments."""
    images = []
    for k in range(count):
        rng = np.random.default_rng([seed, person.id, ASPECTS.index(aspect), k])
        ring = bool(rng.random() < person.ring_share)
        buffer = io.BytesIO()
        render_hand(person, aspect, rng, size, ring).save(buffer, "JPEG", quality=90)
        images.append((ring, buffer.getvalue()))
    return images


def identity_ids(identities: int, rng: np.random.Generator) -> list[int]:
    """Ids in 11k's range, half below every split threshold and half above."""
    low = identities // 2
    below = rng.choice(_LOW_THRESHOLD, size=low, replace=False)
    above = rng.choice(np.arange(_HIGH_THRESHOLD + 1, _MAX_ID), size=identities - low, replace=False)
    return sorted(int(i) for i in np.concatenate([below, above]))


def generate_hands(
    out: str | Path,
    identities: int = 40,
    seed: int = 0,
    image_size: tuple[int, int] = (1600, 1200),
    images_per_aspect: tuple[int, int] = (4, 9),
    aspects: Sequence[str] = ASPECTS,
    plan: dict[str, list[tuple[int, int]]] | None = None,
) -> Path:
    """Write a synthetic 11k Hands folder; return the path of its `HandInfo.csv`.

    `plan` (aspect -> [(id, number of images)]) fixes exactly who appears with how many images;
    without it every identity gets `images_per_aspect` (inclusive range) images per aspect.
    """
    out = Path(out)
    (out / "Hands").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if plan is None:
        ids = identity_ids(identities, rng)
        low, high = images_per_aspect
        plan = {a: [(i, int(rng.integers(low, high + 1))) for i in ids] for a in aspects}
    people: dict[int, Person] = {}
    rows = []
    number = 0
    for pid in sorted({i for entries in plan.values() for i, _ in entries}):
        people[pid] = make_person(seed, pid)
    from tqdm.auto import tqdm

    for pid, person in tqdm(people.items(), desc="drawing synthetic hands", unit="person", leave=False):
        for aspect in aspects:
            count = dict(plan.get(aspect, [])).get(pid, 0)
            for ring, data in person_images(person, aspect, count, seed, image_size):
                number += 1
                name = f"Hand_{number:07d}.jpg"
                (out / "Hands" / name).write_bytes(data)
                rows.append([
                    f"{pid:07d}", person.age, person.gender, person.skin, int(ring),
                    int(person.nail_colour is not None), aspect, name, int(person.irregular),
                ])  # fmt: skip
    csv_path = out / "HandInfo.csv"
    with atomic_write(csv_path) as handle:
        writer = csv.writer(handle)
        writer.writerow(HANDINFO_COLUMNS)
        writer.writerows(rows)
    return csv_path


MARKER = "synthetic.json"  # the settings a generated folder was made with
VERSION = 2  # of the drawing; a folder drawn by another version is drawn anew (2: lighter palms)


def ensure_synthetic(root: str | Path, identities: int, seed: int, image_size: Sequence[int]) -> Path:
    """The synthetic dataset at `root`, made with exactly these settings; generated when missing.

    Generation runs under a lock beside `root` (two first runs at once generate it once), into a
    temporary folder that is renamed into place, so a killed generator leaves no half dataset; its
    leftovers are removed by the next one. A folder this function made with other settings is
    made anew, with a message; a folder it did not make (no `synthetic.json`) is never touched.
    """
    import json

    root = Path(root)
    settings = {"identities": int(identities), "seed": int(seed), "image_size": [int(v) for v in image_size],
                "version": VERSION}  # fmt: skip
    marker = root / MARKER

    def made_with() -> dict | None:
        try:
            return json.loads(marker.read_text())
        except (OSError, ValueError):
            return None

    if made_with() == settings:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with waiting_lock(root.with_name(f".{root.name}.lock")):  # a second first run waits, then finds it made
        remove_dead_leftovers(root.parent, root.name)  # a killed generator's half-made folder
        old = made_with()
        if old == settings:
            return root
        if root.exists() and old is None:
            if (root / "HandInfo.csv").is_file():
                return root  # a dataset HandCLIP did not make (or made before it kept settings): used as it is
            if any(root.iterdir()):
                from handclip.errors import DataError

                raise DataError(f"data.root={root} holds files but no HandInfo.csv; point data.root at an empty "
                                "or missing folder to generate synthetic hands there")  # fmt: skip
        if old is not None:
            print(f"synthetic hands in {root} were made with {old}; this run asks for {settings}: making them anew",
                  flush=True)  # fmt: skip
        else:
            print(f"generating synthetic hands in {root} ({identities} identities) ...", flush=True)
        # a folder of ours made with other settings is replaced whole (its split and cache with it)
        with atomic_path(root) as tmp:
            generate_hands(tmp, int(identities), int(seed), (int(image_size[0]), int(image_size[1])))
            (tmp / MARKER).write_text(json.dumps(settings))
    return root


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size {text!r}: expected WIDTHxHEIGHT, e.g. 1600x1200") from None
    if width < 32 or height < 32:
        raise argparse.ArgumentTypeError("--image-size: both sides must be at least 32 pixels")
    return width, height


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write Hands/ and HandInfo.csv into")
    parser.add_argument("--identities", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=_size, default=(1600, 1200), help="WIDTHxHEIGHT (11k: 1600x1200)")
    parser.add_argument("--captions", action="store_true",
                        help="also write captions.csv (image, caption, identity, skin): the images as a caption "
                             "dataset of your own would bring them, for data=captions")  # fmt: skip
    args = parser.parse_args(argv)
    if args.identities < 2:
        parser.error("--identities must be at least 2")
    path = generate_hands(args.out, args.identities, args.seed, args.image_size)
    print(f"wrote {path} and {path.parent / 'Hands'}")
    if args.captions:
        print(f"wrote {write_caption_csv(path)}")


def write_caption_csv(handinfo: str | Path) -> Path:
    """`captions.csv` beside an 11k-format `HandInfo.csv`: one row per image without accessories, captioned from
    its attributes; an identity is one person's hand seen from one aspect (as in re-identification)."""
    import csv

    handinfo = Path(handinfo)
    with open(handinfo, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["accessories"] == "0"]
    out = handinfo.parent / "captions.csv"
    with atomic_write(out) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image", "caption", "identity", "skin"])
        for r in rows:
            caption = f"a photo of the {r['aspectOfHand']} hand of a {r['age']} year old {r['gender']}"
            identity = f"{int(r['id']):07d}_{r['aspectOfHand'].replace(' ', '_')}"
            writer.writerow([f"Hands/{r['imageName']}", caption, identity, r["skinColor"]])
    return out


if __name__ == "__main__":
    main()
