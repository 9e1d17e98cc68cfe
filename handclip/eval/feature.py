"""Which image feature is scored (`eval.feature`): the same in validation, the test protocol and the baseline.

- `projected`: the CLIP image embedding (what zero-shot CLIP compares).
- `pre_projection`: the image tower's pooled feature before the projection.
- `bnneck`: the identity loss's BN-neck output (running statistics); with necks on both features,
  the two outputs, each L2-normalised, concatenated (CLIP-ReID's and CLIP-HandID's test feature).
- `concat`: the pre-projection and projected features, each L2-normalised, concatenated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from handclip.errors import ConfigError

EVAL_FEATURES = ("projected", "pre_projection", "bnneck", "concat")


class ImageEncoder:
    """`encoder(forward, batch) -> [batch, dim]`: the evaluation feature chosen by `eval.feature`, of a batch
    fed through a `handclip.model.forward.Forward` (pixels or stored hidden states alike)."""

    def __init__(self, feature: str = "projected", objective=None):
        if feature not in EVAL_FEATURES:
            raise ConfigError(f"eval.feature={feature!r}: choose one of {', '.join(EVAL_FEATURES)}")
        self.neck = objective.neck() if objective is not None else None
        if feature == "bnneck" and self.neck is None:
            raise ConfigError(
                "eval.feature=bnneck needs a BN-neck: add an identity term to loss.terms "
                "(_target_: handclip.losses.IdentityLoss, as in conf/loss/strong.yaml), or choose projected"
            )
        self.feature = feature

    def __call__(self, forward, batch) -> torch.Tensor:
        return self.from_outputs(*forward.image(batch, pre_projection=self.feature != "projected"))

    def from_outputs(self, pre: torch.Tensor | None, projected: torch.Tensor) -> torch.Tensor:
        """The feature from the image tower's two outputs, the pre-projection feature and the embedding."""
        if self.feature == "projected":
            return projected
        if self.feature == "pre_projection":
            return pre
        if self.feature == "concat":
            return torch.cat([F.normalize(pre.float(), dim=-1), F.normalize(projected.float(), dim=-1)], dim=-1)
        return self.neck.neck_features({"projected": projected, "pre_projection": pre})
