"""Identity classification through a BN-neck (the strong re-ID baseline's head), with label smoothing.

The BN-neck is a `BatchNorm1d` whose shift (bias) is fixed at zero, followed by a bias-free
linear classifier over the training identities. The feature before the neck serves metric
losses (triplet); the feature after it serves classification, and can be the evaluation
feature (`eval.feature=bnneck`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from handclip.losses.objective import FEATURES, LossInputs, LossTerm

HEAD_FEATURES = ("projected", "pre_projection", "both")


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against (1 - e) one-hot + e / classes (Szegedy et al.; the strong baseline's e = 0.1)."""
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


class BNNeck(nn.Module):
    """BatchNorm1d without a learned shift, then a bias-free linear classifier."""

    def __init__(self, dim: int, num_identities: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.norm.bias.requires_grad_(False)  # the shift stays 0: "BN without bias" of the strong baseline
        self.classifier = nn.Linear(dim, num_identities, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Identity logits [batch, identities]."""
        return self.classifier(self.norm(feature.float()))

    def normalised(self, feature: torch.Tensor) -> torch.Tensor:
        """The neck's output with its running statistics (evaluation), whatever mode the module is in."""
        norm = self.norm
        return F.batch_norm(
            feature.float(), norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
        )


class IdentityLoss(LossTerm):
    """Label-smoothed identity cross-entropy through a BN-neck on the projected and/or pre-projection feature.

    With `feature: both`, each feature has its own neck and classifier and the loss is their mean.
    """

    needs_identity_batches = True
    needs_identities = True

    def __init__(
        self, num_identities: int, embed_dim: int, pre_projection_dim: int | None = None, weight: float = 1.0,
        feature: str = "projected", label_smoothing: float = 0.1,
    ):  # fmt: skip
        super().__init__(weight)
        if feature not in HEAD_FEATURES:
            raise self.error("feature", feature, "one of " + ", ".join(HEAD_FEATURES))
        if feature != "projected" and pre_projection_dim is None:
            raise self.error("feature", feature, "projected (the backbone's pre-projection width is unknown)")
        self.feature = feature
        self.label_smoothing = self.fraction("label_smoothing", label_smoothing)
        widths = {"projected": embed_dim, "pre_projection": pre_projection_dim}
        used = FEATURES if feature == "both" else (feature,)
        self.necks = nn.ModuleDict({name: BNNeck(int(widths[name]), int(num_identities)) for name in used})

    @property
    def needs_pre_projection(self) -> bool:
        return "pre_projection" in self.necks

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        losses = [
            smoothed_cross_entropy(neck(inputs.feature(name)), inputs.identities, self.label_smoothing)
            for name, neck in self.necks.items()
        ]  # fmt: skip
        return sum(losses) / len(losses)

    def identity_probabilities(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each image's probability of each training identity [batch, identities], by the classifier(s) on the
        neck(s) with their running statistics, averaged over the necks: what `val/id_accuracy` reads."""
        probabilities = [F.softmax(neck.classifier(neck.normalised(features[name])), dim=-1)
                         for name, neck in self.necks.items()]  # fmt: skip
        return sum(probabilities) / len(probabilities)

    def neck_features(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The evaluation feature after the neck(s): L2-normalised and concatenated when there are two."""
        outputs = [self.necks[name].normalised(features[name]) for name in self.necks]
        if len(outputs) == 1:
            return outputs[0]
        return torch.cat([F.normalize(output, dim=-1) for output in outputs], dim=-1)
