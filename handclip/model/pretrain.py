"""A tiny CLIP pretrained contrastively on synthetic hands, so that the demo starts from a model that knows something.

The demo's tiny CLIP with random weights makes every freeze policy train a network from scratch,
zero-shot prompts score at chance and WiSE-FT mixes in noise. This module trains it once, the
way CLIP itself was made, on a corpus the demo never sees:

- images: our own generator's hands (`handclip.data.synthetic`), all four aspects, drawn at the
  demo's image size and brought to the model's input through the same JPEG, cache and resize
  steps the data module uses; the people have ids from `FIRST_ID` on, outside the 11k and HD ranges
  every demo and test split draws from, and another generator seed;
- captions: attributes only (aspect, skin, gender, age band, nail polish, ring) in varied
  sentences, never an identity; pairs with the same caption in a batch are positives.

`HuggingFaceCLIP(source="tiny", pretrain={...})` calls `pretrain_tiny` when it first builds the
model; the result is saved with `save_pretrained` beside a `pretraining.json` and loaded back
through `from_pretrained` like any backbone. Same settings and seed, same weights (on one machine).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from handclip.checks import integer, number
from handclip.errors import ConfigError

FIRST_ID = 100_000  # corpus people: far from 11k's ids (< 1600) and HD's (< 713)
VERSION = 1  # part of the cache key: bump when the corpus or the recipe changes

AGE_BANDS = ((30, "young"), (55, "middle-aged"), (200, "older"))


@dataclass(frozen=True)
class Pretraining:
    """How the tiny CLIP is pretrained (`backbone.pretrain` in `conf/backbone/tiny_pretrained.yaml`)."""

    identities: int = 384  # people in the corpus
    images_per_aspect: int = 4  # images of each person from each of the four aspects
    image_size: tuple[int, int] = (320, 240)  # drawn at this size (width, height), as the demo's images
    epochs: int = 32
    batch_size: int = 128
    lr: float = 1.0e-3
    weight_decay: float = 0.1
    warmup: float = 0.05  # share of the steps
    corpus_seed: int = 1  # the generator's seed; the model's own seed is the backbone's `seed`
    workers: int = field(default=0, compare=False)  # drawing processes; 0: one per CPU (up to 4); not in the key

    def __post_init__(self):
        for key, low in (("identities", 2), ("images_per_aspect", 1), ("epochs", 1), ("batch_size", 2)):
            integer(f"backbone.pretrain.{key}", getattr(self, key), low)
        for key in ("lr", "weight_decay", "warmup"):
            number(f"backbone.pretrain.{key}", getattr(self, key), 0, 1)
        if self.lr <= 0:
            raise ConfigError(f"backbone.pretrain.lr={self.lr!r} must be above 0")
        size = self.image_size
        pair = isinstance(size, (list, tuple)) and len(size) == 2
        if not (pair and all(isinstance(v, int) and not isinstance(v, bool) and v >= 32 for v in size)):
            raise ConfigError(f"backbone.pretrain.image_size={size!r} must be [width, height], each at least 32")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        integer("backbone.pretrain.workers", self.workers, 0)

    @classmethod
    def from_settings(cls, settings: Mapping | None) -> Pretraining:
        settings = dict(settings or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"backbone.pretrain.{unknown[0]} is unknown; settings are {', '.join(sorted(known))}")
        return cls(**settings)

    def key(self) -> dict:
        """What the pretrained weights depend on (the cache key)."""
        out = {k: v for k, v in asdict(self).items() if k != "workers"}
        out["image_size"] = list(self.image_size)
        out["version"] = VERSION
        return out


def age_band(age: int) -> str:
    return next(name for limit, name in AGE_BANDS if age < limit)


def caption(attributes: Mapping[str, str], rng: np.random.Generator) -> str:
    """A sentence naming some of an image's attributes (never who it is), in the words of the zero-shot prompts."""
    aspect, man = attributes["aspect"], attributes["gender"] == "male"
    with_aspect, with_gender = rng.random() < 0.85, rng.random() < 0.6
    if with_aspect and with_gender:
        age = f"{attributes['age_band']} " if rng.random() < 0.5 else ""
        subject = f"the {aspect} hand of a {age}{'man' if man else 'woman'}"
    elif with_aspect:
        subject = f"the {aspect} hand"
    elif with_gender:
        subject = f"a {'man' if man else 'woman'}'s hand"
    else:
        subject = "a hand"
    clauses = [
        f"with {attributes['skin']} skin",
        "with painted nails" if attributes["nail_polish"] == "1" else "with bare nails",
        "wearing a ring" if attributes["ring"] == "1" else "with no ring",
    ]
    chosen = [c for c in clauses if rng.random() < 0.5]
    rng.shuffle(chosen)
    return " ".join([f"a photo of {subject}", *chosen])


def _draw_person(job: tuple) -> list[tuple[dict, np.ndarray]]:
    """Every image of one corpus person, as the data module would feed it (resized, uint8 CHW)."""
    import io

    from PIL import Image

    from handclip.data.hands import ASPECTS
    from handclip.data.images import _resize_shortest
    from handclip.data.synthetic import make_person, person_images

    seed, pid, count, size, cache_size, resize = job
    person = make_person(seed, pid)
    out = []
    for aspect in ASPECTS:
        for ring, data in person_images(person, aspect, count, seed, size):
            image = _resize_shortest(Image.open(io.BytesIO(data)).convert("RGB"), cache_size)
            buffer = io.BytesIO()  # the resized image cache stores JPEG at quality 95
            image.save(buffer, "JPEG", quality=95)
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
            # the model's resize: the shortest edge, or (height, width) whatever the shape (SigLIP's squash)
            image = (_resize_shortest(image, resize) if isinstance(resize, int)
                     else image.resize((resize[1], resize[0]), Image.BICUBIC))  # fmt: skip
            attributes = {
                "aspect": aspect, "gender": person.gender, "skin": person.skin, "age_band": age_band(person.age),
                "nail_polish": str(int(person.nail_colour is not None)), "ring": str(int(ring)),
            }  # fmt: skip
            out.append((attributes, np.asarray(image, np.uint8).transpose(2, 0, 1).copy()))
    return out


def draw_corpus(settings: Pretraining, resize, cache_size: int) -> tuple[list[dict], list[np.ndarray]]:
    """The corpus: attributes and images (shortest edge `resize`, or resized to (height, width) `resize`) of every
    person, in id order."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    jobs = [
        (settings.corpus_seed, FIRST_ID + i, settings.images_per_aspect, settings.image_size, cache_size, resize)
        for i in range(settings.identities)
    ]
    workers = settings.workers or min(4, os.cpu_count() or 1)
    progress = dict(total=len(jobs), desc="drawing the pretraining corpus", unit="person", leave=False)
    if workers == 1:
        people = [_draw_person(job) for job in tqdm(jobs, **progress)]
    else:  # forked like data loader workers; they draw with numpy and Pillow only
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            people = list(tqdm(pool.map(_draw_person, jobs, chunksize=8), **progress))
    rows = [attributes for person in people for attributes, _ in person]
    images = [image for person in people for _, image in person]
    return rows, images


def pretrain_tiny(backbone, settings: Pretraining, seed: int) -> dict:
    """Train `backbone` (a freshly built tiny CLIP, or SigLIP) contrastively on the corpus; return what happened.
    A backbone with a sigmoid bias (SigLIP) is trained with SigLIP's loss, as it was made; CLIP with CLIP's."""
    from tqdm.auto import tqdm

    from handclip.losses.contrastive import clamp_logit_scale, contrastive_loss
    from handclip.losses.siglip import siglip_loss

    started = time.time()
    size = backbone.image_size
    rows, images = draw_corpus(settings, backbone.resize_size, int(round(size * 1.15)))
    drawn = time.time() - started
    stack = torch.from_numpy(np.stack(images))  # [N, 3, H, W], shortest edge = resize_size >= size
    mean = torch.tensor(backbone.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.image_std).view(1, 3, 1, 1)
    height, width = stack.shape[-2:]

    rng = np.random.default_rng([seed, settings.corpus_seed])
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(rows) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(settings.warmup * total))
    decay = [p for p in backbone.parameters() if p.ndim >= 2]
    other = [p for p in backbone.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip

    def rate(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    backbone.train()
    losses: list[float] = []
    with tqdm(total=total, desc=f"pretraining the tiny {backbone.family}", unit="step", leave=False) as bar:
        for _ in range(settings.epochs):
            order = torch.randperm(len(rows), generator=generator)
            for start in range(0, len(order), settings.batch_size):
                index = order[start : start + settings.batch_size]
                # a random square crop of the resized image (evaluation takes the centre one)
                ys = torch.randint(0, height - size + 1, (len(index),), generator=generator).tolist()
                xs = torch.randint(0, width - size + 1, (len(index),), generator=generator).tolist()
                places = zip(index.tolist(), ys, xs, strict=True)
                crops = torch.stack([stack[i, :, y : y + size, x : x + size] for i, y, x in places])
                light = 1 + 0.1 * (2 * torch.rand(len(index), 1, 1, 1, generator=generator) - 1)
                pixels = ((crops.float() / 255 * light).clamp(0, 1) - mean) / std
                texts = [caption(rows[i], rng) for i in index.tolist()]
                same = {text: n for n, text in enumerate(dict.fromkeys(texts))}
                tokens = backbone.tokenize(texts)
                image = backbone.encode_image(pixels)
                text = backbone.encode_text(tokens["input_ids"], tokens["attention_mask"])
                positives = torch.tensor([same[t] for t in texts])
                if backbone.logit_bias is None:
                    loss = contrastive_loss(image, text, backbone.logit_scale, positives)
                else:
                    loss = siglip_loss(image, text, backbone.logit_scale, backbone.logit_bias, positives)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                clamp_logit_scale(backbone.logit_scale, backbone.logit_scale_max)
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    backbone.eval()
    per_epoch = [losses[e * steps_per_epoch : (e + 1) * steps_per_epoch] for e in range(settings.epochs)]
    epoch_loss = [float(np.mean(values)) for values in per_epoch]
    return {
        "settings": settings.key(), "seed": seed, "images": len(rows), "people": settings.identities,
        "first_id": FIRST_ID, "epoch_loss": [round(v, 4) for v in epoch_loss],
        "drawing_seconds": round(drawn, 1), "seconds": round(time.time() - started, 1),
    }  # fmt: skip
