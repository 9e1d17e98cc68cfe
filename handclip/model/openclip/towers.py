"""What the open_clip backbone asks of an image tower, and the pieces its towers share.

An image tower (`ViTImageTower`, `ResNetImageTower`) wraps `model.visual` of an open_clip model and
answers, in its own terms, what the backbone interface asks: its parameters by layer group (with its
own labels), the forward up to a cut and from it, its repeated blocks, the linear layers adapters may
target, its FLOPs and a new projection. The backbone joins one image tower and the text tower and
never asks which kind of image tower it holds. Parameter names are relative to the open_clip model
(`visual.conv1.weight`), as in its state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from handclip.checks import integer
from handclip.errors import ConfigError
from handclip.model.backbone import BackboneFacts, TowerFacts, named  # noqa: F401 - named: the towers' modules import it here


@dataclass
class TowerParts:
    """A tower's parameters by part, from input to output, and the tower's own label of each group."""

    embeddings: dict[str, nn.Parameter]
    blocks: list[dict[str, nn.Parameter]]
    final_norm: dict[str, nn.Parameter]
    projection: dict[str, nn.Parameter]
    labels: list[str] = field(default_factory=list)  # one a group; empty: the groups are named by kind


class ImageTower(Protocol):
    """An open_clip image tower, as the backbone uses it."""

    visual: nn.Module

    @classmethod
    def fits(cls, vision_cfg: Mapping) -> bool:
        """Whether an open_clip `vision_cfg` builds this kind of tower."""

    @classmethod
    def check_config(cls, vision_cfg, key: str) -> None:
        """Refuse, naming the setting, a `CLIPVisionCfg` this tower cannot be built from."""

    @classmethod
    def facts(cls, vision_cfg) -> tuple[TowerFacts, int | None]:
        """The tower's shape from a `CLIPVisionCfg`, and its patch size (None: no patches)."""

    @property
    def depth(self) -> int:
        """Its number of blocks."""

    def parts(self) -> TowerParts:
        """Its parameters by layer group, with its labels."""

    def prefix(self, pixel_values: torch.Tensor, blocks: int) -> torch.Tensor:
        """Hidden states after the embeddings and the first `blocks` blocks."""

    def suffix(self, hidden: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-projection feature, embedding) from what `prefix(..., blocks)` returned."""

    def blocks(self) -> list[nn.Module]:
        """Its repeated transformer blocks, input to output ([] for a tower without)."""

    def adapter_targets(self, block: int) -> dict[str, str]:
        """A block's linear layers by role, relative to the open_clip model."""

    def forward_flops(self, facts: BackboneFacts) -> list[float]:
        """Forward FLOPs of one image through each group, in `parts()` order."""

    def replace_projection(self, dim: int, generator: torch.Generator) -> nn.Module | None:
        """A new seeded projection of width `dim`, in the form open_clip builds (None: the tower has none)."""

    def hold_frozen_statistics(self, training: bool) -> None:
        """Before a forward: keep the statistics of frozen normalisation layers as they are."""


def square(size, key: str) -> int:
    """A square image or patch size as one integer; a rectangle is a ConfigError."""
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"{key}={list(size)}: HandCLIP's image pipeline takes square images only")
        size = size[0]
    return integer(key, size, 1)


def run_blocks(transformer: nn.Module, hidden: torch.Tensor, start: int, stop: int, mask=None) -> torch.Tensor:
    """open_clip transformer blocks start..stop-1 on [batch, length, width] hidden states."""
    if start >= stop:
        return hidden
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        hidden = hidden.transpose(0, 1)
    for block in transformer.resblocks[start:stop]:
        hidden = block(hidden, attn_mask=mask)
    return hidden if batch_first else hidden.transpose(0, 1)


def mlp_targets(layer: str) -> dict[str, str]:
    """The LoRA targets of an open_clip transformer block `layer`: its MLP (see `Roles`)."""
    return Roles({"fc1": f"{layer}.mlp.c_fc", "fc2": f"{layer}.mlp.c_proj"})


class Roles(dict):
    """A block's LoRA targets by role; a role open_clip's layers cannot offer is a ConfigError."""

    def __missing__(self, role: str):
        raise ConfigError(
            f"freeze.targets has {role}: open_clip's attention is torch's nn.MultiheadAttention, whose q, k and v "
            "share one fused in_proj_weight and whose out_proj is not called as a module, so peft's LoRA cannot "
            "adapt q, k, v or out of an open_clip backbone; use freeze.targets=[fc1,fc2] (the MLP)"
        )


class ParameterHead(nn.Module):
    """What `replace_projection` returns for a projection that is a bare nn.Parameter (`x @ proj`)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight


def new_linear(old: nn.Linear, dim: int, generator: torch.Generator) -> nn.Linear:
    """A seeded linear projection of width `dim` in place of `old` (CLIP's init scale, std = width ** -0.5)."""
    head = nn.Linear(old.in_features, dim, bias=old.bias is not None)
    with torch.no_grad():
        head.weight.normal_(0.0, old.in_features**-0.5, generator=generator)
        if head.bias is not None:
            head.bias.zero_()
    return head.to(old.weight.device, old.weight.dtype)


def new_parameter(old: nn.Parameter, dim: int, generator: torch.Generator) -> nn.Parameter:
    """A seeded [width, dim] projection matrix in place of `old` (`x @ proj`)."""
    width = old.shape[0]
    new = torch.empty(width, dim).normal_(0.0, width**-0.5, generator=generator)
    return nn.Parameter(new.to(old.device, old.dtype))
