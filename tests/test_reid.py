import pytest
import torch

from handclip.eval.reid import evaluate


def unit(*angles_deg):
    a = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float))
    return torch.stack([torch.cos(a), torch.sin(a)], 1)


def test_ranks_and_ap_worked_out_by_hand():
    # query at 0 deg, id 1. Gallery by similarity: 10 deg (id 2), 20 deg (id 1), 30 deg (id 3), 40 deg (id 1)
    query, query_ids = unit(0), torch.tensor([1])
    gallery, gallery_ids = unit(40, 10, 30, 20), torch.tensor([1, 2, 3, 1])
    result = evaluate(query, query_ids, gallery, gallery_ids)
    assert result["rank1"] == 0.0 and result["rank5"] == 1.0
    # true matches at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5
    assert result["mAP"] == pytest.approx(0.5)


def test_two_queries_averaged():
    query, query_ids = unit(0, 90), torch.tensor([1, 2])
    gallery, gallery_ids = unit(5, 80, 100), torch.tensor([1, 3, 2])
    # query 1: match at rank 1 -> AP 1. query 2: 80 (id3) and 100 (id2) tie at 10 deg: a tie counts
    # against the query, so the match is at rank 2 -> AP 1/2
    result = evaluate(query, query_ids, gallery, gallery_ids)
    assert result["rank1"] == pytest.approx(0.5)
    assert result["mAP"] == pytest.approx(0.75)


def test_constant_embedding_scores_at_chance_not_perfect():
    features = torch.ones(5, 4)
    ids = torch.arange(5)
    result = evaluate(features, ids, features, ids)
    assert result["rank1"] == 0.0 and result["mAP"] == pytest.approx(0.2)


def test_distractors_only_in_gallery_lower_the_score():
    query, query_ids = unit(0), torch.tensor([1])
    gallery, gallery_ids = unit(20), torch.tensor([1])
    assert evaluate(query, query_ids, gallery, gallery_ids)["rank1"] == 1.0
    with_distractor = evaluate(query, query_ids, unit(20, 5), torch.tensor([1, 99]))
    assert with_distractor["rank1"] == 0.0 and with_distractor["mAP"] == pytest.approx(0.5)


def test_query_without_gallery_identity_is_left_out_and_counted():
    query, query_ids = unit(0, 50), torch.tensor([1, 7])
    gallery, gallery_ids = unit(1, 60), torch.tensor([1, 2])
    result = evaluate(query, query_ids, gallery, gallery_ids)
    assert result["rank1"] == 1.0 and result["queries"] == 1 and result["queries_without_match"] == 1
    with pytest.raises(ValueError, match="no query identity appears in the gallery"):
        evaluate(unit(0), torch.tensor([7]), gallery, gallery_ids)


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="differ in length"):
        evaluate(unit(0, 1), torch.tensor([1]), unit(0), torch.tensor([1]))
