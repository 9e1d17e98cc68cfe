import pytest
import torch

from handclip.eval.protocol import extract_image_features, images_needed, protocol_pairs, score_protocol


def rows_for(splits: dict[str, list[tuple[str, str]]]) -> list[dict]:
    return [
        {"image": image, "identity": identity, "split": split}
        for split, items in splits.items()
        for image, identity in items
    ]


def test_score_protocol_per_run_mean_and_std():
    rows = rows_for(
        {
            "train": [("t1", "a"), ("t2", "b")],
            "val": [("v1", "a"), ("v2", "b")],
            "query0": [("q1", "c"), ("q2", "d")],
            "gallery0": [("g1", "c"), ("g2", "d")],
            "query1": [("g1", "c"), ("g2", "d")],
            "gallery1": [("q1", "c"), ("q2", "d")],
        }
    )
    images = images_needed(rows)
    assert [r["image"] for r in images] == ["t1", "t2", "v1", "v2", "q1", "q2", "g1", "g2"]
    angle = {"t1": 0, "t2": 90, "v1": 5, "v2": 85, "q1": 0, "q2": 10, "g1": 20, "g2": 90}
    features = torch.tensor(
        [
            [
                torch.cos(torch.deg2rad(torch.tensor(float(angle[r["image"]])))),
                torch.sin(torch.deg2rad(torch.tensor(float(angle[r["image"]])))),
            ]
            for r in images
        ]
    )
    result = score_protocol(features, images, rows)
    assert result["metrics"]["val/rank1"] == 1.0
    # run 0: q1 (0 deg) is nearest g1 (20): right; q2 (10) is nearest g1 too: wrong.
    # run 1: g1 (20) is nearest q2 (10): wrong; g2 (90) is nearest q2 (80 away vs 90): right.
    assert [r["rank1"] for r in result["runs"]["test"]] == [0.5, 0.5]
    assert result["metrics"]["test/rank1"] == pytest.approx(0.5) and result["metrics"]["test/rank1_std"] == 0.0
    assert len(result["cmc"]["test"]) == 20 and result["cmc"]["test"][-1] == 1.0
    # validation keeps each query's score, in manifest order, for paired comparisons; the test runs do not
    assert result["per_query"] == {"val": {"rank1": [1.0, 1.0], "rank5": [1.0, 1.0], "rank10": [1.0, 1.0],
                                           "mAP": [1.0, 1.0]}}  # fmt: skip


def test_pairs_never_evaluate_on_test_for_validation():
    rows = rows_for({"train": [("a", "x")], "val": [("b", "x")], "query0": [("c", "y")], "gallery0": [("d", "y")]})
    assert protocol_pairs(rows, include_test=False) == [("val", None, "val", "train")]


def test_flip_tta_sums_image_and_mirror(tiny_model):
    images = torch.randn(3, 3, 32, 32)
    dataset = [{"pixel_values": x} for x in images]
    plain = extract_image_features(tiny_model, dataset, batch_size=2)
    flipped = extract_image_features(tiny_model, dataset, batch_size=2, flip=True)
    mirror = extract_image_features(tiny_model, [{"pixel_values": x.flip(-1)} for x in images], batch_size=2)
    assert torch.allclose(flipped, plain + mirror, atol=1e-5)
