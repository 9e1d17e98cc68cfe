"""k-reciprocal re-ranking (Zhong, Zheng, Cao and Li, CVPR 2017), an evaluation option (`eval.rerank`).

A gallery image ranked high for a query counts more when the query is also among *its* nearest neighbours.
For every image of query and gallery together:

1. distances: squared Euclidean between the L2-normalised features (2 - 2 cos), each row divided by its largest;
2. the k1-reciprocal neighbours R(p, k1): the images among p's k1 + 1 nearest whose own k1 + 1 nearest hold p;
3. expanded with R(c, k1/2) of each member c when at least two thirds of it lies in R(p, k1);
4. a vector V_p over all images: exp(-distance) on the expanded set, normalised to sum 1; then averaged over the k2
   nearest neighbours of p (local query expansion);
5. the Jaccard distance of query q and image g: 1 - sum(min(V_q, V_g)) / sum(max(V_q, V_g));
6. the final distance: (1 - lambda) Jaccard + lambda original.

Neighbour lists sort with a stable sort, so equal distances keep the order query-then-gallery and a run gives the
same ranking every time. Cost: (n x n) matrices for n = queries + gallery images (a few thousand on 11k: tens of
MB), and seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from handclip.checks import integer, number


@dataclass(frozen=True)
class Reranking:
    """`eval.rerank`'s settings: the published defaults (k1 = 20, k2 = 6, lambda = 0.3)."""

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self):
        integer("eval.rerank.k1", self.k1, 1)
        integer("eval.rerank.k2", self.k2, 1)
        number("eval.rerank.lambda_value", self.lambda_value, 0, 1)

    def distances(self, query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """Re-ranked distances [queries, gallery] (smaller: closer)."""
        return k_reciprocal_distances(query, gallery, self.k1, self.k2, self.lambda_value)


def _reciprocal(rank: np.ndarray, p: int, k: int) -> np.ndarray:
    """R(p, k): the images among p's k + 1 nearest (p itself first) that hold p among their own k + 1 nearest."""
    forward = rank[p, : k + 1]
    backward = rank[forward, : k + 1]
    return forward[(backward == p).any(axis=1)]


def k_reciprocal_distances(
    query: torch.Tensor, gallery: torch.Tensor, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> torch.Tensor:
    """The re-ranked distance of every query to every gallery image (see the module docstring)."""
    features = F.normalize(torch.cat([query, gallery]).double(), dim=-1)
    queries, total = len(query), len(features)
    original = (2 - 2 * features @ features.T).clamp(min=0).numpy()
    original = original / np.maximum(original.max(axis=1, keepdims=True), 1e-12)
    rank = np.argsort(original, axis=1, kind="stable")
    k1, k2 = min(k1, total - 1), min(k2, total)
    vectors = np.zeros((total, total))
    for p in range(total):
        kept = _reciprocal(rank, p, k1)
        expanded = [kept]
        for member in kept:
            candidates = _reciprocal(rank, member, int(round(k1 / 2)))
            if len(np.intersect1d(candidates, kept)) > 2 / 3 * len(candidates):
                expanded.append(candidates)
        chosen = np.unique(np.concatenate(expanded))
        weights = np.exp(-original[p, chosen])
        vectors[p, chosen] = weights / weights.sum()
    if k2 > 1:
        vectors = vectors[rank[:, :k2]].mean(axis=1)
    gallery_vectors = vectors[queries:]
    sums = vectors.sum(axis=1)
    jaccard = np.empty((queries, total - queries))
    for q in range(queries):  # min(V_q, V_g) is 0 wherever V_q is: only V_q's few non-zero places count
        places = np.flatnonzero(vectors[q])
        shared = np.minimum(vectors[q, places][None, :], gallery_vectors[:, places]).sum(axis=1)
        either = sums[q] + sums[queries:] - shared  # sum(max) = sum(V_q) + sum(V_g) - sum(min)
        jaccard[q] = 1 - shared / np.maximum(either, 1e-12)
    final = (1 - lambda_value) * jaccard + lambda_value * original[:queries, queries:]
    return torch.from_numpy(final).float()
