"""An anchor to the starting weights (L2-SP: Li, Grandvalet and Davoine, 2018; ProLIP's regulariser for CLIP).

    loss = sum over the layer groups g of depth_scale ** depth(g) x sum over g's parameters that train of
           || theta - theta_start ||^2

`theta_start` are the weights as the run starts (the pretrained ones, or init_from's), the same that WiSE-FT
mixes with: the run keeps them in `initial_weights.safetensors` and a resume reads them back. Unlike weight
decay, which pulls towards 0 and so away from what pretraining learned, the anchor pulls towards the starting
point. `depth_scale` > 1 anchors the lower groups harder than the top (depth counted from the top of each tower,
the projection 0, as layer-wise learning-rate decay counts it): the general features stay, the head moves.

    terms:
      clip: {_target_: handclip.losses.ContrastiveLoss, weight: 1.0}
      anchor: {_target_: handclip.losses.WeightAnchor, weight: 0.01, depth_scale: 1.0}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from handclip.checks import number
from handclip.losses.objective import LossInputs, LossTerm


class WeightAnchor(LossTerm):
    needs_anchor = True  # the run calls `anchor_to(backbone, start)` with the starting weights before training

    def __init__(self, weight: float = 0.01, depth_scale: float = 1.0):
        super().__init__(weight)
        self.depth_scale = number(self.key("depth_scale"), depth_scale, 0)
        self._pairs: list[tuple[torch.nn.Parameter, torch.Tensor, float]] = []

    def anchor_to(self, backbone, start: Mapping[str, torch.Tensor]) -> None:
        """Pair each backbone parameter in `start` (by `named_parameters` name) with its starting value and its
        layer group's factor; parameters in no layer group (`logit_scale`) are not anchored."""
        names = {id(p): name for name, p in backbone.named_parameters()}
        self._pairs = []
        for group in backbone.all_groups():
            factor = self.depth_scale**group.depth
            for parameter in group.parameters.values():
                name = names.get(id(parameter))
                if name in start:
                    self._pairs.append((parameter, start[name], factor))

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if not self._pairs:
            raise RuntimeError("WeightAnchor was never anchored: call anchor_to() with the starting weights first")
        total = inputs.logit_scale.new_zeros((), dtype=torch.float32)
        for i, (parameter, start, factor) in enumerate(self._pairs):
            if parameter.requires_grad:  # frozen now (a gradual policy): it has not moved
                if start.device != parameter.device:  # moved once, beside the weights
                    start = start.to(parameter.device)
                    self._pairs[i] = (parameter, start, factor)
                total = total + factor * (parameter.float() - start.float()).pow(2).sum()
        return total
