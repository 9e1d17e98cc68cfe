"""A loss term for tests: records the batch it sees (its size) in a file named by $HANDCLIP_PROBE, one line a call."""

import os

import torch

from handclip.losses import LossTerm


class BatchSizeProbe(LossTerm):
    """Adds nothing to the loss (weight 0); writes `len(inputs.image)` and this process's rank."""

    def forward(self, inputs):
        rank = os.environ.get("LOCAL_RANK", "0")
        with open(os.environ["HANDCLIP_PROBE"], "a") as handle:
            handle.write(f"{rank} {len(inputs.image)} {len(inputs.text) if inputs.text is not None else 0}\n")
        return torch.zeros((), device=inputs.image.device)
