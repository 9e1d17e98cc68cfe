"""The symmetric contrastive (CLIP) loss, with multi-positive targets for shared identities."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from handclip.losses.objective import LossInputs, LossTerm

LOGIT_SCALE_MAX = math.log(100.0)


def contrastive_targets(batch: int, identities: torch.Tensor | None, device=None) -> torch.Tensor:
    """Row-stochastic targets: the diagonal, or spread evenly over same-identity columns."""
    if identities is None:
        return torch.eye(batch, device=device)
    same = (identities[:, None] == identities[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    identities: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP loss: mean of image->text and text->image cross-entropy.

    Features are unnormalised [batch, dim]; `logit_scale` is the log of the temperature's
    inverse, as stored in `CLIPModel`. With `identities`, pairs of one identity are positives.
    """
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image @ text.T
    targets = contrastive_targets(len(image), identities, logits.device).to(logits.dtype)
    # same-identity relation is symmetric, so the text->image targets are the same matrix
    image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def clamp_logit_scale(logit_scale: torch.Tensor, maximum: float | None = LOGIT_SCALE_MAX) -> None:
    """Keep the learnable log-scale in [0, maximum], in place: CLIP's clamp at ln 100 by default; a backbone's own
    `logit_scale_max` (None: no upper bound, as SigLIP trains)."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, maximum)


class ContrastiveLoss(LossTerm):
    """CLIP's symmetric contrastive loss; with `multi_positive`, same-identity pairs are positives."""

    needs_text = True

    def __init__(self, weight: float = 1.0, multi_positive: bool = True):
        super().__init__(weight)
        if not isinstance(multi_positive, bool):
            raise self.error("multi_positive", multi_positive, "true or false")
        self.multi_positive = multi_positive

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        identities = inputs.identities if self.multi_positive else None
        return contrastive_loss(inputs.image, inputs.text, inputs.logit_scale, identities)
