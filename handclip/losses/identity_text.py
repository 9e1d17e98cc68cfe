"""Image-to-text cross-entropy against one text embedding per training identity (CLIP-ReID stage 2's i2t).

Each training identity has an embedding in the joint space: learned directly, initialised at
random (CLIP-HandID's learned identity text), or, with `texts_from`, the encoded prompts that a
first stage learned (`IdentityPrompts`, CLIP-ReID), read from its run directory and held fixed. `i2t` classifies
each image among all identities' texts by cosine similarity times the backbone's logit scale;
`t2i` (CLIP-HandID's supervised contrastive side) asks each identity text in the batch to pick
out that identity's images among the batch's images.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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


def read_identity_texts(source: str, shape: tuple[int, int]) -> torch.Tensor:
    """The identity text embeddings a first stage wrote (a run directory or its `identity_texts.safetensors`),
    checked against this run's identities and embedding width."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(str(source))
    if source is not None and path.suffix != ".safetensors":  # a run directory
        path = path / "identity_texts.safetensors"
    where = f"loss: IdentityTextLoss.texts_from={source}"
    if source is None:
        raise ConfigError(
            "loss: IdentityTextLoss.learn_texts=false reads fixed identity texts, and texts_from is null. They come "
            "from a finished first stage (loss=clipreid_prompts): run both stages with experiment=demo_clipreid "
            "(or dorsal_hand_clipreid), or set texts_from=RUN_DIR of a first stage"
        )
    if not path.is_file():
        raise ConfigError(
            f"{where}: no file {path}. It is written by a finished first stage (loss=clipreid_prompts); "
            "run the two stages together with experiment=demo_clipreid (or dorsal_hand_clipreid)"
        )
    try:
        texts = load_file(str(path)).get("identity_texts")
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{where}: {path} cannot be read ({error})") from None
    if texts is None or tuple(texts.shape) != shape:
        found = "no identity_texts tensor" if texts is None else f"shape {tuple(texts.shape)}"
        raise ConfigError(
            f"{where}: {path} holds {found}, this run needs {shape} ({shape[0]} training identities x "
            f"embedding width {shape[1]}); the first stage must use the same data and backbone"
        )
    return texts.float()


class IdentityTextLoss(LossTerm):
    """i2t (and/or t2i) loss against one learnable text embedding per training identity."""

    def __init__(
        self, num_identities: int, embed_dim: int, weight: float = 1.0, direction: str = "i2t",
        label_smoothing: float = 0.0, learn_texts: bool = True, texts_from: str | None = None,
    ):  # fmt: skip
        super().__init__(weight)
        if direction not in DIRECTIONS:
            raise self.error("direction", direction, "one of " + ", ".join(DIRECTIONS))
        self.direction = direction
        self.label_smoothing = self.fraction("label_smoothing", label_smoothing)
        if not isinstance(learn_texts, bool):
            raise self.error("learn_texts", learn_texts, "true or false")
        shape = (int(num_identities), int(embed_dim))
        if learn_texts:
            if texts_from is not None:
                raise self.error("texts_from", texts_from, "null with learn_texts=true (texts start at random)")
            # drawn from the run's seeded generator, like every other head
            self.texts = nn.Parameter(torch.randn(shape))
        elif num_identities == 0:  # a configuration check: the identities are not known before the data is read
            self.register_buffer("texts", torch.zeros(shape))
        else:  # fixed targets: a buffer, saved in checkpoints, never optimised
            self.register_buffer("texts", read_identity_texts(texts_from, shape))

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        image, ids = inputs.image.float(), inputs.identities
        losses = []
        if self.direction in ("i2t", "both"):
            losses.append(image_to_identity_text(image, self.texts, inputs.logit_scale, ids, self.label_smoothing))
        if self.direction in ("t2i", "both"):
            losses.append(identity_text_to_image(image, self.texts, inputs.logit_scale, ids))
        return sum(losses) / len(losses)
