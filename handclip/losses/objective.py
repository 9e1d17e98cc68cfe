"""The objective: weighted loss terms and every learnable part they own.

A loss term is an `nn.Module` with one signature, `term(inputs) -> scalar tensor`, where
`inputs` is a `LossInputs` (the batch's embeddings, the temperature and the identities). The
`Objective` holds the terms, sums them by weight, and is an `nn.Module` itself, so a term's
parameters (an identity classifier, a SigLIP bias) are saved in checkpoints and optimised with
the backbone.

Some terms can only be built once the data is read (an identity head needs the number of
identities): their config says `_partial_: true`, and the objective finishes them with the
run-time facts their constructor asks for by name (`num_identities`, `embed_dim` (the projected
width), `pre_projection_dim` (the image tower's width before the projection), `text_width`
(the text tower's token width), `identity_keys` (the training identities in the order heads
number them), `text_tower` (a digest of the text tower's weights, where a term reads texts
another run encoded) and `prompt_tasks` (the data's zero-shot prompt tasks, {task: [prompt per class]},
in the order the batch's `labels` number the classes) and `zero_shot_tasks` (every task's prompts, all the
classes it names) and `backbone_logit_bias` (whether the backbone has a pretrained sigmoid bias: SigLIP's)).

A term may also leave files behind: `artifacts(backbone) -> {name: tensor}` is written by a
finished run as `<name>.safetensors` in its run directory (the learned identity texts that a
second stage reads).

    _target_: handclip.losses.Objective
    _partial_: true
    terms:
      clip: {_target_: handclip.losses.ContrastiveLoss, weight: 1.0, multi_positive: true}
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from handclip.checks import fraction, number
from handclip.errors import ConfigError

FEATURES = ("projected", "pre_projection")  # the image features a term can ask for


@dataclass
class LossInputs:
    """What a loss term may read. Features are unnormalised [batch, dim].

    `image` is the projected image embedding; `image_pre_projection` the image tower's pooled
    feature before the projection, given when a term asks for it (`needs_pre_projection`).
    """

    image: torch.Tensor
    text: torch.Tensor | None
    logit_scale: torch.Tensor
    identities: torch.Tensor | None = None
    image_pre_projection: torch.Tensor | None = None
    backbone: Any = None  # given to terms that run a tower themselves (`needs_backbone`)
    # each image's class of each zero-shot prompt task the data names [batch, tasks], -1 where it has none
    labels: torch.Tensor | None = None
    index: torch.Tensor | None = None  # each image's position in the training split
    logit_bias: torch.Tensor | None = None  # the backbone's pretrained sigmoid bias (SigLIP's), None for CLIP's

    def feature(self, name: str) -> torch.Tensor:
        """The image feature `projected` or `pre_projection`."""
        feature = self.image if name == "projected" else self.image_pre_projection
        if feature is None:
            raise ValueError(f"the {name} image feature was not computed for this batch")
        return feature


class LossTerm(nn.Module):
    """Base class of a loss term: a weight, and `forward(inputs) -> scalar`."""

    needs_text = False  # whether the training step must encode the captions for this term
    needs_pre_projection = False  # whether it reads the pre-projection image feature
    needs_identity_batches = False  # whether it needs P x K batches (K >= 2 images of each identity)
    # whether it learns or compares identities (a class, a text or a prompt per identity; positives of one
    # identity): data without identities (the image-text retrieval protocol) refuses it
    needs_identities = False
    needs_backbone = False  # whether it runs a tower itself (learned prompts): `inputs.backbone` is set
    needs_labels = False  # whether it reads the images' classes of the data's prompt tasks (`inputs.labels`)
    # whether the run calls its `teach(backbone, features)` with the starting model's embeddings of the training
    # images (evaluation view) before training; it then reads `inputs.index`
    needs_teacher = False
    # whether the run calls its `anchor_to(backbone, start)` with the starting weights of what trains (by parameter
    # name) before training, the same a resume reads back
    needs_anchor = False
    # whether it reads or writes what the text tower encoded (identity texts): it is then given `text_tower`,
    # the digest of the text tower's weights, to record beside what it writes or to check what it reads against
    needs_text_tower = False
    embeddings: tuple[str, ...] = ()  # its parameters that are embeddings (learned words, texts): never decayed
    # its buffers that record its own run, not weights (LwF's targets): saved for a resume, never taken by init_from
    run_records: tuple[str, ...] = ()

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = number(self.key("weight"), weight, 0)

    def key(self, name: str) -> str:
        """How messages name one of the term's settings: `loss: TripletLoss.margin`."""
        return f"loss: {type(self).__name__}.{name}"

    def error(self, key: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"{self.key(key)}={value!r} must be {allowed}")

    def fraction(self, key: str, value: Any) -> float:
        """`value` as a number in [0, 1), or a one-line error naming `key`."""
        return fraction(self.key(key), value)

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

    def __init__(
        self, terms: Mapping[str, Any], num_identities: int | None = None, embed_dim: int | None = None,
        pre_projection_dim: int | None = None, text_width: int | None = None,
        identity_keys: Sequence[str] | None = None, text_tower: str | None = None,
        prompt_tasks: Mapping[str, Sequence[str]] | None = None,
        zero_shot_tasks: Mapping[str, Sequence[str]] | None = None, backbone_logit_bias: bool | None = None,
    ):  # fmt: skip
        super().__init__()
        if not isinstance(terms, Mapping) or not terms:
            raise ConfigError("loss.terms is empty: give at least one loss term (see conf/loss/)")
        facts = {"num_identities": num_identities, "embed_dim": embed_dim, "pre_projection_dim": pre_projection_dim,
                 "text_width": text_width, "identity_keys": identity_keys, "text_tower": text_tower,
                 "prompt_tasks": prompt_tasks, "zero_shot_tasks": zero_shot_tasks,
                 "backbone_logit_bias": backbone_logit_bias}  # fmt: skip
        self.terms = nn.ModuleDict({name: _finish(name, term, facts) for name, term in terms.items()})
        if not any(term.weight > 0 for term in self.terms.values()):
            raise ConfigError(
                f"loss: every term has weight 0 ({', '.join(self.terms)}): the loss would be 0 and nothing would "
                "train; give at least one term a weight above 0"
            )

    @property
    def needs_text(self) -> bool:
        return any(term.needs_text for term in self.terms.values())

    @property
    def needs_pre_projection(self) -> bool:
        return any(term.needs_pre_projection for term in self.terms.values())

    @property
    def needs_backbone(self) -> bool:
        return any(term.needs_backbone for term in self.terms.values())

    @property
    def needs_labels(self) -> bool:
        return any(term.needs_labels for term in self.terms.values())

    @property
    def needs_text_tower(self) -> bool:
        return any(term.needs_text_tower for term in self.terms.values())

    def artifacts(self, backbone) -> dict[str, torch.Tensor]:
        """What the terms leave behind after training, by file name (without `.safetensors`)."""
        found: dict[str, torch.Tensor] = {}
        for term in self.terms.values():
            if hasattr(term, "artifacts"):
                found.update(term.artifacts(backbone))
        return found

    def embedding_names(self) -> set[str]:
        """Names (as in `named_parameters`) of the terms' embedding parameters, which weight decay leaves alone."""
        return {f"terms.{name}.{p}" for name, term in self.terms.items() for p in term.embeddings}

    def terms_needing(self, need: str) -> list[str]:
        """Names of the terms with `need` (e.g. `needs_identity_batches`) set."""
        return [name for name, term in self.terms.items() if getattr(term, need)]

    def identity_head(self) -> LossTerm | None:
        """The first term that classifies images into the training identities (`identity_probabilities`), if any."""
        return next((term for term in self.terms.values() if hasattr(term, "identity_probabilities")), None)

    def neck(self) -> LossTerm | None:
        """The first term with a BN-neck (an identity loss), whose output can be the evaluation feature."""
        return next((term for term in self.terms.values() if hasattr(term, "neck_features")), None)

    def forward(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, each term's unweighted value)."""
        parts = {name: term(inputs) for name, term in self.terms.items()}
        total = sum(self.terms[name].weight * value for name, value in parts.items())
        return total, parts
