"""SigLIP's pairwise sigmoid loss, with a learnable scale and bias and same-identity positives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from handclip.checks import flag, number
from handclip.losses.objective import LossInputs, LossTerm


def siglip_targets(batch: int, identities: torch.Tensor | None, device=None) -> torch.Tensor:
    """+1 for positive pairs (the diagonal, or every same-identity pair), -1 for the others."""
    if identities is None:
        positive = torch.eye(batch, device=device, dtype=torch.bool)
    else:
        positive = identities[:, None] == identities[None, :]
    return positive.float() * 2 - 1


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    log_scale: torch.Tensor,
    bias: torch.Tensor,
    identities: torch.Tensor | None = None,
) -> torch.Tensor:
    """-1/|B| sum_ij log sigmoid(z_ij (t x_i.y_j + b)), with t = exp(log_scale) and z_ij = +-1.

    Every image-text pair is its own binary problem, so several positives per row need no
    renormalisation (unlike the softmax of the CLIP loss).
    """
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    logits = log_scale.exp() * image @ text.T + bias
    targets = siglip_targets(len(image), identities, logits.device).to(logits.dtype)
    return -F.logsigmoid(targets * logits).sum() / len(image)


class SigLIPLoss(LossTerm):
    """SigLIP's sigmoid loss, with the scale and bias of the backbone where it has pretrained ones (a SigLIP
    backbone: `logit_scale` and `logit_bias`, trained with the model and exported with it, as the model was made);
    otherwise with its own, initialised as in the paper (t' = `init_log_scale` = ln 10, b = `init_bias` = -10).

    A CLIP backbone's `logit_scale` is tuned for CLIP's softmax (about ln 100 after pre-training), which with a
    bias of -10 would start far from SigLIP's operating point, so with CLIP the term learns its own pair.
    """

    needs_text = True

    def __init__(
        self, weight: float = 1.0, multi_positive: bool = True, init_log_scale: float = math.log(10.0),
        init_bias: float = -10.0, backbone_logit_bias: bool = False,
    ):  # fmt: skip
        super().__init__(weight)
        self.multi_positive = flag(self.key("multi_positive"), multi_positive)
        number(self.key("init_log_scale"), init_log_scale)
        number(self.key("init_bias"), init_bias)
        # a backbone with a pretrained bias (the run's fact `backbone_logit_bias`): its scale and bias are the loss's
        self.pretrained = flag(self.key("backbone_logit_bias"), backbone_logit_bias)
        if not self.pretrained:
            self.log_scale = nn.Parameter(torch.tensor(float(init_log_scale)))
            self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        identities = inputs.identities if self.multi_positive else None
        if self.pretrained:
            if inputs.logit_bias is None:
                raise ValueError("SigLIPLoss was built for a backbone with a pretrained bias, and was given none")
            return siglip_loss(inputs.image, inputs.text, inputs.logit_scale, inputs.logit_bias, identities)
        return siglip_loss(inputs.image, inputs.text, self.log_scale, self.bias, identities)
