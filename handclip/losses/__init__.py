"""Loss terms and the objective that holds them (plain PyTorch; no Lightning or Hydra)."""

from handclip.losses.contrastive import (  # noqa: I001 - objective first: the terms build on it
    LOGIT_SCALE_MAX,
    ContrastiveLoss,
    clamp_logit_scale,
    contrastive_loss,
    contrastive_targets,
)
from handclip.losses.objective import FEATURES, LossInputs, LossTerm, Objective
from handclip.losses.anchor import WeightAnchor
from handclip.losses.class_prompts import ClassPromptLoss
from handclip.losses.identity import BNNeck, IdentityLoss, smoothed_cross_entropy
from handclip.losses.identity_text import IdentityTextLoss, identity_text_to_image, image_to_identity_text
from handclip.losses.prompt_distillation import PromptDistillation
from handclip.losses.prompts import IdentityPrompts
from handclip.losses.pseudo_tokens import PseudoTokenLoss
from handclip.losses.siglip import SigLIPLoss, siglip_loss, siglip_targets
from handclip.losses.triplet import TripletLoss, batch_hard_triplet, hardest_pairs

__all__ = [
    "FEATURES", "LOGIT_SCALE_MAX", "BNNeck", "ClassPromptLoss", "ContrastiveLoss", "IdentityLoss", "IdentityPrompts",
    "IdentityTextLoss",
    "LossInputs", "PromptDistillation",
    "LossTerm", "Objective", "SigLIPLoss", "TripletLoss", "batch_hard_triplet", "clamp_logit_scale",
    "contrastive_loss", "contrastive_targets", "hardest_pairs", "identity_text_to_image", "image_to_identity_text",
    "siglip_loss", "siglip_targets", "smoothed_cross_entropy", "WeightAnchor", "PseudoTokenLoss",
]  # fmt: skip
