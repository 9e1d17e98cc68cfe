"""Image-to-text cross-entropy against one text embedding per training identity (CLIP-ReID stage 2's i2t).

Each training identity has an embedding in the joint space: learned directly, initialised at
random (CLIP-HandID's learned identity text), or, with `texts_from`, the encoded prompts that a
first stage learned (`IdentityPrompts`, CLIP-ReID), read from its run directory and held fixed. `i2t` classifies
each image among all identities' texts by cosine similarity times the backbone's logit scale;
`t2i` (CLIP-HandID's supervised contrastive side) asks each identity text in the batch to pick
out that identity's images among the batch's images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from handclip.checks import flag
from handclip.errors import ConfigError
from handclip.losses.contrastive import contrastive_targets
from handclip.losses.identity import smoothed_cross_entropy
from handclip.losses.objective import LossInputs, LossTerm

DIRECTIONS = ("i2t", "t2i", "both")


def image_to_identity_text(
    image_features: torch.Tensor, identity_texts: torch.Tensor, logit_scale: torch.Tensor, identities: torch.Tensor,
    smoothing: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Cross-entropy of each image over every identity's text: logits = exp(logit_scale) cos(image, text)."""
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(identity_texts, dim=-1).T
    return smoothed_cross_entropy(logits, identities, smoothing)


def identity_text_to_image(
    image_features: torch.Tensor, identity_texts: torch.Tensor, logit_scale: torch.Tensor, identities: torch.Tensor
) -> torch.Tensor:
    """Supervised contrastive text->image: the text of each row's identity against the batch's images."""
    texts = F.normalize(identity_texts[identities], dim=-1)
    logits = logit_scale.exp() * texts @ F.normalize(image_features, dim=-1).T
    targets = contrastive_targets(len(texts), identities, logits.device).to(logits.dtype)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def texts_file(source: str) -> Path:
    """The identity texts' file: `source` itself, or `identity_texts.safetensors` in a run directory."""
    path = Path(str(source))
    return path if path.suffix == ".safetensors" else path / "identity_texts.safetensors"


def check_identity_texts(
    source: str | None, embed_dim: int | None = None, identities: Sequence[str] | None = None,
    text_tower: str | None = None,
) -> None:  # fmt: skip
    """Refuse, naming what differs, identity texts that are missing or were made for other training identities
    (their order included), another embedding width or another text tower (`text_tower`: its weights' digest).
    Reads the file's header only."""
    from safetensors import SafetensorError, safe_open

    if source is None:
        raise ConfigError(
            "loss: IdentityTextLoss.learn_texts=false reads fixed identity texts, and texts_from is null. They come "
            "from a finished first stage (loss=clipreid_prompts): run both stages with experiment=demo_clipreid "
            "(or dorsal_hand_clipreid), or set loss.terms.identity_text.texts_from=RUN_DIR of a first stage"
        )
    path = texts_file(source)
    where = f"loss: IdentityTextLoss.texts_from={source}"
    if not path.is_file():
        staged = path.parent / "1-prompts" / path.name
        hint = f" (a run in stages keeps it in its first stage's folder: {staged.parent})" if staged.is_file() else ""
        raise ConfigError(
            f"{where}: no file {path}{hint}. It is written by a finished first stage (loss=clipreid_prompts); "
            "run the two stages together with experiment=demo_clipreid (or dorsal_hand_clipreid)"
        )
    try:
        with safe_open(str(path), "pt") as handle:
            names, facts = list(handle.keys()), handle.metadata() or {}
            shape = tuple(handle.get_slice("identity_texts").get_shape()) if "identity_texts" in names else None
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{where}: {path} cannot be read ({error})") from None
    if shape is None or len(shape) != 2:
        raise ConfigError(f"{where}: {path} holds no identity_texts tensor [identities, width]")
    same_data = "the first stage must use this run's data, split and backbone"
    if embed_dim is not None and shape[1] != embed_dim:
        raise ConfigError(f"{where}: {path} holds texts of width {shape[1]}, this run's embedding width is "
                          f"{embed_dim}; {same_data}")  # fmt: skip
    if identities is not None:
        identities = [str(i) for i in identities]
        saved = json.loads(facts["identities"]) if "identities" in facts else None
        if shape[0] != len(identities):
            raise ConfigError(f"{where}: {path} holds texts of {shape[0]} identities, this run trains "
                              f"{len(identities)}; {same_data}")  # fmt: skip
        if saved is not None and saved != identities:
            first = next(n for n, (a, b) in enumerate(zip(saved, identities, strict=True)) if a != b)
            raise ConfigError(f"{where}: {path} was learned for other training identities (text {first} is "
                              f"identity {saved[first]}, here {identities[first]}); {same_data}")  # fmt: skip
    saved_tower = facts.get("text_tower")
    if text_tower is not None and saved_tower is not None and saved_tower != text_tower:
        raise ConfigError(f"{where}: {path} was encoded by another text tower (weights {saved_tower}, this "
                          f"run's {text_tower}); {same_data}")  # fmt: skip


def read_identity_texts(
    source: str | None, shape: tuple[int, int], identities: Sequence[str] | None = None,
    text_tower: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """The identity text embeddings a first stage wrote (a run directory or its `identity_texts.safetensors`),
    checked against this run's identities and embedding width (see `check_identity_texts`)."""
    from safetensors.torch import load_file

    check_identity_texts(source, shape[1], identities, text_tower)
    texts = load_file(str(texts_file(source)))["identity_texts"]
    if tuple(texts.shape) != shape:
        raise ConfigError(
            f"loss: IdentityTextLoss.texts_from={source}: {texts_file(source)} holds texts of shape "
            f"{tuple(texts.shape)}, this run needs {shape}; the first stage must use this run's data and backbone"
        )
    return texts.float()


class IdentityTextLoss(LossTerm):
    """i2t (and/or t2i) loss against one learnable text embedding per training identity."""

    embeddings = ("texts",)
    needs_identities = True

    def __init__(
        self, num_identities: int, embed_dim: int, weight: float = 1.0, direction: str = "i2t",
        label_smoothing: float = 0.0, learn_texts: bool = True, texts_from: str | None = None,
        identity_keys: Sequence[str] | None = None, text_tower: str | None = None,
    ):  # fmt: skip
        super().__init__(weight)
        if direction not in DIRECTIONS:
            raise self.error("direction", direction, "one of " + ", ".join(DIRECTIONS))
        self.direction = direction
        self.label_smoothing = self.fraction("label_smoothing", label_smoothing)
        flag(self.key("learn_texts"), learn_texts)
        shape = (int(num_identities), int(embed_dim))
        self.texts_from = None if learn_texts else texts_from
        self.needs_text_tower = self.texts_from is not None  # reads texts another run's text tower encoded
        if learn_texts:
            if texts_from is not None:
                raise self.error("texts_from", texts_from, "null with learn_texts=true (texts start at random)")
            # drawn from the run's seeded generator, like every other head
            self.texts = nn.Parameter(torch.randn(shape))
        elif num_identities == 0:  # a configuration check: the identities are not known before the data is read
            if texts_from is None:
                check_identity_texts(None)  # the error: where fixed texts come from
            self.register_buffer("texts", torch.zeros(shape))
        else:  # fixed targets: a buffer, saved in checkpoints, never optimised
            self.register_buffer("texts", read_identity_texts(texts_from, shape, identity_keys, text_tower))

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        image, ids = inputs.image.float(), inputs.identities
        losses = []
        if self.direction in ("i2t", "both"):
            losses.append(image_to_identity_text(image, self.texts, inputs.logit_scale, ids, self.label_smoothing))
        if self.direction in ("t2i", "both"):
            losses.append(identity_text_to_image(image, self.texts, inputs.logit_scale, ids))
        return sum(losses) / len(losses)
