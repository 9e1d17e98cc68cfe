"""Can the text side tell the training identities apart? A check before training (issue: frozen text towers).

A contrastive objective pulls each image towards its caption and away from the other identities' captions. When
the text tower cannot separate the identities' captions ("person 1012" and "person 1013" embed almost alike), no
image tower can win: the targets themselves are confused. The check embeds each training identity's caption (the
first template, as evaluation captions) and asks, for the best case of an image embedded exactly on its own
caption, how much probability the loss's softmax gives that identity at the largest temperature the loss allows
(logit scale 100):

    identifiability = mean over identities i of softmax_j(100 x cos(t_i, t_j))[i]

1 means every caption stands apart; 1 / identities (the chance level) means they are indistinguishable. Identities
whose captions are identical count against it too. The softmax runs over every training identity, a batch over
fewer, so the check is stricter than one batch's loss; what it measures is whether the targets can be told apart
at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from handclip.losses.contrastive import LOGIT_SCALE_MAX

WARN_BELOW = 0.5  # an image on its own caption is likelier to be taken for someone else


def caption_identifiability(backbone, rows: Sequence[Mapping], captioner: Callable[[Mapping], str]) -> dict:
    """{"identifiability", "chance", "identities", "shared"} for the identities of `rows` (training rows), or {} with
    fewer than two identities; `shared`: identities whose caption another identity has word for word."""
    from handclip.eval.zeroshot import encode_texts

    first: dict[str, str] = {}
    for row in rows:
        first.setdefault(str(row["identity"]), captioner(row))
    if len(first) < 2:
        return {}
    captions = list(first.values())
    texts = F.normalize(encode_texts(backbone, sorted(set(captions))), dim=-1)
    position = {caption: i for i, caption in enumerate(sorted(set(captions)))}
    embedded = texts[torch.tensor([position[c] for c in captions])]
    logits = float(torch.tensor(LOGIT_SCALE_MAX).exp()) * embedded @ embedded.T
    own = logits.softmax(dim=1).diagonal()
    counts = {caption: captions.count(caption) for caption in position}
    return {"identifiability": float(own.mean()), "chance": 1.0 / len(captions), "identities": len(captions),
            "shared": sum(n for n in counts.values() if n > 1)}  # fmt: skip


def advice(found: Mapping, text_trains: bool) -> tuple[str, str] | None:
    """("warning" or "note", what to say) when the captions do not separate the identities, None when they do: a
    warning with the fix when the text tower is frozen for the whole run (it cannot learn them apart), a note when
    it trains (it must)."""
    if not found or found["identifiability"] >= WARN_BELOW:
        return None
    shared = f"; {found['shared']} share their caption word for word" if found["shared"] else ""
    said = (f"the text side tells the {found['identities']} training identities apart poorly: an image embedded "
            f"exactly on its caption is given its identity with probability {found['identifiability']:.2f} (chance "
            f"{found['chance']:.2f}){shared}")  # fmt: skip
    if text_trains:
        return "note", f"{said}; the text tower trains, so it has to learn them apart"
    return "warning", (f"{said}, and the text tower is frozen, so a contrastive loss on these captions keeps "
                       "confused targets. Fix: unfreeze the text tower's last blocks (freeze=last_n "
                       "freeze.text_blocks=2 freeze.vision_blocks=N, N the image blocks your recipe trains), "
                       "captions that say what differs between people (data.captions), or an identity loss "
                       "(loss=strong)")  # fmt: skip
