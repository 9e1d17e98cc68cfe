"""CLIP-HandID's pseudo-token term (Baisa et al., IPTA 2025), as the paper and its code describe it.

Hand images are labelled by index, not described in words, so CLIP-HandID learns a word per *image*: an inversion
network (a 3-layer MLP with LayerNorm, GELU and dropout 0.5) maps each image's projected embedding to a pseudo-
token S* (added to the placeholder word's embedding, as HandCLIP's learned words are: an output of 0 is the word
itself, a shift the network's last bias absorbs), the text tower (frozen in the recipe) encodes "a photo of a S*
hand." with S* in the word's place, and image-to-text and text-to-image supervised contrastive terms pull each
image towards the texts of its own identity's images in the batch and away from the others' (the symmetric multi-
positive loss of `handclip.losses.contrastive`). Gradients reach the inversion network and, through it and through
the image side of the loss, the image tower. Its recipe adds label-smoothed identity cross-entropy on the BN-necks
of both features (`conf/loss/handid.yaml`).

This is not one learned text per identity (`loss=identity_text`, CLIP-ReID's stage-1 idea): a pseudo-token
is a function of the image, so it exists for identities never trained on too.
"""

from __future__ import annotations

from torch import nn

from handclip.checks import integer
from handclip.losses.contrastive import contrastive_loss
from handclip.losses.objective import LossInputs, LossTerm
from handclip.losses.prompts import WordSlots


def inversion_network(embed_dim: int, text_width: int, hidden: int, dropout: float) -> nn.Sequential:
    """Image embedding -> one token embedding: 3 linear layers, LayerNorm and GELU between, dropout after each."""
    return nn.Sequential(
        nn.Linear(embed_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, text_width),
    )  # fmt: skip


class PseudoTokenLoss(LossTerm):
    """Each image's pseudo-token in `template`, encoded by the text tower, against the batch's images (SupCon both
    ways, same identity positive)."""

    needs_backbone = True  # runs the text tower on the pseudo-token prompts
    needs_identities = True  # positives are the images of one identity

    def __init__(self, embed_dim: int, text_width: int, weight: float = 1.0, template: str = "a photo of a {} hand.",
                 hidden: int | None = None, dropout: float = 0.5):  # fmt: skip
        super().__init__(weight)
        hidden = integer(self.key("hidden"), hidden if hidden is not None else embed_dim, 1)
        self.slots = WordSlots(template, 1, self.error)
        self.inversion = inversion_network(int(embed_dim), int(text_width), hidden, self.fraction("dropout", dropout))

    def pseudo_texts(self, backbone, images):
        """The text embeddings [n, embed_dim] of each image's prompt, its pseudo-token in the slot."""
        tokens = self.inversion(images.float())
        return self.slots.encode(backbone, tokens[:, None, :])

    def forward(self, inputs: LossInputs):
        if inputs.backbone is None or inputs.identities is None:
            raise ValueError("PseudoTokenLoss needs the backbone and the batch's identities")
        texts = self.pseudo_texts(inputs.backbone, inputs.image)
        return contrastive_loss(inputs.image, texts, inputs.logit_scale, inputs.identities)
