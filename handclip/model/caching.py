"""What stays frozen for a whole run, and so can be computed once: the image tower's frozen prefix
and a frozen text tower.

`frozen_prefix(backbone, freeze, epochs)` (`handclip.model.forward`) is k, the number of image groups (embeddings, then
blocks, from the input) whose parameters never train in the run: their output for a given image
never changes, so `image_prefix(pixels, k)` can be stored and training runs `image_suffix` only.
A schedule that unfreezes a group later limits k; a policy that touches every block (LoRA on
every block, BitFit, norms only) leaves k small (1 when only the embeddings stay frozen, 0 when
even they train).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from handclip.model.backbone import Backbone
from handclip.model.forward import frozen_prefix  # noqa: F401 - the one count, used here and re-exported


def never_trains(group, freeze, epochs: int) -> bool:
    """Whether none of `group`'s parameters trains now (`requires_grad`) or, under `freeze`, in any of `epochs`."""
    if any(p.requires_grad for p in group.parameters.values()):
        return False
    return freeze is None or all(freeze.first_epoch(group, name, epochs) is None for name in group.parameters)


def trained_names(backbone: Backbone, freeze=None, epochs: int = 1) -> list[str]:
    """Names (as in `backbone.named_parameters()`) of the parameters that train now or, under `freeze` (a policy
    or schedule), in any of `epochs` epochs: what an average or an interpolation of weights must cover."""
    ever = {id(p) for p in backbone.parameters() if p.requires_grad}
    if freeze is not None:
        for group in backbone.all_groups():
            for name, parameter in group.parameters.items():
                if freeze.first_epoch(group, name, epochs) is not None:
                    ever.add(id(parameter))
    return [name for name, p in backbone.named_parameters() if id(p) in ever]


def text_frozen(backbone: Backbone, freeze=None, epochs: int = 1) -> bool:
    """The whole text tower (projection included) stays frozen for all `epochs`."""
    return all(never_trains(g, freeze, epochs) for g in backbone.layer_groups("text"))


def prefix_digest(backbone: Backbone, groups: int) -> str:
    """A hash of the weights (names, shapes, values) of the first `groups` image groups."""
    return tower_digest(backbone, "vision", groups)


def tower_digest(backbone: Backbone, tower: str, groups: int | None = None) -> str:
    """A hash of the weights (names, shapes, values) of a tower's first `groups` groups (all of them: None)."""
    digest = hashlib.sha256()
    for group in backbone.layer_groups(tower)[:groups]:
        for name, parameter in sorted(group.parameters.items()):
            value = parameter.detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{name}:{tuple(value.shape)}".encode())
            digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:20]


class TextCache:
    """Embeddings of a frozen text tower, one per distinct token sequence, computed on first sight.

    `encoded` counts the sequences encoded (each once); the embeddings carry no gradient.
    """

    def __init__(self):
        self.table: dict[tuple[int, ...], torch.Tensor] = {}
        self.encoded = 0

    def __call__(
        self, backbone: Backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        keys = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids.cpu(), mask.cpu(), strict=True)]
        fresh: dict[tuple[int, ...], int] = {}  # each new sequence -> its first row
        for row, key in enumerate(keys):
            if key not in self.table:
                fresh.setdefault(key, row)
        if fresh:
            rows = list(fresh.values())
            with torch.no_grad():
                embeddings = backbone.encode_text(input_ids[rows], None if attention_mask is None else mask[rows])
            for key, embedding in zip(fresh, embeddings, strict=True):
                self.table[key] = embedding.detach()
            self.encoded += len(rows)
        return torch.stack([self.table[key] for key in keys])

    def texts(self, backbone: Backbone, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings of `texts` (tokenized by the backbone), through the same table."""
        tokens = backbone.tokenize(list(texts))
        device = next(backbone.parameters()).device
        return self(backbone, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
