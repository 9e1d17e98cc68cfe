"""What the rest of HandCLIP asks of a CLIP model: the backbone interface and its layer groups.

A `Backbone` is an `nn.Module` that owns one CLIP model with its tokenizer and preprocessing
values. Its `layer_groups(tower)` is the one partition of each tower that freeze policies,
learning-rate rules, unfreeze schedules, adapter targeting and activation caching read:

    embeddings (with the first norm) -> block 0 -> ... -> block L-1 -> final norm -> projection

ordered from input to output. Each group has a `depth`, its distance from the top as open_clip's
`lock_image_tower` counts groups: the projection has depth 0, the top block and the final norm
depth 1, block L-1-i depth 1+i, the embeddings depth L+1. "The last N blocks" are the groups of
depth 1..N, plus the projection.

Nothing outside `handclip.model` parses parameter names: implementations map their own names to
groups once, here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

TOWERS = ("vision", "text")
KINDS = ("embeddings", "block", "final_norm", "projection")


@dataclass
class LayerGroup:
    """One group of a tower: a name, where it sits, and its parameters (by model name)."""

    tower: str  # "vision" | "text"
    kind: str  # "embeddings" | "block" | "final_norm" | "projection"
    index: int  # position from the input: 0 = embeddings, 1..L = blocks, L+1 = norm, L+2 = projection
    depth: int  # distance from the top: projection 0, final norm and top block 1, embeddings L+1
    parameters: dict[str, nn.Parameter] = field(default_factory=dict)
    block: int | None = None  # the block number for kind == "block"
    norms: set[str] = field(default_factory=set)  # names of its parameters that belong to normalisation layers

    @property
    def name(self) -> str:
        """`vision.blocks.3`, `text.final_norm`, `vision.projection`, `text.embeddings`."""
        return f"{self.tower}.blocks.{self.block}" if self.kind == "block" else f"{self.tower}.{self.kind}"

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters.values())


@dataclass(frozen=True)
class TowerFacts:
    """A tower's shape, readable from a model config without weights."""

    depth: int  # number of blocks
    width: int
    heads: int
    mlp_width: int


@dataclass(frozen=True)
class BackboneFacts:
    """What configuration checks need to know about a backbone, without loading weights."""

    vision: TowerFacts
    text: TowerFacts
    projection_dim: int
    image_size: int
    patch_size: int | None = None
    context_length: int = 77

    def depth(self, tower: str) -> int:
        return self.tower(tower).depth

    def tower(self, tower: str) -> TowerFacts:
        return self.vision if tower == "vision" else self.text


class Backbone(nn.Module):
    """The interface: a CLIP model with its tokenizer and image preprocessing values.

    Subclasses implement the abstract methods; everything else is shared.
    """

    source: str

    # preprocessing values, the same in training and evaluation
    image_size: int  # side of the square crop the vision tower takes
    resize_size: int  # shortest edge images are resized to before the crop
    image_mean: list[float]
    image_std: list[float]
    # texts -> tokens, as `tokenize`, but a small picklable object (what data loader workers get)
    text_tokenizer: Any

    @property
    def facts(self) -> BackboneFacts:
        """The towers' depths, widths and sizes, as the model stands (after a replaced projection too)."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> nn.Parameter:
        """The learnable log inverse temperature (clamped to [0, ln 100] by training)."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` for `texts`, padded to the longest, truncated to the context."""
        raise NotImplementedError

    def encode_image(self, pixel_values: torch.Tensor, pre_projection: bool = False):
        """Projected, unnormalised image embeddings [batch, projection_dim].

        With `pre_projection`, the pair (pooled feature before the projection [batch, vision width],
        projected embedding), from one forward pass.
        """
        raise NotImplementedError

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected text embeddings, pooled at the end-of-text token [batch, projection_dim]."""
        raise NotImplementedError

    def layer_groups(self, tower: str) -> list[LayerGroup]:
        """The tower's groups from input to output (see the module docstring)."""
        raise NotImplementedError

    # partial forward: the first `groups` groups, then the rest of the tower from there
    def image_prefix(self, pixel_values: torch.Tensor, groups: int) -> torch.Tensor:
        """Hidden states after the first `groups` image groups (1 = embeddings only, L+1 = all blocks)."""
        raise NotImplementedError

    def image_suffix(self, hidden: torch.Tensor, groups: int, pre_projection: bool = False):
        """The image embedding from hidden states that `image_prefix(..., groups)` returned.

        With `pre_projection`, the pair (pre-projection feature, embedding), as `encode_image`.
        """
        raise NotImplementedError

    def text_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: int) -> torch.Tensor:
        """Hidden states after the first `groups` text groups."""
        raise NotImplementedError

    def text_suffix(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        """The text embedding from hidden states that `text_prefix(..., groups)` returned."""
        raise NotImplementedError

    def adapter_host(self) -> nn.Module:
        """The module that adapter targets are named relative to (peft injects into it)."""
        raise NotImplementedError

    def adapter_targets(self, tower: str, block: int) -> dict[str, str]:
        """Names (relative to `adapter_host`) of a block's linear layers, by role: q, k, v, out, fc1, fc2."""
        raise NotImplementedError

    def replace_projection(self, tower: str, dim: int, generator: torch.Generator) -> nn.Module:
        """Put a new, seeded projection of width `dim` on `tower`; return it."""
        raise NotImplementedError

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the model (safetensors), tokenizer and preprocessing so it loads without HandCLIP."""
        raise NotImplementedError

    def blocks(self, tower: str) -> list[nn.Module]:
        """The tower's repeated blocks (transformer layers), from input to output; [] for a tower without."""
        raise NotImplementedError

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (or stop)."""
        raise NotImplementedError

    def set_attention(self, implementation: str) -> None:
        """The attention kernel: `sdpa` (PyTorch's fused scaled-dot-product) or `eager` (plain matmuls)."""
        raise NotImplementedError

    # shared
    def all_groups(self) -> Iterator[LayerGroup]:
        for tower in TOWERS:
            yield from self.layer_groups(tower)

    def group_of(self) -> dict[int, LayerGroup]:
        """Parameter id -> its group (logit_scale is in none)."""
        return {id(p): group for group in self.all_groups() for p in group.parameters.values()}

    def check_partition(self) -> None:
        """Every parameter is in exactly one group, or is logit_scale: nothing escapes a policy."""
        seen: dict[int, str] = {}
        for group in self.all_groups():
            for name, parameter in group.parameters.items():
                if id(parameter) in seen:
                    raise RuntimeError(f"{name} is in both {seen[id(parameter)]} and {group.name}")
                seen[id(parameter)] = group.name
        seen[id(self.logit_scale)] = "logit_scale"
        stray = [n for n, p in self.named_parameters() if id(p) not in seen]
        if stray:
            raise RuntimeError(f"parameters outside every layer group: {', '.join(stray[:5])}")


def tower_groups(
    tower: str,
    embeddings: Mapping[str, nn.Parameter],
    blocks: Sequence[Mapping[str, nn.Parameter]],
    final_norm: Mapping[str, nn.Parameter],
    projection: Mapping[str, nn.Parameter],
) -> list[LayerGroup]:
    """A tower's groups, from input to output, with their depths, from its parameters by part."""
    depth = len(blocks)
    groups = [LayerGroup(tower, "embeddings", 0, depth + 1, dict(embeddings))]
    for number, parameters in enumerate(blocks):
        groups.append(LayerGroup(tower, "block", number + 1, depth - number, dict(parameters), block=number))
    groups.append(LayerGroup(tower, "final_norm", depth + 1, 1, dict(final_norm)))
    groups.append(LayerGroup(tower, "projection", depth + 2, 0, dict(projection)))
    return groups
