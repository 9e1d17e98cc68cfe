"""Loss terms and the objective that holds them (plain PyTorch; no Lightning or Hydra)."""

from handclip.losses.contrastive import (  # noqa: I001 - objective first: contrastive builds on it
    LOGIT_SCALE_MAX,
    ContrastiveLoss,
    clamp_logit_scale,
    contrastive_loss,
    contrastive_targets,
)
from handclip.losses.objective import LossInputs, LossTerm, Objective

__all__ = [
    "LOGIT_SCALE_MAX", "ContrastiveLoss", "LossInputs", "LossTerm", "Objective", "clamp_logit_scale",
    "contrastive_loss", "contrastive_targets",
]  # fmt: skip
