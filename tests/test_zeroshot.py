import pytest
import torch

from handclip.eval.zeroshot import classify, recall_at_k, text_metrics


def test_classify_picks_the_nearest_prompt():
    images = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]])
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert classify(images, classes).tolist() == [0, 1, 1]


def test_recall_counts_shared_captions_and_ties_against():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.2, 0.8]])
    correct = torch.tensor([[False, False, True], [True, True, False]])
    # row 0: its caption ranks 2nd; row 1: best correct 0.2 ties with another correct one, 0.8 above -> rank 2
    assert recall_at_k(scores, correct, (1, 2)) == {1: 0.0, 2: 1.0}


def test_text_metrics_on_a_tiny_model(tmp_path):
    from handclip.model import load_backbone
    from tests.conftest import TINY

    backbone = load_backbone(TINY, tmp_path)
    rows = [
        {"aspect": "dorsal right", "gender": "male", "nailPolish": "0", "accessories": "0"},
        {"aspect": "palmar left", "gender": "female", "nailPolish": "1", "accessories": "0"},
    ] * 3
    features = torch.randn(6, 16)
    metrics = text_metrics(features, rows, ["a", "b", "c", "a", "b", "c"], backbone)
    assert {"zeroshot/aspect_accuracy", "zeroshot/gender_accuracy", "zeroshot/nail_polish_accuracy"} <= set(metrics)
    assert "zeroshot/accessories_accuracy" not in metrics  # one class only: nothing to tell apart
    assert metrics["zeroshot/gender_majority"] == pytest.approx(0.5)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["retrieval/text_to_image_R@5"] >= metrics["retrieval/text_to_image_R@1"]
