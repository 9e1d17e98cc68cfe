"""CLIP-HandID's pseudo-token term: each image's token, in the prompt's slot, through the text tower, against the
batch's images; and the published recipe runs end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch

from handclip.build import build
from handclip.losses import LossInputs, PseudoTokenLoss
from handclip.losses.contrastive import contrastive_loss
from tests.fake_runs import HF_TINY


@pytest.fixture
def backbone():
    return build(HF_TINY, "backbone").load(os.environ["HANDCLIP_CACHE"])


def test_a_pseudo_token_sits_in_the_words_place_and_learns_from_the_contrastive_terms(backbone):
    facts = backbone.facts
    torch.manual_seed(0)
    term = PseudoTokenLoss(embed_dim=facts.projection_dim, text_width=facts.text.width)
    # the pseudo-token is added to the placeholder word's embedding: an inversion that outputs 0 leaves the plain
    # caption, word for word
    last = term.inversion[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    term.eval()  # no dropout
    images = torch.randn(4, facts.projection_dim)
    plain = backbone.tokenize(["a photo of a x hand."])
    expected = backbone.encode_text(plain["input_ids"], plain["attention_mask"])
    assert torch.allclose(term.pseudo_texts(backbone, images), expected.expand(4, -1), atol=1e-5)

    term = PseudoTokenLoss(embed_dim=facts.projection_dim, text_width=facts.text.width)
    term.train()
    images.requires_grad_(True)
    identities = torch.tensor([0, 0, 1, 1])
    inputs = LossInputs(image=images, text=None, logit_scale=backbone.logit_scale, identities=identities,
                        backbone=backbone)  # fmt: skip
    loss = term(inputs)
    torch.manual_seed(1)
    texts = term.pseudo_texts(backbone, images)  # another dropout draw: another value, the same kind of loss
    assert loss.item() > 0 and contrastive_loss(images, texts, backbone.logit_scale, identities).item() > 0
    loss.backward()
    assert term.inversion[0].weight.grad.abs().sum() > 0  # the inversion network learns
    assert images.grad.abs().sum() > 0  # and so does the image side


def test_a_template_without_one_slot_is_refused(backbone):
    from handclip.errors import ConfigError

    with pytest.raises(ConfigError, match='PseudoTokenLoss.template=.* must be a caption with one "{}"'):
        PseudoTokenLoss(embed_dim=16, text_width=32, template="a photo of a hand.")


@pytest.mark.slow
def test_the_published_clip_handid_recipe_trains_and_scores_the_necks(tmp_path):
    from tests.test_train import train

    train(tmp_path, "experiment=demo_handid", "freeze.vision_blocks=2", "data.identities_per_batch=4",
          "data.batch_size=16", "trainer.log_every_n_steps=1", "run_name=h")  # fmt: skip
    payload = json.loads((tmp_path / "runs" / "h" / "metrics.json").read_text())
    assert payload["eval_feature"] == "bnneck" and 0 <= payload["metrics"]["test/rank1"] <= 1
    log = (tmp_path / "runs" / "h" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_pseudo_tokens" in log and "train/loss_identity" in log
