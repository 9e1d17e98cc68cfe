"""open_clip's text transformer as a tower: on the CLIP model itself (`open_clip.CLIP`), or its `text`
(`CustomTextCLIP`). Groups: embeddings = token_embedding, positional_embedding; blocks =
transformer.resblocks; final norm = ln_final; projection = text_projection (an nn.Parameter, or an
nn.Linear with `proj_bias`)."""

from __future__ import annotations

import torch
from torch import nn

from handclip.model.backbone import BackboneFacts
from handclip.model.flops import text_transformer_flops
from handclip.model.openclip.towers import (
    ParameterHead,
    TowerParts,
    mlp_targets,
    named,
    new_linear,
    new_parameter,
    run_blocks,
)

# a causal text tower sees padding only after the pooled token for these pool types, so padding can be cut
TRIMMABLE_POOLS = ("argmax", "eos", "first")


class TextTower:
    """The text transformer of an open_clip model; names relative to the model (`text.` for CustomTextCLIP)."""

    def __init__(self, model: nn.Module):
        custom = hasattr(model, "text")
        self.model = model
        self.text = model.text if custom else model
        self.prefix_name = "text." if custom else ""
        self.pool_type = getattr(self.text, "pool_type", None) or getattr(model, "text_pool_type", "argmax")
        self.eos_id = getattr(self.text, "eos_id", None) if custom else getattr(model, "text_eos_id", None)

    @property
    def context_length(self) -> int:
        return int(self.text.context_length)

    @property
    def trimmable(self) -> bool:
        """Whether padding after the longest text may be cut (a causal tower pooling at or before the end)."""
        return getattr(self.text, "attn_mask", None) is not None and self.pool_type in TRIMMABLE_POOLS

    @property
    def depth(self) -> int:
        return len(self.text.transformer.resblocks)

    def parts(self) -> TowerParts:
        text, prefix = self.text, self.prefix_name
        embeddings = named(text.token_embedding, f"{prefix}token_embedding")
        embeddings[f"{prefix}positional_embedding"] = text.positional_embedding
        blocks = [named(b, f"{prefix}transformer.resblocks.{i}") for i, b in enumerate(text.transformer.resblocks)]
        head = text.text_projection
        projection = (named(head, f"{prefix}text_projection") if isinstance(head, nn.Module)
                      else {f"{prefix}text_projection": head} if head is not None else {})  # fmt: skip
        return TowerParts(embeddings, blocks, named(text.ln_final, f"{prefix}ln_final"), projection)

    def _mask(self, length: int) -> torch.Tensor | None:
        mask = getattr(self.text, "attn_mask", None)
        return None if mask is None else mask[:length, :length]

    def prefix(self, input_ids: torch.Tensor, blocks: int) -> torch.Tensor:
        text = self.text
        length = input_ids.shape[1]
        if length > text.positional_embedding.shape[0]:
            raise ValueError(f"{length} tokens: the text tower takes at most {text.positional_embedding.shape[0]}")
        dtype = text.transformer.get_cast_dtype()
        hidden = text.token_embedding(input_ids).to(dtype) + text.positional_embedding[:length].to(dtype)
        return run_blocks(text.transformer, hidden, 0, blocks, self._mask(length))

    def suffix(self, hidden: torch.Tensor, input_ids: torch.Tensor, blocks: int) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        text = self.text
        hidden = run_blocks(text.transformer, hidden, blocks, self.depth, self._mask(input_ids.shape[1]))
        pooled = text_global_pool(text.ln_final(hidden), input_ids, self.pool_type, eos_token_id=self.eos_id)
        head = text.text_projection
        if head is None:
            return pooled
        return head(pooled) if isinstance(head, nn.Module) else pooled @ head

    def blocks(self) -> list[nn.Module]:
        return list(self.text.transformer.resblocks)

    def adapter_targets(self, block: int) -> dict[str, str]:
        return mlp_targets(f"{self.prefix_name}transformer.resblocks.{block}")

    def forward_flops(self, facts: BackboneFacts, tokens: int | None = None) -> list[float]:
        return text_transformer_flops(facts, tokens)

    def replace_projection(self, dim: int, generator: torch.Generator) -> nn.Module | None:
        text = self.text
        old = text.text_projection
        if old is None:
            return None  # nothing to replace
        if isinstance(old, nn.Linear):
            text.text_projection = head = new_linear(old, dim, generator)
        else:
            text.text_projection = new_parameter(old, dim, generator)
            head = ParameterHead(text.text_projection)
        text.output_dim = dim
        return head
