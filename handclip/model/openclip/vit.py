"""open_clip's `VisionTransformer` as an image tower (see `handclip.model.openclip` for its groups)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from handclip.errors import ConfigError
from handclip.model.backbone import BackboneFacts, TowerFacts
from handclip.model.flops import vision_transformer_flops
from handclip.model.openclip.towers import (
    ParameterHead,
    TowerParts,
    mlp_targets,
    named,
    new_parameter,
    run_blocks,
    square,
)


class ViTImageTower:
    """embeddings = conv1, class_embedding, positional_embedding, ln_pre; blocks = transformer.resblocks;
    final norm = ln_post; projection = proj (open_clip's own `lock_image_tower` groups)."""

    def __init__(self, visual: nn.Module):
        self.visual = visual

    @classmethod
    def module_class(cls) -> type:
        from open_clip.transformer import VisionTransformer

        return VisionTransformer

    @classmethod
    def fits(cls, vision_cfg: Mapping) -> bool:
        return not isinstance(vision_cfg.get("layers", 12), (list, tuple))

    @classmethod
    def check_config(cls, vision_cfg, key: str) -> None:
        if vision_cfg.width % vision_cfg.head_width:
            raise ConfigError(
                f"{key}.vision_cfg: width={vision_cfg.width} must be divisible by head_width={vision_cfg.head_width}"
            )

    @classmethod
    def facts(cls, vision_cfg) -> tuple[TowerFacts, int | None]:
        width = int(vision_cfg.width)
        tower = TowerFacts(int(vision_cfg.layers), width, width // int(vision_cfg.head_width),
                           int(width * vision_cfg.mlp_ratio))  # fmt: skip
        return tower, square(vision_cfg.patch_size, "vision_cfg.patch_size")

    @property
    def depth(self) -> int:
        return len(self.visual.transformer.resblocks)

    def parts(self) -> TowerParts:
        visual = self.visual
        embeddings = named(visual.conv1, "visual.conv1")
        embeddings["visual.class_embedding"] = visual.class_embedding
        embeddings["visual.positional_embedding"] = visual.positional_embedding
        embeddings.update(named(visual.ln_pre, "visual.ln_pre"))
        blocks = [named(b, f"visual.transformer.resblocks.{i}") for i, b in enumerate(visual.transformer.resblocks)]
        projection = {"visual.proj": visual.proj} if visual.proj is not None else {}
        return TowerParts(embeddings, blocks, named(visual.ln_post, "visual.ln_post"), projection)

    def prefix(self, pixel_values: torch.Tensor, blocks: int) -> torch.Tensor:
        return run_blocks(self.visual.transformer, self.visual._embeds(pixel_values), 0, blocks)

    def suffix(self, hidden: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.visual
        hidden = run_blocks(visual.transformer, hidden, blocks, self.depth)
        pooled, _ = visual._pool(hidden)
        return pooled, (pooled @ visual.proj if visual.proj is not None else pooled)

    def blocks(self) -> list[nn.Module]:
        return list(self.visual.transformer.resblocks)

    def adapter_targets(self, block: int) -> dict[str, str]:
        return mlp_targets(f"visual.transformer.resblocks.{block}")

    def forward_flops(self, facts: BackboneFacts) -> list[float]:
        return vision_transformer_flops(facts)

    def replace_projection(self, dim: int, generator: torch.Generator) -> nn.Module | None:
        if self.visual.proj is None:
            return None  # nothing to replace
        self.visual.proj = new_parameter(self.visual.proj, dim, generator)
        self.visual.output_dim = dim
        return ParameterHead(self.visual.proj)

    def hold_frozen_statistics(self, training: bool) -> None:
        """LayerNorms keep no statistics: nothing to hold."""
