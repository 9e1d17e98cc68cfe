import json

import pytest
import torch
from PIL import Image

from handclip.eval.ranked import choose_queries, ranked_figures, rankings, reid_rankings, text_rankings, top_k
from handclip.eval.reid import match_ranks, similarity


def test_top_k_orders_by_score_and_marks_the_true_matches():
    query, query_ids = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ["A", "B"]
    gallery, gallery_ids = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), ["A", "B", "B", "C"]
    matches = torch.tensor([[q == g for g in gallery_ids] for q in query_ids])
    index, scores, correct = top_k(similarity(query, gallery), matches, 3)
    # query A: B's image (1.0) above its own (0.8), then C's (0.6); query B: its own (1.0), then C's, then A's
    assert index.tolist() == [[1, 0, 3], [2, 3, 0]]
    assert correct.tolist() == [[False, True, False], [True, False, False]]
    assert scores.flatten().tolist() == pytest.approx([1.0, 0.8, 0.6, 1.0, 0.8, 0.6])
    assert top_k(similarity(query, gallery), matches, 10)[0].shape == (2, 4)  # k beyond the gallery: all of it


@pytest.mark.parametrize("match_first", [True, False])
def test_a_tie_shows_the_wrong_image_first_wherever_it_stands_in_the_gallery(match_first):
    ids = ["A", "B"] if match_first else ["B", "A"]
    matches = torch.tensor([[g == "A" for g in ids]])
    scores = similarity(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    _, _, correct = top_k(scores, matches, 2)
    assert correct.tolist() == [[False, True]]  # as the metric counts it: Rank-2, not Rank-1


def test_the_first_green_frame_stands_at_the_rank_the_metric_gives():
    generator = torch.Generator().manual_seed(3)
    gallery = torch.randn(12, 4, generator=generator)
    gallery[6:] = gallery[:6]  # exact ties between images of different identities
    gallery_ids = torch.arange(12) % 5
    query, query_ids = torch.randn(9, 4, generator=generator), torch.arange(9) % 5
    scores, matches = similarity(query, gallery), query_ids[:, None] == gallery_ids[None, :]
    _, _, correct = top_k(scores, matches, 12)
    assert (correct.int().argmax(dim=1) + 1).tolist() == match_ranks(scores, matches).tolist()


def test_queries_are_drawn_reproducibly_half_of_them_wrong():
    right = [True, True, False, True, False, False, True, True]
    chosen = choose_queries(right, 4, seed=0)
    assert chosen == choose_queries(right, 4, seed=0)
    assert [right[i] for i in chosen] == [False, False, True, True]  # the wrong ones first
    assert len(set(chosen)) == 4
    one_wrong = [True, False, True, True, True]
    assert [one_wrong[i] for i in choose_queries(one_wrong, 4)] == [False, True, True, True]  # the right fill in
    assert choose_queries([True] * 3, 4) == [0, 1, 2]  # fewer than asked: all of them


def test_the_queries_are_chosen_on_the_reported_model_and_shown_for_both():
    matches = torch.tensor([[True, False], [False, True], [False, False]])  # query 2 has no match in the gallery
    baseline = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5]])  # wrong on query 1
    tuned = torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.5, 0.5]])  # wrong on query 0
    chosen, tops = rankings({"baseline": baseline, "fine-tuned": tuned}, matches, k=2, count=1)
    assert chosen == [0]  # the one the fine-tuned model gets wrong
    assert tops["baseline"][2].tolist() == [[True, False]] and tops["fine-tuned"][2].tolist() == [[False, True]]
    assert rankings({"m": tuned}, matches, k=2, count=5)[0] == [0, 1]  # never a query without a match


def _results(features: torch.Tensor, image_rows: list[dict]) -> dict:
    return {"_scored": features, "_features": features, "_image_rows": image_rows}


def _reid_rows() -> list[dict]:
    rows = [{"image": f"{name}.png", "identity": identity, "split": split}
            for name, identity, split in [("qa", "A", "query0"), ("qb", "B", "query0"), ("ga", "A", "gallery0"),
                                          ("gb", "B", "gallery0"), ("gc", "C", "gallery0"), ("x", "A", "query1"),
                                          ("y", "C", "gallery1")]]  # fmt: skip
    return rows


def test_reid_rankings_show_the_first_test_run_with_its_matches():
    rows = _reid_rows()
    # qa is nearest gc then ga; qb nearest gb then ga; query1/gallery1 images, close to qa, are left out
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.0, 1.0], [1.0, 0.1], [1.0, 0.05], [1.0, 0.02]])
    queries, tops, gallery = reid_rankings({"fine-tuned": _results(features, rows)}, rows, k=2)
    assert [q["image"] for q in queries] == ["qa.png", "qb.png"]  # qa wrong at Rank-1, qb right
    index, _, correct = tops["fine-tuned"]
    assert [[gallery[i]["image"] for i in each] for each in index.tolist()] == [["gc.png", "ga.png"],
                                                                                ["gb.png", "ga.png"]]  # fmt: skip
    assert correct.tolist() == [[False, True], [True, False]]


def test_text_rankings_mark_the_images_of_each_caption():
    image_rows = [{"image": f"{n}.png", "split": s} for n, s in [("t", "train"), ("a", "query0"), ("b", "gallery0"),
                                                                  ("c", "gallery0")]]  # fmt: skip
    features = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    text = {"images": [1, 2, 3], "captions": ["red", "blue", "red"], "unique": ["blue", "red"],
            "text": torch.tensor([[0.0, 1.0], [1.0, 0.2]])}  # fmt: skip
    result = {**_results(features, image_rows), "_text": text}
    captions, tops, images = text_rankings({"fine-tuned": result}, k=3)
    assert captions == ["blue", "red"]  # both right at Rank-1: both shown
    index, _, correct = tops["fine-tuned"]
    assert [[images[i]["image"] for i in each] for each in index.tolist()] == [["b.png", "c.png", "a.png"],
                                                                               ["c.png", "a.png", "b.png"]]  # fmt: skip
    assert correct.tolist() == [[True, False, False], [True, True, False]]  # a caption shared by two images


def test_figures_are_written_and_k_0_writes_none(tmp_path):
    rows = _reid_rows()
    for row in rows:
        Image.new("RGB", (40, 30), (200, 90, 40)).save(tmp_path / row["image"])
    features = torch.randn(len(rows), 4, generator=torch.Generator().manual_seed(0))
    text = {"images": [0, 1, 2, 3, 4], "captions": ["a", "b", "a", "b", "c"], "unique": ["a", "b", "c"],
            "text": torch.randn(3, 4)}  # fmt: skip
    results = {"baseline": {**_results(features, rows), "_text": text},
               "fine-tuned": {**_results(features + 0.5, rows), "_text": text}}  # fmt: skip
    assert ranked_figures(results, rows, tmp_path, 0, tmp_path / "off") == {}
    (tmp_path / "run").mkdir()
    figures = ranked_figures(results, rows, tmp_path, 2, tmp_path / "run")
    assert set(figures) == {"ranked", "ranked_text"}
    # a row per query and model, the query and its top 2 in each
    assert len(figures["ranked"].axes) == 2 * 2 * 3 and len(figures["ranked_text"].axes) == 3 * 2 * 3
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ranked.png", "ranked_text.png"]
    assert Image.open(tmp_path / "run" / "ranked.png").size[0] > 300
    assert not (tmp_path / "off").exists()


@pytest.mark.slow
def test_a_run_on_caption_data_pictures_image_and_caption_queries(tmp_path):
    from tests.test_prepare import caption_folder
    from tests.test_train import QUICK, train

    folder = caption_folder(tmp_path / "data" / "captions", split=lambda n: "test" if n >= 18 else "train")
    base = [q for q in QUICK if not q.startswith("data.source")]
    overrides = ["data=captions", f"data.source.root={folder}", "data.batch_size=4", "eval.ranked=3", "run_name=c"]
    train(tmp_path, *overrides, base=base)
    run = tmp_path / "runs" / "c"
    assert "retrieval/text_to_image_R@1" in json.loads((run / "metrics.json").read_text())["metrics"]
    for name in ("ranked.png", "ranked_text.png"):
        assert Image.open(run / name).size[0] > 300, name


def test_a_negative_k_is_refused_naming_the_setting():
    from handclip.errors import ConfigError
    from handclip.eval import EvalSettings

    with pytest.raises(ConfigError, match="eval.ranked=-1 must be an integer from 0 to 20"):
        EvalSettings(baseline=False, test=True, flip_tta=False, text=False, batch_size=8, ranked=-1)
