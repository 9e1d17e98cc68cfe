"""Averages of weights: the EMA a run keeps in its checkpoints, and uniform averages (model soups)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

PREFIX = "backbone."  # checkpoint names, as in the training module's state_dict


def ema_weights(checkpoint: Mapping) -> dict[str, torch.Tensor] | None:
    """The averaged backbone weights a training checkpoint holds (backbone state_dict names), or None."""
    saved = checkpoint.get("ema")
    if not saved:
        return None
    return {name.removeprefix(PREFIX): tensor for name, tensor in saved["state"].items()}


def average_states(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of state dicts with the same keys and shapes (in float32, cast back);
    tensors that are not floating point (position ids) are taken from the first."""
    first = states[0]
    averaged = {}
    for name, tensor in first.items():
        if not tensor.is_floating_point():
            averaged[name] = tensor.clone()
            continue
        total = torch.stack([state[name].float() for state in states]).mean(0)
        averaged[name] = total.to(tensor.dtype)
    return averaged
