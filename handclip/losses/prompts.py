"""Learned identity prompts: CLIP-ReID's first stage.

Each training identity gets its own words in a caption template, "a photo of a X X X X hand.":
the embeddings of the X tokens are learnable, one set per identity, and everything else (both
towers, the template's other words, the temperature) stays fixed. The term encodes the prompts of
the identities in a batch with the (frozen) text tower and trains them with the symmetric
multi-positive contrastive loss against the batch's images, CLIP-ReID's image-to-text and
text-to-image supervised contrastive terms. After training, `identity_texts` encodes every
identity's prompt once; the second stage reads those embeddings as fixed targets
(`IdentityTextLoss(texts_from=...)`).

Only the backbone interface is used (`text_prefix` with one group gives the token and position
embeddings, `text_suffix` runs the tower from there), so any backbone with a text tower works.
Each identity's words start as the placeholder word's embedding plus small noise.
"""

from __future__ import annotations

import torch
from torch import nn

from handclip.checks import integer, number
from handclip.losses.contrastive import contrastive_loss
from handclip.losses.objective import LossInputs, LossTerm

PLACEHOLDER = "x"  # one BPE token; its embedding is where each identity's learned words start


class WordSlots:
    """A caption template with `count` slots ("{}" marks where) whose token embeddings are given, not looked up:
    learned words per identity (CLIP-ReID), or a pseudo-token made from each image (CLIP-HandID)."""

    def __init__(self, template: str, count: int, error):
        if not isinstance(template, str) or template.count("{}") != 1:
            raise error("template", template, 'a caption with one "{}" where the learned words go')
        self.template, self.count, self._error = template, count, error
        self._tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def caption(self) -> str:
        return self.template.format(" ".join([PLACEHOLDER] * self.count))

    def tokens(self, backbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids [1, L], attention_mask [1, L], positions of the slots [count])."""
        if self._tokens is None:
            tokens = backbone.tokenize([self.caption])
            # the placeholder's id: what its tokens hold beyond an empty text's (start, end and padding tokens, where
            # a tokenizer has them: SigLIP's has no start token)
            alone, empty = (set(backbone.tokenize([text])["input_ids"][0].tolist()) for text in (PLACEHOLDER, ""))
            placeholder = next(iter(alone - empty), -1) if len(alone - empty) == 1 else -1
            positions = (tokens["input_ids"][0] == placeholder).nonzero().flatten()
            if len(positions) != self.count:
                raise self._error(
                    "template", self.template,
                    f'a caption in which "{PLACEHOLDER}" appears only where the learned words go '
                    f"(found {len(positions)} of {self.count} placeholder tokens after tokenising)",
                )  # fmt: skip
            self._tokens = (tokens["input_ids"], tokens["attention_mask"], positions)
        return self._tokens

    def encode(self, backbone, words: torch.Tensor) -> torch.Tensor:
        """Projected text embeddings [n, embed_dim] of the template with `words` [n, count, width] in its slots
        (gradients flow to the words)."""
        ids, mask, positions = (t.to(words.device) for t in self.tokens(backbone))
        n = len(words)
        ids, mask = ids.expand(n, -1), mask.expand(n, -1)
        hidden = backbone.text_prefix(ids[:1], mask[:1], 1)  # token + position embeddings of the template
        offsets = torch.zeros(n, *hidden.shape[1:], device=hidden.device, dtype=hidden.dtype)
        offsets[:, positions] = words.to(hidden.dtype)
        return backbone.text_suffix(hidden.expand(n, -1, -1) + offsets, ids, mask, 1)


class IdentityPrompts(LossTerm):
    """Learnable words per identity in `template` ("{}" marks them), trained contrastively against images."""

    needs_backbone = True  # runs the text tower itself
    needs_identities = True
    needs_text_tower = True  # writes identity texts that a later stage checks against the text tower's digest
    embeddings = ("words",)

    def __init__(
        self, num_identities: int, text_width: int, weight: float = 1.0, template: str = "a photo of a {} hand.",
        context_tokens: int = 4, init_std: float = 0.02,
    ):  # fmt: skip
        super().__init__(weight)
        integer(self.key("context_tokens"), context_tokens, 1, 16)
        number(self.key("init_std"), init_std, 0)
        self.slots = WordSlots(template, context_tokens, self.error)
        self.template, self.context_tokens = template, context_tokens
        # drawn from the run's seeded generator, like every other head
        self.words = nn.Parameter(torch.randn(int(num_identities), context_tokens, int(text_width)) * init_std)

    @property
    def caption(self) -> str:
        return self.slots.caption

    def identity_texts(self, backbone, identities: torch.Tensor) -> torch.Tensor:
        """Projected text embeddings of the prompts of `identities` [n, embed_dim] (with gradients to the words)."""
        return self.slots.encode(backbone, self.words[identities])

    @torch.no_grad()
    def all_identity_texts(self, backbone, batch: int = 256) -> torch.Tensor:
        """Every identity's prompt embedding [num_identities, embed_dim], what the second stage reads."""
        everyone = torch.arange(len(self.words), device=self.words.device)
        return torch.cat([self.identity_texts(backbone, chunk).float() for chunk in everyone.split(batch)])

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if inputs.backbone is None or inputs.identities is None:
            raise ValueError("IdentityPrompts needs the backbone and the batch's identities")
        present, rows = inputs.identities.unique(return_inverse=True)
        texts = self.identity_texts(inputs.backbone, present)[rows]
        return contrastive_loss(inputs.image, texts, inputs.logit_scale, inputs.identities)

    def artifacts(self, backbone) -> dict[str, torch.Tensor]:
        """Files a finished run writes: the identity text embeddings a second stage reads."""
        return {"identity_texts": self.all_identity_texts(backbone)}
