"""Projected image and text embeddings from a `CLIPModel`, on transformers 4.x and 5.x alike."""

from __future__ import annotations

import torch


def _tensor(output) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (unnormalised) image embeddings [batch, projection_dim]."""
    return _tensor(model.get_image_features(pixel_values=pixel_values))


def text_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Projected text embeddings, pooled at the end-of-text token by the model itself."""
    return _tensor(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
