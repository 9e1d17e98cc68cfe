"""What fine-tuning did to CLIP's language side: attribute prompts and image-text retrieval.

- Attribute classification: each image is given the class whose prompt embedding is closest
  (aspect, gender, skin, nail polish, accessories, as the metadata has them and where the images
  hold more than one class). Accuracy is reported with the majority-class share beside it.
- Retrieval: images and their captions; image->text and text->image Recall@1/5/10, where a
  caption shared by several images (one person's hand) counts as right for each of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from handclip.data.hands import ASPECTS
from handclip.eval.reid import match_ranks, similarity

# the hand data's prompt tasks (handclip.data.sources.Hands11k.prompts): task -> (manifest column, {value: prompt})
HAND_PROMPTS = {
    "aspect": ("aspect", {a: f"a photo of the {a} hand" for a in ASPECTS}),
    "gender": ("gender", {"male": "a photo of a man's hand", "female": "a photo of a woman's hand"}),
    "skin": ("skinColor", {s: f"a photo of a hand with {s} skin" for s in ("very fair", "fair", "medium", "dark")}),
    "nail_polish": (
        "nailPolish",
        {"1": "a photo of a hand with painted nails", "0": "a photo of a hand with bare nails"},
    ),
    "accessories": ("accessories", {"1": "a photo of a hand wearing a ring", "0": "a photo of a hand with no ring"}),
}

# an aspect's two halves: whether the back or the palm is seen, and which hand it is
ASPECT_PARTS = {"dorsal_palmar": ("dorsal", "palmar"), "left_right": ("left", "right")}


@torch.no_grad()
def encode_texts(backbone, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Projected text embeddings of `texts`, on the CPU."""
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = backbone.tokenize(texts[start : start + batch_size])
        embedding = backbone.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        out.append(embedding.float().cpu())
    backbone.train(was_training)
    return torch.cat(out)


def classify(image_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """Index of the nearest class prompt for each image (cosine similarity)."""
    return similarity(image_features, class_features).argmax(dim=1)


def recall_at_k(scores: torch.Tensor, correct: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Share of rows with a correct column among their top k (ties counted against the row)."""
    rank = match_ranks(scores, correct)
    return {k: float((rank <= k).float().mean()) for k in ks}


def text_metrics(
    image_features: torch.Tensor, rows: Sequence[dict], captions: Sequence[str], backbone, text_cache=None,
    kept: dict | None = None, prompts: Mapping[str, tuple[str, Mapping[str, str]]] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Zero-shot attribute accuracies (the data source's prompt tasks, `prompts`: {task: (column, {value: prompt})})
    and retrieval recalls for images with their rows and captions.

    With a `text_cache` (a frozen text tower), prompts and captions are encoded once per run. A `kept` dict receives
    the distinct captions (`captions`, sorted) and their embeddings (`text`), for the retrieval figure.
    """
    if text_cache is not None:

        def encode(backbone, texts):
            with torch.no_grad():
                return text_cache.texts(backbone, texts).float().cpu()
    else:
        encode = encode_texts
    metrics: dict[str, float] = {}
    for name, (column, classes_prompts) in (prompts or {}).items():
        labels = [r.get(column, "") for r in rows]
        classes = sorted({label for label in labels if label in classes_prompts})
        if len(classes) < 2:
            continue  # one class only (or none): nothing to tell apart
        keep = torch.tensor([label in classes for label in labels])
        truth = torch.tensor([classes.index(label) for label in labels if label in classes])
        predicted = classify(image_features[keep], encode(backbone, [classes_prompts[c] for c in classes]))
        metrics[f"zeroshot/{name}_accuracy"] = float((predicted == truth).float().mean())
        metrics[f"zeroshot/{name}_majority"] = float(truth.bincount().max() / len(truth))
        metrics[f"zeroshot/{name}_chance"] = 1.0 / len(classes)
        if name == "aspect":  # the two halves of an aspect, read off the same predictions
            for part, words in ASPECT_PARTS.items():
                side = torch.tensor([words[0] in c for c in classes])  # dorsal (or left) against the rest
                if side.any() and not side.all():
                    metrics[f"zeroshot/{part}_accuracy"] = float((side[predicted] == side[truth]).float().mean())
    unique = sorted(set(captions))
    text = encode(backbone, unique)
    if kept is not None:
        kept.update(captions=unique, text=text)
    position = {caption: i for i, caption in enumerate(unique)}
    index = torch.tensor([position[c] for c in captions])
    correct = index[:, None] == torch.arange(len(unique))[None, :]
    scores = similarity(image_features, text)
    for direction, (s, c) in {"image_to_text": (scores, correct), "text_to_image": (scores.T, correct.T)}.items():
        for k, value in recall_at_k(s, c).items():
            metrics[f"retrieval/{direction}_R@{k}"] = value
    return metrics
