"""open_clip's `ModifiedResNet` as an image tower (CLIP's RN50 design: 3-conv stem, 4 stages, attention pool).

Groups, with the tower's own labels: `stem` (conv1..3, bn1..3), the four stages `layer1`..`layer4`
(its "blocks"), `attention_pool` (positional embedding, q/k/v projections; policies see it as the
final norm, the group that goes with the top block) and `projection` (the pool's output projection
c_proj). BatchNorm layers whose parameters are all frozen keep their running statistics.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from handclip.errors import ConfigError
from handclip.model.backbone import BackboneFacts, TowerFacts
from handclip.model.flops import attention_pool_flops, conv_flops, conv_output
from handclip.model.openclip.towers import TowerParts, named, new_linear

STEM = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetImageTower:
    """embeddings = the stem; blocks = the four stages; final norm = the attention pool without its output
    projection; projection = attnpool.c_proj."""

    def __init__(self, visual: nn.Module):
        self.visual = visual

    @classmethod
    def module_class(cls) -> type:
        from open_clip.modified_resnet import ModifiedResNet

        return ModifiedResNet

    @classmethod
    def fits(cls, vision_cfg: Mapping) -> bool:
        return isinstance(vision_cfg.get("layers"), (list, tuple))

    @classmethod
    def check_config(cls, vision_cfg, key: str) -> None:
        if len(vision_cfg.layers) != 4:
            raise ConfigError(f"{key}.vision_cfg.layers={list(vision_cfg.layers)}: a ModifiedResNet has 4 stages")
        if (vision_cfg.width * 32) % vision_cfg.head_width:
            raise ConfigError(f"{key}.vision_cfg: width*32={vision_cfg.width * 32} must be divisible by head_width")

    @classmethod
    def facts(cls, vision_cfg) -> tuple[TowerFacts, int | None]:
        width = vision_cfg.width * 32  # its final feature width
        return TowerFacts(len(STAGES), width, width // vision_cfg.head_width, vision_cfg.width * 8), None

    @property
    def depth(self) -> int:
        return len(STAGES)

    def _stages(self) -> list[nn.Module]:
        return [getattr(self.visual, stage) for stage in STAGES]

    def parts(self) -> TowerParts:
        visual = self.visual
        embeddings: dict[str, nn.Parameter] = {}
        for part in STEM:
            embeddings.update(named(getattr(visual, part), f"visual.{part}"))
        blocks = [named(getattr(visual, stage), f"visual.{stage}") for stage in STAGES]
        pool = named(visual.attnpool, "visual.attnpool")
        projection = {n: p for n, p in pool.items() if n.startswith("visual.attnpool.c_proj.")}
        attention = {n: p for n, p in pool.items() if n not in projection}
        return TowerParts(embeddings, blocks, attention, projection,
                          labels=["stem", *STAGES, "attention_pool", "projection"])  # fmt: skip

    def prefix(self, pixel_values: torch.Tensor, blocks: int) -> torch.Tensor:
        hidden = self.visual.stem(pixel_values.to(self.visual.conv1.weight.dtype))
        for stage in self._stages()[:blocks]:
            hidden = stage(hidden)
        return hidden

    def suffix(self, hidden: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        for stage in self._stages()[blocks:]:
            hidden = stage(hidden)
        # the attention pool is the projection: before it, the average-pooled map (as CLIP-ReID's RN50)
        return hidden.mean(dim=(2, 3)), self.visual.attnpool(hidden)

    def blocks(self) -> list[nn.Module]:
        return []  # the stages are convolutions, not transformer blocks

    def adapter_targets(self, block: int) -> dict[str, str]:
        raise ConfigError(
            "freeze=lora: the ModifiedResNet image tower's stages are convolutions, not the attention/MLP linear "
            "layers LoRA targets here; use freeze.towers=[text] with a ResNet backbone"
        )

    def forward_flops(self, facts: BackboneFacts) -> list[float]:
        """The stem's and the stages' convolutions, the attention pool, its output projection."""
        visual, size = self.visual, facts.image_size
        stem = 0.0
        for conv in (visual.conv1, visual.conv2, visual.conv3):
            size = conv_output(size, conv)
            stem += conv_flops(conv, size)
        size //= 2  # the stem's average pool
        stages = []
        for stage in self._stages():
            total = 0.0
            for block in stage:  # open_clip's Bottleneck: 1x1, 3x3, average pool by the stride, 1x1
                total += conv_flops(block.conv1, size) + conv_flops(block.conv2, size)
                size //= block.stride
                total += conv_flops(block.conv3, size)
                if block.downsample is not None:  # average pool, then a 1x1 convolution
                    total += sum(conv_flops(m, size) for m in block.downsample if isinstance(m, nn.Conv2d))
            stages.append(total)
        pool = visual.attnpool
        attention, projection = attention_pool_flops(size * size + 1, pool.q_proj.in_features, pool.c_proj.out_features)
        return [stem, *stages, attention, projection]

    def replace_projection(self, dim: int, generator: torch.Generator) -> nn.Module | None:
        self.visual.attnpool.c_proj = head = new_linear(self.visual.attnpool.c_proj, dim, generator)
        self.visual.output_dim = dim
        return head

    def hold_frozen_statistics(self, training: bool) -> None:
        """In training, a BatchNorm whose parameters are all frozen runs in eval mode (its statistics stay)."""
        if not training:
            return
        for module in self.visual.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                parameters = list(module.parameters(recurse=False))
                module.train(not parameters or any(p.requires_grad for p in parameters))
