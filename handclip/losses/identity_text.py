"""Image-to-text cross-entropy against one text embedding per training identity (CLIP-ReID stage 2's i2t).

Each training identity has a learnable embedding in the joint space (in CLIP-ReID these are the
encoded learned prompts; here they are learned directly, initialised at random). `i2t` classifies
each image among all identities' texts by cosine similarity times the backbone's logit scale;
`t2i` (CLIP-HandID's supervised contrastive side) asks each identity text in the batch to pick
out that identity's images among the batch's images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


class IdentityTextLoss(LossTerm):
    """i2t (and/or t2i) loss against one learnable text embedding per training identity."""

    def __init__(
        self, num_identities: int, embed_dim: int, weight: float = 1.0, direction: str = "i2t",
        label_smoothing: float = 0.0,
    ):  # fmt: skip
        super().__init__(weight)
        if direction not in DIRECTIONS:
            raise self.error("direction", direction, "one of " + ", ".join(DIRECTIONS))
        self.direction = direction
        self.label_smoothing = self.fraction("label_smoothing", label_smoothing)
        # drawn from the run's seeded generator, like every other head
        self.texts = nn.Parameter(torch.randn(int(num_identities), int(embed_dim)))

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        image, ids = inputs.image.float(), inputs.identities
        losses = []
        if self.direction in ("i2t", "both"):
            losses.append(image_to_identity_text(image, self.texts, inputs.logit_scale, ids, self.label_smoothing))
        if self.direction in ("t2i", "both"):
            losses.append(identity_text_to_image(image, self.texts, inputs.logit_scale, ids))
        return sum(losses) / len(losses)
