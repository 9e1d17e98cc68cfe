import re

import pytest
import torch

from handclip.eval.zeroshot import HAND_PROMPTS, classify, recall_at_k, text_metrics


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
    metrics = text_metrics(features, rows, ["a", "b", "c", "a", "b", "c"], backbone, prompts=HAND_PROMPTS)
    assert {"zeroshot/aspect_accuracy", "zeroshot/gender_accuracy", "zeroshot/nail_polish_accuracy"} <= set(metrics)
    assert "zeroshot/accessories_accuracy" not in metrics  # one class only: nothing to tell apart
    assert metrics["zeroshot/gender_majority"] == pytest.approx(0.5)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["retrieval/text_to_image_R@5"] >= metrics["retrieval/text_to_image_R@1"]


def test_an_aspect_is_also_scored_by_its_halves_back_or_palm_and_which_hand():
    classes = ["dorsal left", "dorsal right", "palmar left", "palmar right"]  # sorted, as text_metrics orders them

    class Prompts:  # stand-in text embeddings: one axis per aspect prompt
        def texts(self, backbone, texts):
            return torch.stack([torch.eye(4)[classes.index(t.split("the ")[1][:-5])] if "the " in t else torch.ones(4)
                                for t in texts])  # fmt: skip

    truth = ["dorsal right", "dorsal left", "palmar right", "palmar left"]
    predicted = ["dorsal left", "dorsal left", "palmar left", "dorsal left"]
    features = torch.stack([torch.eye(4)[classes.index(p)] for p in predicted])
    metrics = text_metrics(features, [{"aspect": a} for a in truth], ["c"] * 4, None, text_cache=Prompts(),
                           prompts=HAND_PROMPTS)  # fmt: skip
    assert metrics["zeroshot/aspect_accuracy"] == pytest.approx(1 / 4)
    assert metrics["zeroshot/dorsal_palmar_accuracy"] == pytest.approx(3 / 4)  # only the last saw the wrong side
    assert metrics["zeroshot/left_right_accuracy"] == pytest.approx(2 / 4)


def test_a_caption_files_own_prompt_tasks_are_scored_and_no_hand_prompt_is(tmp_path):
    """Zero-shot prompts come from the data source: a caption CSV's user names a column and a template (every value a
    class) or the prompts; the hand prompts are the hand sources' own."""
    from handclip.data.sources import CaptionCSV, SyntheticHands
    from handclip.model import load_backbone
    from tests.conftest import TINY

    root = tmp_path / "flowers"
    root.mkdir()
    (root / "captions.csv").write_text("image,caption,identity,colour,size\n")
    source = CaptionCSV(root=str(root), zero_shot={
        "colour": {"column": "colour", "template": "a photo of a {} flower"},
        "size": {"column": "size", "prompts": {"s": "a small flower", "l": "a large flower"}},
    })  # fmt: skip
    prompts = source.prompts()
    assert set(prompts) == {"colour", "size"} and "aspect" in SyntheticHands(root="x").prompts()
    assert CaptionCSV(root=str(root)).prompts() == {}
    rows = [{"colour": c, "size": s} for c, s in [("red", "s"), ("blue", "l"), ("white", "s"), ("red", "l")]]
    backbone = load_backbone(TINY, tmp_path / "cache")
    metrics = text_metrics(torch.randn(4, 16), rows, ["a"] * 4, backbone, prompts=prompts)
    assert metrics["zeroshot/colour_chance"] == pytest.approx(1 / 3)  # red, blue, white: every value a class
    assert metrics["zeroshot/size_chance"] == pytest.approx(1 / 2)
    assert not any(k.startswith(("zeroshot/aspect", "zeroshot/gender")) for k in metrics)
    assert prompts["colour"][1]["white"] == "a photo of a white flower"


@pytest.mark.parametrize(
    ("zero_shot", "message"),
    [
        ({"colour": {"column": "colour"}}, "give prompts ({value: prompt}) or a template"),
        ({"colour": {"column": "colour", "template": "a flower"}}, "must hold {} where the class goes"),
        ({"colour": {"column": "caption", "template": "a {}"}}, "is the file's caption column"),
        ({"colour": {"column": "colour", "prompts": {"red": "a red one"}}}, "two or more class values"),
        ({"colour": {"column": "colour", "template": "a {}", "clases": ["a", "b"]}}, "colour.clases is not a setting"),
    ],
)
def test_a_bad_prompt_task_is_refused_with_its_key(zero_shot, message):
    from handclip.data.sources import CaptionCSV
    from handclip.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        CaptionCSV(root="x", zero_shot=zero_shot)
