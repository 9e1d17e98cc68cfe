"""Batch-hard triplet loss (Hermans et al., 2017): each anchor's farthest positive and nearest negative."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from handclip.checks import flag, number
from handclip.losses.objective import FEATURES, LossInputs, LossTerm


def hardest_pairs(features: torch.Tensor, identities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance to the farthest positive, distance to the nearest negative) of each anchor, Euclidean."""
    distances = torch.cdist(features, features)
    same = identities[:, None] == identities[None, :]
    positive = distances.masked_fill(~same, float("-inf")).max(dim=1).values
    negative = distances.masked_fill(same, float("inf")).min(dim=1).values
    return positive, negative


def batch_hard_triplet(
    features: torch.Tensor, identities: torch.Tensor, margin: float | None = 0.3, normalize: bool = True
) -> torch.Tensor:
    """mean(max(0, d(a, p+) - d(a, n-) + margin)), or mean(softplus(d(a, p+) - d(a, n-))) when margin is None.

    Anchors without a positive or without a negative in the batch are left out.
    """
    features = features.float()
    if normalize:
        features = F.normalize(features, dim=-1)
    positive, negative = hardest_pairs(features, identities)
    has_positive = (identities[:, None] == identities[None, :]).sum(dim=1) > 1  # itself is not a positive
    usable = has_positive & torch.isfinite(negative)
    if not usable.any():
        return features.sum() * 0.0  # keeps the graph: a batch with no triplet contributes nothing
    gap = positive[usable] - negative[usable]
    if margin is None:
        return F.softplus(gap).mean()
    return F.relu(gap + margin).mean()


class TripletLoss(LossTerm):
    """Batch-hard triplet loss on the projected or pre-projection feature, or the mean over both (`both`, as
    CLIP-ReID); needs P x K batches (K >= 2)."""

    needs_identity_batches = True
    needs_identities = True

    def __init__(self, weight: float = 1.0, margin: float | None = 0.3, normalize: bool = True,
                 feature: str = "projected"):  # fmt: skip
        super().__init__(weight)
        if margin is not None:
            number(self.key("margin"), margin, 0, hint=", or null for the soft margin")
        flag(self.key("normalize"), normalize)
        if feature not in (*FEATURES, "both"):
            raise self.error("feature", feature, "one of " + ", ".join((*FEATURES, "both")))
        self.margin = None if margin is None else float(margin)
        self.normalize = normalize
        self.feature = feature

    @property
    def needs_pre_projection(self) -> bool:
        return self.feature != "projected"

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        names = FEATURES if self.feature == "both" else (self.feature,)
        losses = [batch_hard_triplet(inputs.feature(n), inputs.identities, self.margin, self.normalize) for n in names]
        return sum(losses) / len(losses)
