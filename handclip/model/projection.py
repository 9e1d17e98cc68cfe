"""The projection choice: keep the backbone's projections, or put new ones on.

_target_: handclip.model.projection.Keep
_target_: handclip.model.projection.Replace   # new heads, always trainable, seeded init
dim: 256
towers: [vision, text]                       # replacing one tower is allowed only at the other's width
seed: 0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from handclip.checks import integer
from handclip.errors import ConfigError
from handclip.model.backbone import NO_LINEAR_PROJECTION, TOWERS, Backbone, BackboneFacts


class Keep:
    """The backbone's own projections."""

    def check(self, facts: BackboneFacts) -> None:
        """Nothing to check."""

    def apply(self, backbone: Backbone) -> list[nn.Parameter]:
        """Nothing changes; no new parameters."""
        return []


class Replace:
    """New projection heads of width `dim` on `towers`, seeded; they train under any freeze policy."""

    def __init__(self, dim: int, towers: Sequence[str] = TOWERS, seed: int = 0):
        integer("projection.dim", dim, 1)
        towers = [towers] if isinstance(towers, str) else list(towers or TOWERS)
        bad = [t for t in towers if t not in TOWERS]
        if bad:
            raise ConfigError(f"projection.towers has {bad[0]!r}; allowed values are {', '.join(TOWERS)}")
        integer("projection.seed", seed)
        self.dim, self.towers, self.seed = dim, sorted(set(towers)), seed

    def check(self, facts: BackboneFacts) -> None:
        """Both towers must end at one width, on a backbone whose projections are linear heads."""
        if not facts.projection_replaceable:
            raise ConfigError(NO_LINEAR_PROJECTION)
        current = facts.projection_dim
        if len(self.towers) == 1 and self.dim != current:
            kept = "text" if self.towers[0] == "vision" else "vision"
            raise ConfigError(
                f"projection.towers=[{self.towers[0]}] with projection.dim={self.dim} leaves the {kept} "
                f"projection at {current}: both towers must share one width. Replace both "
                f"(projection.towers=[vision,text]) or use projection.dim={current}"
            )

    def apply(self, backbone: Backbone) -> list[nn.Parameter]:
        """Put the new heads on `backbone`; return their parameters."""
        generator = torch.Generator().manual_seed(self.seed)
        heads = [backbone.replace_projection(tower, self.dim, generator) for tower in self.towers]
        return [p for head in heads for p in head.parameters()]
