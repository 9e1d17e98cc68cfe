"""Re-identification metrics: CMC Rank-k and mAP of queries against a gallery.

Ranking is by cosine similarity. Ties are resolved pessimistically and without regard to
gallery order: a non-match scored equal to a true match counts as ranked above it. So a
collapsed embedding (all features equal) scores at chance, never 1.0, and permuting the
gallery never changes a number.

Scores closer than `TIE_TOLERANCE` count as tied: cosines that are equal in exact arithmetic
(e.g. [1, 2] and [2, 1] against [2, 2]) can differ in the last float bit depending on where
they sit in the matrix product, which would otherwise break ties by gallery position.

A query whose identity has no image in the gallery has no defined rank or AP: it is left out
of every metric and counted in `queries_without_match`.

AP is by default the mean, over a query's true matches, of the precision at each (`average_precision`).
`ap="trapezoid"` gives what the published hand re-identification code computes instead (MBA-Net's and
CLIP-HandID's `compute_mAP`, after the Market-1501 baselines): each match adds 1/matches times the mean of the
precision just before it and at it, the precision before the first place counting as 1. For a query with one
true match at place r (1-based) that is 1 at r = 1 and 1/(2r) after, half the standard 1/r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from handclip.errors import NonFiniteError

TIE_TOLERANCE = 1e-6


def similarity(query_features: torch.Tensor, gallery_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix [queries, gallery]."""
    return F.normalize(query_features.float(), dim=-1) @ F.normalize(gallery_features.float(), dim=-1).T


def match_ranks(scores: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """Rank (1-based) of each query's first true match, ties counted against it."""
    best = scores.masked_fill(~matches, float("-inf")).max(dim=1, keepdim=True).values
    return ((scores >= best - TIE_TOLERANCE) & ~matches).sum(dim=1) + 1


def average_precision(scores: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """AP per query: mean over true matches of precision at that match's score threshold."""
    gallery_size = scores.shape[1]
    ascending = scores.sort(dim=1).values
    # number of gallery items scored >= each item (ties grouped), and of true matches among them
    threshold = (scores - TIE_TOLERANCE).contiguous()
    at_or_above = gallery_size - torch.searchsorted(ascending, threshold, side="left")
    match_scores = scores.masked_fill(~matches, float("-inf")).sort(dim=1).values
    matches_at_or_above = gallery_size - torch.searchsorted(match_scores, threshold, side="left")
    precision = matches_at_or_above.float() / at_or_above.float()
    return (precision * matches).sum(dim=1) / matches.sum(dim=1)


def trapezoid_average_precision(scores: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """AP per query as the published hand re-identification code computes it (see the module docstring); ties
    counted against the query, as everywhere here."""
    gallery_size = scores.shape[1]
    others = scores.masked_fill(matches, float("-inf")).sort(dim=1).values  # non-matches, ascending
    found = scores.masked_fill(~matches, float("-inf")).sort(dim=1, descending=True).values  # matches first
    order = torch.arange(gallery_size, device=scores.device).expand_as(found)  # i: the i-th match (0-based)
    valid = order < matches.sum(dim=1, keepdim=True)
    above = gallery_size - torch.searchsorted(others, (found - TIE_TOLERANCE).contiguous(), side="left")
    place = (above + order).float()  # the i-th match's 0-based place: non-matches scored at or above it, and i
    precision = (order + 1) / (place + 1)
    before = torch.where(place > 0, order / place.clamp(min=1), torch.ones_like(place))
    return (((before + precision) / 2) * valid).sum(dim=1) / valid.sum(dim=1)


AVERAGE_PRECISION = {"standard": average_precision, "trapezoid": trapezoid_average_precision}


def evaluate(
    query_features: torch.Tensor,
    query_ids: torch.Tensor,
    gallery_features: torch.Tensor,
    gallery_ids: torch.Tensor,
    ranks: tuple[int, ...] = (1, 5, 10),
    per_query: bool = False,
    matches: torch.Tensor | None = None,
    ap: str = "standard",
    rank_by: torch.Tensor | None = None,
) -> dict:
    """Rank-k and mAP of queries against a gallery, as fractions in [0, 1].

    Returns `rank1`, `rank5`, `rank10`, `mAP`, plus `queries` (evaluated) and
    `queries_without_match` (left out because their identity is not in the gallery). With
    `per_query`, also `per_query`: {"rank1": [0/1 per evaluated query], ..., "mAP": [AP per query]},
    the numbers those means are taken over (for paired comparisons of two models on the same queries).
    `matches` [queries, gallery], when given, says which gallery items are right for each query instead of equal
    ids (caption queries: every image that has the caption). `ap`: how AP is computed, `standard` or `trapezoid`
    (the published code's; see the module docstring). `rank_by` [queries, gallery], when given, ranks instead of the
    cosine similarity (higher: closer; re-ranked distances negated, handclip.eval.reranking).
    """
    if ap not in AVERAGE_PRECISION:
        raise ValueError(f"ap={ap!r}: choose one of {', '.join(AVERAGE_PRECISION)}")
    query_ids = torch.as_tensor(query_ids).reshape(-1)
    gallery_ids = torch.as_tensor(gallery_ids).reshape(-1)
    if len(query_features) != len(query_ids) or len(gallery_features) != len(gallery_ids):
        raise ValueError(
            f"features and ids differ in length: {len(query_features)} query features vs "
            f"{len(query_ids)} ids, {len(gallery_features)} gallery features vs {len(gallery_ids)} ids"
        )
    if len(gallery_ids) == 0 or len(query_ids) == 0:
        raise ValueError("evaluate needs at least one query and one gallery image")
    for name, features in (("query", query_features), ("gallery", gallery_features)):
        if not torch.isfinite(features).all():
            bad = int((~torch.isfinite(features).all(dim=-1)).sum())
            raise NonFiniteError(
                f"{bad} of {len(features)} {name} features are not finite (NaN or infinite): the model that made them "
                "has damaged weights, and no score of them would mean anything"
            )
    if matches is None:
        matches = query_ids[:, None] == gallery_ids[None, :]
    elif tuple(matches.shape) != (len(query_features), len(gallery_features)):
        raise ValueError(f"matches is {tuple(matches.shape)}, not [queries, gallery] = "
                         f"[{len(query_features)}, {len(gallery_features)}]")  # fmt: skip
    has_match = matches.any(dim=1)
    if not has_match.any():
        raise ValueError("no query identity appears in the gallery: nothing can be evaluated")
    if rank_by is None:
        rank_by = similarity(query_features, gallery_features)
    elif tuple(rank_by.shape) != tuple(matches.shape):
        raise ValueError(f"rank_by is {tuple(rank_by.shape)}, not [queries, gallery] = {tuple(matches.shape)}")
    scores = rank_by[has_match]
    matches = matches[has_match]
    first = match_ranks(scores, matches)
    hits = {f"rank{k}": (first <= k).float() for k in ranks}
    precision = AVERAGE_PRECISION[ap](scores, matches)
    result: dict = {name: float(values.mean()) for name, values in hits.items()}
    result["mAP"] = float(precision.mean())
    if per_query:
        result["per_query"] = {**{name: values.tolist() for name, values in hits.items()}, "mAP": precision.tolist()}
    result["queries"] = int(has_match.sum())
    result["queries_without_match"] = int((~has_match).sum())
    return result
