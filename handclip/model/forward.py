"""The one way a batch becomes features, whatever it holds: pixels or stored activations, and text
through the text tower or a frozen tower's cache.

Training, validation, contrastive accumulation and every evaluation feed their batches through a
`Forward`:

    forward = Forward(backbone)                   # images from pixels, texts through the text tower
    forward.prefix = k                            # batches carry `hidden`: the image tower after k groups
    forward.text_cache = TextCache()              # a frozen text tower: each distinct caption encoded once
    pre, image = forward.image(batch, pre_projection=True)
    text = forward.text(batch)
    features = forward.features(batch, text=True, pre_projection=False)   # {"image", "pre_projection", "text"}

A batch is a mapping with `pixel_values` [B, 3, H, W] or `hidden` [B, tokens, width] (the image
tower's hidden states after `prefix` groups: stored activations, `handclip.data.activations`, or a
pass that ran the frozen groups once), and `input_ids` / `attention_mask` for its captions, or
`text_hidden` after `text_prefix` text groups. `ahead(batch, image_cut, text_cut)` runs a batch's
frozen groups once, so that later passes start above them (contrastive accumulation).

`frozen_prefix(backbone, freeze, epochs, tower)` is the one count of the groups from a tower's input
(embeddings, then blocks) that do not train: now (no `freeze`), or for a whole run of `epochs`
under a policy or schedule (what may be stored once).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from handclip.model.backbone import Backbone


def trains_now(backbone: Backbone, tower: str) -> bool:
    """Whether any parameter of `tower` requires a gradient."""
    return any(p.requires_grad for g in backbone.layer_groups(tower) for p in g.parameters.values())


def frozen_prefix(backbone: Backbone, freeze=None, epochs: int = 1, tower: str = "vision") -> int:
    """Groups from `tower`'s input (embeddings, then blocks; at most all of them) that do not train: now, or
    with `freeze` (a policy or schedule, after `apply_freeze`), in none of `epochs` epochs."""
    count = 0
    for group in backbone.layer_groups(tower):
        if group.kind not in ("embeddings", "block") or any(p.requires_grad for p in group.parameters.values()):
            break
        if freeze is not None and any(freeze.first_epoch(group, n, epochs) is not None for n in group.parameters):
            break
        count += 1
    return count


class Forward:
    """A backbone's forward pass from whatever a batch holds (see the module docstring)."""

    def __init__(self, backbone: Backbone, prefix: int = 0, text_cache=None):
        self.backbone = backbone
        self.prefix = prefix  # the image groups behind a batch's stored `hidden`
        self.text_cache = text_cache  # a handclip.model.caching.TextCache when the text tower stays frozen

    def image(self, batch: Mapping, pre_projection: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(pre-projection feature, or None unless asked; projected embedding) of the batch's images."""
        if "hidden" in batch:
            out = self.backbone.image_suffix(batch["hidden"], batch.get("prefix", self.prefix), pre_projection)
        else:
            out = self.backbone.encode_image(batch["pixel_values"], pre_projection)
        return out if pre_projection else (None, out)

    def text(self, batch: Mapping) -> torch.Tensor:
        """Projected embeddings of the batch's captions."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if "text_hidden" in batch:
            return self.backbone.text_suffix(batch["text_hidden"], ids, mask, batch["text_prefix"])
        if self.text_cache is not None:
            return self.text_cache(self.backbone, ids, mask)
        return self.backbone.encode_text(ids, mask)

    @torch.no_grad()
    def captions(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Projected embeddings of `texts`, tokenized by the backbone and encoded in eval mode, on the CPU: what an
        evaluation scores captions by (a frozen tower's cache answers what it has seen)."""
        device = next(self.backbone.parameters()).device
        was_training = self.backbone.training
        self.backbone.eval()
        out = []
        try:
            for start in range(0, len(texts), batch_size):
                tokens = self.backbone.tokenize(list(texts[start : start + batch_size]))
                batch = {key: value.to(device) for key, value in tokens.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out.append(self.text(batch).float().cpu())
        finally:
            self.backbone.train(was_training)
        return torch.cat(out) if out else torch.empty(0)

    def features(self, batch: Mapping, text: bool = True, pre_projection: bool = False) -> dict:
        """{"image", "pre_projection", "text"}: what a loss reads (None where not asked for)."""
        pre, image = self.image(batch, pre_projection)
        return {"image": image, "pre_projection": pre, "text": self.text(batch) if text else None}

    @torch.no_grad()
    def ahead(self, batch: Mapping, image_cut: int = 0, text_cut: int = 0) -> dict:
        """The batch with its images (from pixels) run through their first `image_cut` groups and its captions
        through their first `text_cut` (neither trains now): later passes start from there. A batch that holds
        stored activations, or captions a frozen tower's cache answers, is returned as it is."""
        batch = dict(batch)
        if image_cut and "pixel_values" in batch:
            batch["hidden"] = self.backbone.image_prefix(batch.pop("pixel_values"), image_cut)
            batch["prefix"] = image_cut
        if text_cut and "input_ids" in batch and self.text_cache is None:
            batch["text_hidden"] = self.backbone.text_prefix(batch["input_ids"], batch.get("attention_mask"), text_cut)
            batch["text_prefix"] = text_cut
        return batch
