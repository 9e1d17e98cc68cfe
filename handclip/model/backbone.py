"""What the rest of HandCLIP asks of a CLIP model: the backbone interface and its layer groups.

A `Backbone` is an `nn.Module` that owns one CLIP model with its tokenizer and preprocessing
values. Its `layer_groups(tower)` is the one partition of each tower that freeze policies,
learning-rate rules, unfreeze schedules, adapter targeting and activation caching read:

    embeddings (with the first norm) -> block 0 -> ... -> block L-1 -> final norm -> projection

ordered from input to output. Each group has a `depth`, its distance from the top as open_clip's
`lock_image_tower` counts groups: the projection has depth 0, the top block and the final norm
depth 1, block L-1-i depth 1+i, the embeddings depth L+1. "The last N blocks" are the groups of
depth 1..N, plus the projection.

Each group also carries the implementation's own `label` for it (`vision.attention_pool` for an open_clip
ResNet's attention pool, which policies treat as its final norm), so that tables show what the group is.

Besides the model itself, every implementation declares what tools need to know about it:

- its FLOPs: `forward_flops(tower, tokens)`, per group, what MFU and the dry run count;
- how its exports are written and read back: a loaded backbone names its `export_format` and how to
  load `save_pretrained`'s folder without HandCLIP (`load_hint`, `load_example`); its spec class
  (`BackboneSpec`) recognises such a folder and loads it (`recognises`, `from_export`; the registry
  in `handclip.model.exports` asks each known spec class);
- its initial weights in words, for model cards (`BackboneSpec.initial_weights`).

Nothing outside `handclip.model` parses parameter names: implementations map their own names to
groups once, here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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
    feed_forward: set[str] = field(default_factory=set)  # names of its parameters in its block's feed-forward network
    feed_forward_output: set[str] = field(default_factory=set)  # ... in that network's last linear layer (its output)
    label: str = ""  # the implementation's own name for the group (`attention_pool`, `layer4`); "" names it by kind

    @property
    def name(self) -> str:
        """What tables show: `vision.blocks.3`, `text.final_norm`, `vision.projection`, `text.embeddings`, or
        the tower and the implementation's label (`vision.attention_pool`, `vision.layer4`)."""
        if self.label:
            return f"{self.tower}.{self.label}"
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
    logit_bias: bool = False  # whether the model carries a pretrained sigmoid bias beside its scale (SigLIP)
    projection_replaceable: bool = True  # whether `projection=replace` can put new linear heads on (not on SigLIP)

    def depth(self, tower: str) -> int:
        return self.tower(tower).depth

    def tower(self, tower: str) -> TowerFacts:
        return self.vision if tower == "vision" else self.text


# why `projection=replace` is refused on a backbone whose facts say `projection_replaceable=False`
NO_LINEAR_PROJECTION = (
    "projection=replace: this backbone's image embedding is the output of an attention-pooling head (SigLIP's), with "
    "no linear projection to replace, and transformers could not load the model back with one added; use "
    "projection=keep (the head trains with the top blocks under freeze=last_n)"
)


def default_cache_dir() -> Path:
    """Where built backbones are kept: $HANDCLIP_CACHE, else ~/.cache/handclip (read when used)."""
    return Path(os.environ.get("HANDCLIP_CACHE") or Path.home() / ".cache" / "handclip")


class Backbone(nn.Module):
    """The interface: a CLIP model with its tokenizer and image preprocessing values.

    Subclasses implement the abstract methods; everything else is shared.
    """

    source: str
    # what `save_pretrained` writes: the library that loads it ("transformers", "open_clip")
    export_format: ClassVar[str]
    # a model card's front matter for such a folder (library_name, pipeline_tag)
    card_metadata: ClassVar[dict[str, str]] = {}
    family: ClassVar[str] = "CLIP"  # the model family, as cards and messages name it ("CLIP", "SigLIP")

    # preprocessing values, the same in training and evaluation
    image_size: int  # side of the square crop the vision tower takes
    # the shortest edge images are resized to before the centre crop, or (height, width) they are resized to
    # whatever their shape (SigLIP's processor squashes to the input square: the crop then takes the whole image)
    resize_size: int | tuple[int, int]
    image_mean: list[float]
    image_std: list[float]
    # texts -> tokens, as `tokenize`, but a small picklable object (what data loader workers get)
    text_tokenizer: Any
    # the largest value training lets `logit_scale` take (CLIP's clamp, ln 100), or None for no upper bound
    logit_scale_max: ClassVar[float | None] = math.log(100.0)
    # whether `tokenize` pads every caption to the context length (SigLIP), so that a caption costs the whole context
    pads_to_context: ClassVar[bool] = False

    @property
    def facts(self) -> BackboneFacts:
        """The towers' depths, widths and sizes, as the model stands (after a replaced projection too)."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> nn.Parameter:
        """The learnable log inverse temperature (clamped to [0, `logit_scale_max`] by training)."""
        raise NotImplementedError

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """A pretrained sigmoid bias beside the scale (SigLIP's b), or None: a model trained with a softmax has none.
        Like `logit_scale` it is in no layer group, and `freeze.train_logit_scale` decides whether it trains."""
        return None

    def temperature(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of `logit_scale` and, where there is one, `logit_bias`: the parameters in no group."""
        return [("logit_scale", self.logit_scale)] + ([("logit_bias", self.logit_bias)] if self.logit_bias is not None
                                                      else [])  # fmt: skip

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

    def load_hint(self, out_dir: str | Path) -> str:
        """How to load what `save_pretrained(out_dir)` wrote without HandCLIP, in one sentence."""
        raise NotImplementedError

    def load_example(self, out_dir: str) -> str:
        """Python that loads `save_pretrained(out_dir)`'s folder without HandCLIP and embeds `image` (a PIL image
        the code opens from `hand.jpg`) as `features`, a tensor [1, projection_dim]: the model card's snippet."""
        raise NotImplementedError

    def forward_flops(self, tower: str, tokens: int | None = None) -> list[float | None]:
        """Forward FLOPs of one sample through each of the tower's groups, in `layer_groups` order: matrix
        multiplies and convolutions, 2 per multiply-add (`handclip.model.flops`). `tokens` is the text length
        (the context length if None; the image tower ignores it). None for a group the backbone does not count:
        this default counts nothing, and MFU then says so."""
        return [None] * len(self.layer_groups(tower))

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
    def prefix_blocks(self, tower: str, groups: int) -> int:
        """The blocks a prefix of `groups` groups holds (1 group: the embeddings alone); a cut outside the
        tower (`image_prefix`, `text_prefix` and their suffixes) is refused."""
        depth = self.facts.depth(check_tower(tower))
        if not 1 <= groups <= depth + 1:
            raise ValueError(f"{tower} prefix of {groups} groups: must be 1 (embeddings) to {depth + 1} (all blocks)")
        return groups - 1

    def all_groups(self) -> Iterator[LayerGroup]:
        for tower in TOWERS:
            yield from self.layer_groups(tower)

    def group_of(self) -> dict[int, LayerGroup]:
        """Parameter id -> its group (logit_scale is in none)."""
        return {id(p): group for group in self.all_groups() for p in group.parameters.values()}

    def check_partition(self) -> None:
        """Every parameter is in exactly one group, or is logit_scale (or logit_bias): nothing escapes a policy."""
        seen: dict[int, str] = {}
        for group in self.all_groups():
            for name, parameter in group.parameters.items():
                if id(parameter) in seen:
                    raise RuntimeError(f"{name} is in both {seen[id(parameter)]} and {group.name}")
                seen[id(parameter)] = group.name
        seen.update({id(parameter): name for name, parameter in self.temperature()})
        stray = [n for n, p in self.named_parameters() if id(p) not in seen]
        if stray:
            raise RuntimeError(f"parameters outside every layer group: {', '.join(stray[:5])}")


def check_tower(tower: str) -> str:
    """`tower` if it is one of `TOWERS`; a ValueError naming them if not."""
    if tower not in TOWERS:
        raise ValueError(f"tower {tower!r}: choose vision or text")
    return tower


def with_norms(groups: list[LayerGroup], model: nn.Module, kinds: tuple[type, ...],
               feed_forward: Sequence[nn.Module | None] = ()) -> list[LayerGroup]:  # fmt: skip
    """`groups`, each with its `norms`: those of its parameters that belong to a layer of `model` of one of `kinds`
    (parameter names relative to `model`, as in the groups), and its `feed_forward`: those inside one of the
    blocks' feed-forward networks `feed_forward` (None for a block without one)."""
    norms = {
        f"{name}.{p}" if name else p for name, module in model.named_modules() if isinstance(module, kinds)
        for p, _ in module.named_parameters(recurse=False)
    }  # fmt: skip
    present = [module for module in feed_forward if module is not None]
    inside = {id(p) for module in present for p in module.parameters()}
    linears = [[m for m in module.modules() if isinstance(m, nn.Linear)] for module in present]
    output = {id(p) for found in linears if found for p in found[-1].parameters()}
    for group in groups:
        group.norms = norms & set(group.parameters)
        group.feed_forward = {name for name, p in group.parameters.items() if id(p) in inside}
        group.feed_forward_output = {name for name, p in group.parameters.items() if id(p) in output}
    return groups


def named(module: nn.Module | None, prefix: str) -> dict[str, nn.Parameter]:
    """A module's parameters under `prefix` (`vision_model.post_layernorm.weight`, `visual.ln_post.weight`): how
    implementations name a group's parameters; none for no module."""
    if module is None:
        return {}
    return {f"{prefix}.{name}": p for name, p in module.named_parameters()}


def group_depths(blocks: int) -> list[int]:
    """The depth of each group of a tower of `blocks` blocks, from input to output: L+1, L, ..., 1, 1, 0."""
    return [blocks + 1, *range(blocks, 0, -1), 1, 0]


def tower_groups(
    tower: str,
    embeddings: Mapping[str, nn.Parameter],
    blocks: Sequence[Mapping[str, nn.Parameter]],
    final_norm: Mapping[str, nn.Parameter],
    projection: Mapping[str, nn.Parameter],
    labels: Sequence[str] = (),
) -> list[LayerGroup]:
    """A tower's groups, from input to output, with their depths, from its parameters by part.

    `labels`: the implementation's own name of each group, in the same order (none: named by kind).
    """
    depths = group_depths(len(blocks))
    groups = [LayerGroup(tower, "embeddings", 0, depths[0], dict(embeddings))]
    for number, parameters in enumerate(blocks):
        groups.append(LayerGroup(tower, "block", number + 1, depths[number + 1], dict(parameters), block=number))
    groups.append(LayerGroup(tower, "final_norm", len(blocks) + 1, depths[-2], dict(final_norm)))
    groups.append(LayerGroup(tower, "projection", len(blocks) + 2, depths[-1], dict(projection)))
    if labels:
        if len(labels) != len(groups):
            raise ValueError(f"{len(labels)} labels for the {len(groups)} groups of the {tower} tower")
        for group, label in zip(groups, labels, strict=True):
            group.label = label
    return groups


class BackboneSpec:
    """What a `conf/backbone/*.yaml` file builds: cheap to make, `facts()` and `skeleton()` read the model
    config only, `load()` brings the weights. Its class also reads back the exports its backbones write."""

    export_format: ClassVar[str]  # as the loaded backbone's: the format its exports are written in

    def facts(self) -> BackboneFacts:
        """Depths, widths and sizes of the towers, from the model config alone (no weights)."""
        raise NotImplementedError

    def skeleton(self) -> Backbone:
        """The model's structure with no weights (on the meta device): what policies are checked on."""
        raise NotImplementedError

    def load(self, cache_dir: str | Path | None = None) -> Backbone:
        """The backbone with its weights, tokenizer and preprocessing."""
        raise NotImplementedError

    def initial_weights(self) -> str:
        """The weights training starts from, in words, for model cards (`openai/clip-vit-base-patch32`, `random
        weights (seed 0)`, `pretrained contrastively on synthetic hands ...`)."""
        raise NotImplementedError

    def base_model(self) -> str | None:
        """The Hugging Face hub repository the initial weights come from, if any (a model card's `base_model`)."""
        return None

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        """Whether `folder` is an export in this class's `export_format`, by its files (nothing is loaded)."""
        raise NotImplementedError

    @classmethod
    def from_export(cls, folder: Path) -> BackboneSpec:
        """A spec whose `load()` brings the export in `folder` back (one `recognises`); refuses, naming the file,
        an export that cannot be read safely (pickled weights)."""
        raise NotImplementedError
