"""`eval.protocol=published`: the numbers MBA-Net's and CLIP-HandID's own evaluation code would compute, checked
against a small reimplementation of that code written here from its description (DESIGN.md section 8), never
from HandCLIP's scoring: merged galleries with aspect-offset labels, the mirrored image's feature added before the
L2 normalisation, argsort ranking, and the authors' trapezoid AP."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from handclip.eval.reid import evaluate
from tests.fake_runs import HF_TINY
from tests.test_evaluate import evaluate as evaluate_command
from tests.test_evaluate import ok

ASPECT_OFFSET = {"dorsal right": 0, "dorsal left": 10_000, "palmar right": 20_000, "palmar left": 30_000}


def authors_scores(query: np.ndarray, query_labels, gallery: np.ndarray, gallery_labels) -> tuple[float, float]:
    """Rank-1 and mAP of one query/gallery run as the authors' code computes them: features already L2-normalised,
    each query ranks the gallery by inner product, AP adds (precision before + precision at) / 2 per match."""
    gallery_labels = np.asarray(gallery_labels)
    hits, aps = 0.0, 0.0
    for feature, label in zip(query, query_labels, strict=True):
        order = np.argsort(gallery @ feature)[::-1]
        places = np.flatnonzero(gallery_labels[order] == label)
        hits += float(places[0] == 0)
        ap = 0.0
        for i, place in enumerate(places):
            now = (i + 1) / (place + 1)
            before = i / place if place else 1.0
            ap += (before + now) / 2 / len(places)
        aps += ap
    return hits / len(query), aps / len(query)


def test_the_trapezoid_ap_is_the_authors_on_random_rankings_with_several_matches():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        query = torch.nn.functional.normalize(torch.randn(7, 5, generator=generator), dim=-1)
        gallery = torch.nn.functional.normalize(torch.randn(30, 5, generator=generator), dim=-1)
        query_ids = torch.randint(0, 4, (7,), generator=generator)
        gallery_ids = torch.randint(0, 4, (30,), generator=generator)
        gallery_ids[:4] = torch.arange(4)  # every query has a match
        ours = evaluate(query, query_ids, gallery, gallery_ids, ap="trapezoid")
        rank1, mean_ap = authors_scores(query.numpy(), query_ids.numpy(), gallery.numpy(), gallery_ids.numpy())
        assert ours["rank1"] == pytest.approx(rank1, abs=1e-6) and ours["mAP"] == pytest.approx(mean_ap, abs=1e-6)
        # and it is not the standard AP, which it would silently equal if the option were ignored
        assert evaluate(query, query_ids, gallery, gallery_ids)["mAP"] > ours["mAP"] + 1e-3


@pytest.mark.slow
def test_published_protocol_numbers_are_what_the_authors_evaluation_computes(tmp_path, synthetic_hands):
    from PIL import Image, ImageOps
    from transformers import CLIPImageProcessor, CLIPModel

    from tests.fake_runs import model_folder

    # weights drawn wider than CLIP's initialisation: a tiny random ViT maps every hand to nearly one direction
    # (cosines 0.998 ± 0.001), where rankings turn on float noise; at 5x, 0.988 ± 0.015
    config = HF_TINY["config"]
    tiny = {**HF_TINY, "config": {**config, "initializer_factor": 5.0,
                                  "vision_config": {**config["vision_config"], "initializer_factor": 5.0}}}
    folder = model_folder(tmp_path / "tiny-clip", tiny)
    out = tmp_path / "published"
    result = ok(evaluate_command(
        folder, "data=hands11k", f"data.source.root={synthetic_hands}", "data.runs=3", "data.cache_size=0",
        "eval.protocol=published", "eval.text=false", "eval.ranked=0", "--out", out, f"paths.root={tmp_path}",
    ))  # fmt: skip
    payload = json.loads((out / "metrics.json").read_text())
    stated = payload["protocol"]
    assert stated["name"] == "published" and stated["headline"] == "test_all" and stated["flip_tta"] is True
    assert stated["average_precision"] == "trapezoid"
    printed = " ".join(result.stdout.split())
    assert "headline of the published protocol" in printed and "merged-gallery Rank-1" in printed
    assert printed.index("test_all: gallery merged over aspects") < printed.index("test: same-aspect gallery")

    # the authors' evaluation: the split's query and merged-gallery images, labels offset by aspect, features of
    # image + mirror from the plain transformers model and its own processor, L2-normalised
    clip = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPImageProcessor.from_pretrained(folder)
    with open(payload["manifest"], newline="") as handle:
        rows = list(csv.DictReader(handle))

    @torch.no_grad()
    def features(chosen: list[dict]) -> np.ndarray:
        images = [Image.open(synthetic_hands / r["image"]).convert("RGB") for r in chosen]
        both = processor(images=images + [ImageOps.mirror(i) for i in images], return_tensors="pt")["pixel_values"]
        embedded = clip.get_image_features(pixel_values=both)
        embedded = getattr(embedded, "pooler_output", embedded)  # transformers 5 returns an output object
        summed = embedded[: len(images)] + embedded[len(images) :]
        return torch.nn.functional.normalize(summed, dim=-1).numpy()

    def labels(chosen: list[dict]) -> list[int]:
        return [ASPECT_OFFSET[r["aspect"]] + int(r["person"]) for r in chosen]

    rank1s, maps = [], []
    for run in range(3):
        query = [r for r in rows if r["split"] == f"query{run}"]
        gallery = [r for r in rows if r["split"] == f"gallery_all{run}"]
        assert {r["aspect"] for r in gallery} == set(ASPECT_OFFSET)  # merged over the four aspects
        rank1, mean_ap = authors_scores(features(query), labels(query), features(gallery), labels(gallery))
        rank1s.append(rank1)
        maps.append(mean_ap)
    metrics = payload["metrics"]
    assert metrics["test_all/rank1"] == pytest.approx(np.mean(rank1s), abs=1e-4)
    assert metrics["test_all/mAP"] == pytest.approx(np.mean(maps), abs=1e-4)
