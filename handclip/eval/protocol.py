"""The re-identification protocol over a manifest: validation and the 10 test runs.

Features are extracted once per distinct image and reused by every run. Splits scored:

- `val`:      queries = validation images of training identities, gallery = their training
              images. Model selection and early stopping use this, never a test run.
- `test`:     queryR against galleryR (same-aspect gallery), R = 0..runs-1.
- `test_all`: queryR against gallery_allR (11k's gallery merged over the four aspects).

Each gives rank1/rank5/rank10/mAP per run, and over runs the mean and std.

A manifest without identities (no identity has two images: `handclip.data.split.is_retrieval_only`) follows
the image-text retrieval protocol instead: its `val` and `test` splits each score caption -> image retrieval
among their own images (every caption a query; right: each image that has that caption), so Rank-k reads R@k;
the same names, so selection, WiSE-FT and summaries read them unchanged.

Which of these a run reports first, and how its features are taken, is its stated protocol (`eval.protocol`,
`statement`): `handclip` heads with the same-aspect gallery; `published` follows MBA-Net's and CLIP-HandID's own
evaluation code: on 11k the gallery merged over the four aspects (aspect/person identities, so a person's other
hands are distractors) is the headline, each image's feature is the sum of its own and its mirror image's
before the cosine (L2) normalisation, and the test runs' AP is the authors' trapezoid form
(`handclip.eval.reid.trapezoid_average_precision`: half the standard AP for a single match not ranked first).
Both prepare pixels as the run trains on them: the backbone's resize, centre crop, mean and std (the authors'
code squashes each image to a square and uses ImageNet's mean and std, in its training and evaluation alike).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import torch

from handclip.eval.reid import evaluate

METRICS = ("rank1", "rank5", "rank10", "mAP")
# what the retrieval protocol's evaluations are, as tables and cards name them (DataSource.galleries' keys)
RETRIEVAL_GALLERIES = {
    "test": "caption → image retrieval among the test images (Rank-k is R@k; each image that has the caption is right)",
    "val": "validation: caption → image retrieval among the validation images",
}
# what every validation gives: what may select a checkpoint (eval.select) or a WiSE-FT mix (eval.wise_ft.metric)
VALIDATION_METRICS = tuple(f"val/{name}" for name in METRICS)
# the share of validation images (held-out images of the training identities) the objective's identity head names
# right: what CLIP-HandID selects its checkpoint by; it may select a checkpoint (eval.select) where there is a head
ID_ACCURACY = "val/id_accuracy"
# the protocols a number can follow (`eval.protocol`), in the words tables and cards use
PROTOCOLS = {
    "handclip": "HandCLIP's protocol",
    "published": "the published protocol (MBA-Net's and CLIP-HandID's evaluation code: mirrored feature added, "
                 "their trapezoid AP, half the standard AP for a single match not ranked first)",
}
FLIPPED = {"handclip": False, "published": True}  # each protocol's eval.flip_tta when the setting is left null
# how each protocol computes the test runs' AP (handclip.eval.reid); validation, which selects, always the standard
AP = {"handclip": "standard", "published": "trapezoid"}
CMC_RANKS = tuple(range(1, 21))


def headline(protocol: str, galleries: Collection[str]) -> str:
    """The evaluation a protocol reports first (`test` or `test_all`), of those the data has (`galleries`: the
    data source's evaluations, DataSource.galleries, or their names)."""
    return "test_all" if protocol == "published" and "test_all" in galleries else "test"


def headline_name(head: str) -> str:
    """How one-line summaries name a headline evaluation's numbers: `test` or `merged-gallery` (Rank-1, mAP)."""
    return "merged-gallery" if head == "test_all" else "test"


def flip_of(protocol: str, flip: bool | None) -> bool:
    """`eval.flip_tta` as a run uses it: the setting, or the protocol's own when it is left null."""
    return FLIPPED.get(protocol, False) if flip is None else bool(flip)


def statement(protocol: str, galleries: Mapping[str, str], feature: str, flip: bool) -> dict:
    """What a run's numbers follow, as metrics.json, tables, sweep summaries and model cards say it."""
    head = headline(protocol, galleries)
    gallery = galleries.get(head, head)
    ap = AP.get(protocol, "standard")
    words = f"{PROTOCOLS.get(protocol, protocol)}; headline: {head} ({gallery})"
    words += f"{', mirrored feature added' if flip else ''}; feature: {feature}; test AP: {ap}"
    return {"name": protocol, "headline": head, "gallery": gallery, "flip_tta": bool(flip), "feature": feature,
            "average_precision": ap, "words": words}  # fmt: skip


def pixel_batches(dataset, batch_size: int = 64, num_workers: int = 0, flip: bool = False) -> Iterator[dict]:
    """Batches `{"pixel_values"}` of a dataset's items in order; with `flip`, each also holds its `mirrored` batch."""
    from torch.utils.data import DataLoader

    from handclip.data.dataset import leave_signals_to_the_main_process

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        worker_init_fn=leave_signals_to_the_main_process if num_workers else None)  # fmt: skip
    for batch in loader:
        pixels = batch["pixel_values"]
        yield {"pixel_values": pixels, **({"mirrored": {"pixel_values": pixels.flip(-1)}} if flip else {})}


@torch.no_grad()
def extract_features(forward, batches: Iterable[Mapping], encode=None, progress: bool = False,
                     total: int | None = None) -> torch.Tensor:  # fmt: skip
    """The evaluation feature of every image of `batches` (from `pixel_batches` or a store's `stored_batches`), in
    order, on the CPU: `encode(forward, batch)` (a `handclip.eval.feature.ImageEncoder`; default: the projected
    embedding). A batch's `mirrored` twin is encoded too and added (flip test-time augmentation, for query and
    gallery alike)."""
    from tqdm.auto import tqdm

    from handclip.eval.feature import ImageEncoder

    encode = encode or ImageEncoder()
    backbone = forward.backbone
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    features = []
    try:
        for batch in tqdm(batches, desc="extracting features", disable=not progress, leave=False, total=total):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                embedding = encode(forward, _on(batch, device)).float()
                if "mirrored" in batch:
                    embedding = embedding + encode(forward, _on(batch["mirrored"], device)).float()
            features.append(embedding.cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(features) if features else torch.empty(0)


def _on(batch: Mapping, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items() if key != "mirrored"}


def extract_image_features(
    backbone, dataset, batch_size: int = 64, num_workers: int = 0, flip: bool = False, progress: bool = False,
    encode=None,
) -> torch.Tensor:  # fmt: skip
    """Image features of every item of `dataset` (pixels), in order: `extract_features` over `pixel_batches`."""
    from handclip.model.forward import Forward

    batches = pixel_batches(dataset, batch_size, num_workers, flip)
    return extract_features(Forward(backbone), batches, encode, progress, total=-(-len(dataset) // batch_size))


def run_count(rows: Sequence[dict]) -> int:
    """Number of query/gallery runs: query0, query1, ... as far as they go."""
    splits = {r["split"] for r in rows}
    runs = 0
    while f"query{runs}" in splits:
        runs += 1
    return runs


def is_retrieval(rows: Sequence[dict]) -> bool:
    """Whether the manifest follows the image-text retrieval protocol: its validation images are of identities that
    never train (a re-identification manifest's validation images are held out from training identities)."""
    training = {r["identity"] for r in rows if r["split"] == "train"}
    return any(r["split"] == "test" for r in rows) or any(
        r["split"] == "val" and r["identity"] not in training for r in rows
    )


def protocol_pairs(rows: Sequence[dict], include_test: bool = True) -> list[tuple[str, int | None, str, str]]:
    """(metric prefix, run, query split, gallery split) for every evaluation in the manifest. Under the retrieval
    protocol a split is its own query (captions) and gallery (images)."""
    splits = {r["split"] for r in rows}
    pairs: list[tuple[str, int | None, str, str]] = []
    if is_retrieval(rows):
        return [(split, None, split, split) for split in ("val", "test")[: 2 if include_test else 1]
                if split in splits]  # fmt: skip
    if "val" in splits and "train" in splits:
        pairs.append(("val", None, "val", "train"))
    if include_test:
        for run in range(run_count(rows)):
            pairs.append(("test", run, f"query{run}", f"gallery{run}"))
            if f"gallery_all{run}" in splits:
                pairs.append(("test_all", run, f"query{run}", f"gallery_all{run}"))
    return pairs


def images_needed(rows: Sequence[dict], include_test: bool = True) -> list[dict]:
    """One row per distinct image used by the evaluations (features are computed once each)."""
    wanted = {s for _, _, q, g in protocol_pairs(rows, include_test) for s in (q, g)}
    seen, out = set(), []
    for row in rows:
        if row["split"] in wanted and row["image"] not in seen:
            seen.add(row["image"])
            out.append(row)
    return out


def score_protocol(
    features: torch.Tensor, image_rows: Sequence[dict], rows: Sequence[dict], include_test: bool = True,
    texts: Callable[[list[str]], torch.Tensor] | None = None, protocol: str = "handclip", rerank=None,
    verify: bool = False,
) -> dict:  # fmt: skip
    """Score every evaluation of the manifest from precomputed features; under the retrieval protocol the queries
    are the rows' captions, embedded by `texts` (captions -> text embeddings in the space of `features`).
    `protocol` (`eval.protocol`) says how the test runs' AP is computed (`AP`). With `rerank` (a
    `handclip.eval.reranking.Reranking`) every test evaluation is also scored re-ranked (`test_reranked/...`,
    `test_all_reranked/...`); with `verify`, the headline test runs' pairs give verification figures
    (`verify/...`, handclip.eval.verification) and `"roc"` holds the curve's points.

    Returns {"metrics": {"val/rank1": ..., "test/rank1": mean, "test/rank1_std": ..., ...},
    "runs": {"test": [per-run dicts], ...}, "cmc": {"test": [Rank-1..20 averaged over runs], ...},
    "per_query": {"val": {"rank1": [...], ..., "mAP": [...]}}} (validation's score of each query, in
    manifest order, for paired comparisons of two models: handclip.eval.significance).
    """
    position = {r["image"]: i for i, r in enumerate(image_rows)}
    identity_ids: dict[str, int] = {}
    by_split: dict[str, list[dict]] = {}
    for row in rows:
        by_split.setdefault(row["split"], []).append(row)

    retrieval = is_retrieval(rows)
    if retrieval and texts is None:
        raise ValueError("the retrieval protocol scores captions against images: give score_protocol its texts")

    def ids_of(chosen: Sequence[dict]) -> torch.Tensor:
        return torch.tensor([identity_ids.setdefault(r["identity"], len(identity_ids)) for r in chosen])

    def gather(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = by_split.get(split, [])
        if retrieval:  # each image once in the gallery
            first: dict[str, dict] = {}
            chosen = [first.setdefault(r["image"], r) for r in chosen if r["image"] not in first]
        index = torch.tensor([position[r["image"]] for r in chosen], dtype=torch.long)
        return features[index], ids_of(chosen)

    def captions(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The split's captions embedded, their ids, and which of the split's images has each (a caption several
        images share is right for each of them)."""
        chosen = by_split.get(split, [])
        text = [r.get("caption", "") for r in chosen]
        caption_at = {caption: i for i, caption in enumerate(dict.fromkeys(text))}
        image_at = {image: j for j, image in enumerate(dict.fromkeys(r["image"] for r in chosen))}
        has = torch.zeros(len(caption_at), len(image_at), dtype=torch.bool)
        for row in chosen:
            has[caption_at[row.get("caption", "")], image_at[row["image"]]] = True
        matches = has[torch.tensor([caption_at[caption] for caption in text], dtype=torch.long)]
        return texts(text).float(), ids_of(chosen), matches

    per_prefix: dict[str, list[dict]] = {}
    per_query: dict[str, dict[str, list[float]]] = {}
    cmc: dict[str, list[list[float]]] = {}
    pairs = protocol_pairs(rows, include_test)
    head = headline(protocol, {prefix for prefix, *_ in pairs})
    trials: dict[str, list] = {"val": [], head: []}  # verification: each evaluation's (scores, genuine)
    for prefix, run, query_split, gallery_split in pairs:
        matches = None
        if retrieval:
            query, query_ids, matches = captions(query_split)
        else:
            query, query_ids = gather(query_split)
        gallery, gallery_ids = gather(gallery_split)
        # one evaluation gives Rank-1..20: the CMC curve, and the per-run metrics it contains
        scores = evaluate(query, query_ids, gallery, gallery_ids, ranks=CMC_RANKS, per_query=prefix == "val",
                          matches=matches, ap="standard" if prefix == "val" else AP[protocol])  # fmt: skip
        if "per_query" in scores:
            each = scores.pop("per_query")
            per_query[prefix] = {name: each[name] for name in METRICS}
        scored = [(prefix, scores)]
        if rerank is not None and prefix != "val" and not retrieval:
            reranked = evaluate(query, query_ids, gallery, gallery_ids, ranks=CMC_RANKS, ap=AP[protocol],
                                rank_by=-rerank.distances(query, gallery))  # fmt: skip
            scored.append((f"{prefix}_reranked", reranked))
        if verify and not retrieval and prefix in trials:
            from handclip.eval.verification import pair_scores

            trials[prefix].append(pair_scores(query, query_ids, gallery, gallery_ids))
        for name, each in scored:
            cmc.setdefault(name, []).append([each[f"rank{k}"] for k in CMC_RANKS])
            result = {k: v for k, v in each.items() if not k.startswith("rank") or k in METRICS}
            result["run"] = run
            per_prefix.setdefault(name, []).append(result)
    metrics: dict[str, float] = {}
    for prefix, results in per_prefix.items():
        for name in METRICS:
            values = [r[name] for r in results]
            metrics[f"{prefix}/{name}"] = statistics.fmean(values)
            if len(values) > 1:
                metrics[f"{prefix}/{name}_std"] = statistics.stdev(values)
        metrics[f"{prefix}/queries_without_match"] = sum(r["queries_without_match"] for r in results)
    curves = {p: [statistics.fmean(c[k] for c in cs) for k in range(len(CMC_RANKS))] for p, cs in cmc.items()}
    out = {"metrics": metrics, "runs": per_prefix, "cmc": curves, "per_query": per_query}
    if trials["val"] and trials[head]:
        from handclip.eval.verification import verification_metrics

        found, out["roc"] = verification_metrics(trials[head], trials["val"][0])
        metrics.update(found)
    return out
