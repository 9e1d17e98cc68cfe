"""The objective: weighted loss terms and every learnable part they own.

A loss term is an `nn.Module` with one signature, `term(inputs) -> scalar tensor`, where
`inputs` is a `LossInputs` (the batch's embeddings, the temperature and the identities). The
`Objective` holds the terms, sums them by weight, and is an `nn.Module` itself, so a term's
parameters (an identity classifier, a SigLIP bias) are saved in checkpoints and optimised with
the backbone.

Some terms can only be built once the data is read (an identity head needs the number of
identities): their config says `_partial_: true`, and the objective finishes them with the
run-time facts their constructor asks for by name (`num_identities`, `embed_dim`).

    _target_: handclip.losses.Objective
    _partial_: true
    terms:
      clip: {_target_: handclip.losses.ContrastiveLoss, weight: 1.0, multi_positive: true}
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from handclip.errors import ConfigError


@dataclass
class LossInputs:
    """What a loss term may read. Features are unnormalised [batch, dim]."""

    image: torch.Tensor
    text: torch.Tensor | None
    logit_scale: torch.Tensor
    identities: torch.Tensor | None = None


class LossTerm(nn.Module):
    """Base class of a loss term: a weight, and `forward(inputs) -> scalar`."""

    needs_text = False  # whether the training step must encode the captions for this term

    def __init__(self, weight: float = 1.0):
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"loss weight={weight!r} of {type(self).__name__} must be a number >= 0")
        self.weight = float(weight)

    def error(self, key: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"loss: {type(self).__name__}.{key}={value!r} must be {allowed}")

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        raise NotImplementedError


def _finish(name: str, term: Any, facts: Mapping[str, Any]) -> LossTerm:
    """A term as built by Hydra: a module, or a partial waiting for run-time facts."""
    if isinstance(term, LossTerm):
        return term
    if not callable(term):
        raise ConfigError(f"loss.terms.{name} must be a loss term with a _target_ (got {term!r})")
    try:
        wanted = inspect.signature(term).parameters
    except (TypeError, ValueError):  # a builtin: it asks for nothing
        wanted = {}
    term = term(**{k: v for k, v in facts.items() if k in wanted and v is not None})
    if not isinstance(term, LossTerm):
        raise ConfigError(f"loss.terms.{name}: {type(term).__name__} is not a handclip.losses.LossTerm")
    return term


class Objective(nn.Module):
    """Weighted sum of loss terms; owns their learnable parts."""

    def __init__(self, terms: Mapping[str, Any], num_identities: int | None = None, embed_dim: int | None = None):
        super().__init__()
        if not isinstance(terms, Mapping) or not terms:
            raise ConfigError("loss.terms is empty: give at least one loss term (see conf/loss/)")
        facts = {"num_identities": num_identities, "embed_dim": embed_dim}
        self.terms = nn.ModuleDict({name: _finish(name, term, facts) for name, term in terms.items()})

    @property
    def needs_text(self) -> bool:
        return any(term.needs_text for term in self.terms.values())

    def forward(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, each term's unweighted value)."""
        parts = {name: term(inputs) for name, term in self.terms.items()}
        total = sum(self.terms[name].weight * value for name, value in parts.items())
        return total, parts
