"""The text-side check before training: how well the training identities' captions stand apart, and the warning
with its fix when they do not and the text tower is frozen."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from handclip.eval.separability import advice, caption_identifiability


class Words(nn.Module):
    """A stand-in text tower: each distinct word of the last position is its own direction."""

    def __init__(self, words: list[str]):
        super().__init__()
        self.words = words
        self.weight = nn.Parameter(torch.eye(len(words)))

    def tokenize(self, texts):
        index = torch.tensor([[self.words.index(t.split()[-1])] for t in texts])
        return {"input_ids": index, "attention_mask": torch.ones_like(index)}

    def encode_text(self, input_ids, attention_mask=None):
        return self.weight[input_ids[:, 0]]


ROWS = [{"identity": str(i), "person": str(i)} for i in range(4)]


def test_captions_that_differ_stand_apart_and_identical_ones_are_at_chance():
    tower = Words(["0", "1", "2", "3", "hand"])
    apart = caption_identifiability(tower, ROWS, lambda r: f"the hand of {r['person']}")
    # orthogonal captions at logit scale 100: each identity keeps all but e^-100 of the probability
    assert apart["identifiability"] == pytest.approx(1.0) and apart["chance"] == 0.25 and apart["shared"] == 0
    assert advice(apart, text_trains=False) is None
    same = caption_identifiability(tower, ROWS, lambda r: "a hand")
    assert same["identifiability"] == pytest.approx(0.25) and same["shared"] == 4
    kind, words = advice(same, text_trains=False)
    assert kind == "warning" and "probability 0.25 (chance 0.25); 4 share their caption word for word" in words
    assert "freeze.text_blocks=2" in words and "loss=strong" in words
    assert advice(same, text_trains=True)[0] == "note"
    assert caption_identifiability(tower, ROWS[:1], lambda r: "a hand") == {}  # one identity: nothing to separate


@pytest.mark.slow
def test_a_run_with_a_frozen_text_tower_warns_when_its_captions_do_not_separate_people(tmp_path):
    from tests.test_train import train

    result = train(tmp_path, "freeze=text_frozen", "data.captions=[a photo of a hand]", "eval.wise_ft=null",
                   "run_name=t")  # fmt: skip
    said = " ".join(result.stdout.split())
    assert "warning: the text side tells the" in said and "word for word" in said and "the text tower is frozen" in said
    metrics = json.loads((tmp_path / "runs" / "t" / "metrics.json").read_text())["metrics"]
    assert metrics["text/caption_identifiability"] == pytest.approx(metrics["text/caption_identifiability_chance"])
