"""What SigLIP does differently from CLIP, as a user meets it: its own preprocessing, its pretrained sigmoid scale and
bias in the loss and the freeze table, the families told apart, and a run that trains and exports one. The
backbone contract (groups, cuts, FLOPs, adapters, exports) is held in tests/test_backbone_contract.py."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from handclip.data.transforms import eval_transform
from handclip.errors import BackboneError
from handclip.losses import Objective, SigLIPLoss, clamp_logit_scale
from handclip.losses.objective import LossInputs
from handclip.losses.siglip import siglip_loss
from handclip.model import HuggingFaceCLIP, HuggingFaceSigLIP, LastN, apply_freeze
from handclip.model.hf.spec import hub_spec
from handclip.train.config import objective_facts
from tests.conftest import TINY

SIGLIP = {"name": "tiny-siglip", "source": "tiny", "seed": 0, "config": {
    "vision_config": dict(TINY["config"]["vision_config"]),
    "text_config": {**TINY["config"]["text_config"], "max_position_embeddings": 64}}}  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("siglip-cache")


@pytest.fixture
def siglip(cache):
    return HuggingFaceSigLIP(**SIGLIP).load(cache).eval()


def test_images_reach_siglip_as_its_own_processor_makes_them_resized_whole_not_cropped(siglip):
    from transformers import SiglipImageProcessor

    rng = np.random.default_rng(0)  # a smooth 4:3 picture, with its left and right edges unlike its middle
    small = (rng.random((6, 8, 3)) * 255).astype("uint8")
    picture = Image.fromarray(small).resize((320, 240), Image.BICUBIC)
    ours = eval_transform(siglip.image_size, siglip.resize_size, siglip.image_mean, siglip.image_std)(picture)
    processor = SiglipImageProcessor(size={"height": siglip.image_size, "width": siglip.image_size})
    theirs = processor(images=picture, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    cropped = eval_transform(siglip.image_size, siglip.image_size, siglip.image_mean, siglip.image_std)(picture)
    assert (cropped - theirs).abs().max() > 0.1  # a centre crop, as CLIP takes, would not be what SigLIP saw


def test_the_siglip_loss_starts_from_the_models_own_scale_and_bias_and_trains_them(siglip):
    with torch.no_grad():  # a scale as a pretrained SigLIP has: t = exp(4.77) = 118, above CLIP's clamp of 100
        siglip.logit_scale.fill_(4.77)
        siglip.logit_bias.fill_(-12.9)
    objective = Objective({"siglip": functools.partial(SigLIPLoss)}, **objective_facts(siglip.facts, 0))
    assert list(objective.parameters()) == []  # the term owns no second scale and bias
    tokens = siglip.tokenize(["a dorsal hand", "a palmar hand", "a ring"])
    pixels = torch.randn(3, 3, siglip.image_size, siglip.image_size, generator=torch.Generator().manual_seed(0))
    image, text = siglip.encode_image(pixels), siglip.encode_text(**tokens)
    inputs = LossInputs(image, text, siglip.logit_scale, logit_bias=siglip.logit_bias)
    loss, _ = objective(inputs)
    expected = siglip_loss(image, text, torch.tensor(4.77), torch.tensor(-12.9))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert siglip.logit_bias.grad is not None and siglip.logit_bias.grad.abs().item() > 0
    assert siglip.logit_scale.grad is not None
    clamp_logit_scale(siglip.logit_scale, siglip.logit_scale_max)  # what training does after every step
    assert siglip.logit_scale.item() == pytest.approx(4.77)  # left at SigLIP's value, not cut to ln 100
    # with a CLIP backbone the term learns its own pair, from the paper's values
    clip = Objective({"siglip": functools.partial(SigLIPLoss)}, **objective_facts(HuggingFaceCLIP(**TINY).facts(), 0))
    own = dict(clip.named_parameters())
    assert own["terms.siglip.log_scale"].item() == pytest.approx(math.log(10)) and own["terms.siglip.bias"] == -10


def test_the_freeze_table_shows_the_bias_which_trains_with_the_scale(siglip):
    report = apply_freeze(siglip, LastN(vision_blocks=1, text_blocks=0))
    rows = {row.group: row.status for row in report.rows}
    assert list(rows)[:3] == ["logit_scale", "logit_bias", "vision.attention_pool"]
    assert rows["logit_bias"] == "yes" and rows["vision.attention_pool"] == "yes" and rows["text.final_norm"] == "no"
    report = apply_freeze(siglip, LastN(vision_blocks=1, text_blocks=0, train_logit_scale=False))
    assert not siglip.logit_bias.requires_grad and not siglip.logit_scale.requires_grad
    assert {row.group: row.status for row in report.rows}["logit_bias"] == "no"


def test_each_family_is_told_from_its_config_and_naflex_is_refused_naming_what_serves(tmp_path, cache):
    from transformers import CLIPConfig, Siglip2Config

    siglip_folder = HuggingFaceSigLIP(**SIGLIP).tiny_dir(cache)
    clip_folder, naflex = tmp_path / "clip", tmp_path / "naflex"
    CLIPConfig().save_pretrained(clip_folder)
    Siglip2Config().save_pretrained(naflex)
    assert isinstance(hub_spec(str(siglip_folder)), HuggingFaceSigLIP)
    assert type(hub_spec(str(clip_folder))) is HuggingFaceCLIP
    with pytest.raises(BackboneError, match="holds a siglip model, not a clip one: .*HuggingFaceSigLIP"):
        HuggingFaceCLIP(source=str(siglip_folder)).facts()
    with pytest.raises(BackboneError, match="holds a clip model, not a siglip one: .*HuggingFaceCLIP"):
        HuggingFaceSigLIP(source=str(clip_folder)).load(cache)  # refused before any weights are read
    for spec in (HuggingFaceSigLIP(source=str(naflex)), hub_spec(str(naflex))):
        with pytest.raises(BackboneError, match="NaFlex .* not served; .*fixed-resolution checkpoints"):
            spec.facts()


@pytest.mark.slow
def test_a_siglip_run_trains_its_bias_and_exports_a_siglip_model(tmp_path):
    from handclip.model.exports import load_export
    from handclip.tools.export import export
    from tests.test_train import QUICK, train

    base = ["backbone=tiny_siglip" if o == "backbone=tiny" else o for o in QUICK]
    train(tmp_path, "loss=siglip", "run_name=siglip", "eval.wise_ft=null", base=base)
    run = next(tmp_path.rglob("siglip/metrics.json")).parent
    assert "logit_bias" in (run / "freeze.txt").read_text()
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert not any(name.startswith("objective.") for name in state)  # the loss used the model's own pair
    assert state["backbone.model.logit_bias"].item() != pytest.approx(-10.0, abs=1e-6)  # it trained
    model = load_export(export(run, tmp_path / "model"))
    assert type(model).__name__ == "SiglipBackbone"
    torch.testing.assert_close(model.logit_bias.detach(), state["backbone.model.logit_bias"])


def test_a_tiny_siglip_and_a_tiny_clip_of_the_same_fields_are_kept_apart(cache):
    fields = {"name": "same", "source": "tiny", "seed": 0, "config": SIGLIP["config"]}
    siglip, clip = HuggingFaceSigLIP(**fields).tiny_dir(cache), HuggingFaceCLIP(**fields).tiny_dir(cache)
    assert siglip != clip and siglip.name.startswith("tiny-siglip-") and clip.name.startswith("tiny-")
    assert type(hub_spec(str(siglip))) is HuggingFaceSigLIP and type(hub_spec(str(clip))) is HuggingFaceCLIP


def test_learned_words_find_their_slot_with_a_tokenizer_without_a_start_token(siglip):
    from handclip.losses.prompts import WordSlots

    def error(key, value, allowed):
        return ValueError(f"{key}={value!r}: {allowed}")

    slots = WordSlots("a photo of a {} hand.", 1, error)
    ids, _, positions = slots.tokens(siglip)
    assert ids.shape == (1, 64) and positions.tolist() == [5]  # after the start token and "a photo of a"

    class NoStart:  # as SigLIP 1's tokenizer: no start token, the end token pads
        def tokenize(self, texts):
            words = {"a": 9, "photo": 10, "of": 11, "x": 12, "hand.": 13}
            rows = [[words[w] for w in text.split()] + [1] * (8 - len(text.split())) for text in texts]
            return {"input_ids": torch.tensor(rows), "attention_mask": torch.ones(len(rows), 8, dtype=torch.long)}

    _, _, positions = WordSlots("a photo of a {} hand.", 1, error).tokens(NoStart())
    assert positions.tolist() == [4]


def test_the_sigmoid_loss_is_siglips_own_on_its_own_model(siglip):
    from handclip.losses.siglip import siglip_loss

    captions = ["a dorsal hand", "a palmar hand", "a ring", "painted nails"]
    tokens = siglip.tokenize(captions)
    pixels = torch.randn(4, 3, siglip.image_size, siglip.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = siglip.model(input_ids=tokens["input_ids"], pixel_values=pixels, return_loss=True).loss
        ours = siglip_loss(siglip.encode_image(pixels), siglip.encode_text(**tokens), siglip.logit_scale,
                           siglip.logit_bias)  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_tiny_siglip_starts_its_scale_and_bias_where_asked_and_a_hub_one_from_its_own(cache):
    from handclip.errors import ConfigError

    paper, small = HuggingFaceSigLIP(**SIGLIP), HuggingFaceSigLIP(**SIGLIP, init_logit_bias=-4.85)
    assert paper.tiny_dir(cache) != small.tiny_dir(cache)  # other starting weights, another folder
    loaded = small.load(cache)
    assert loaded.logit_bias.item() == pytest.approx(-4.85) and loaded.logit_scale.item() == pytest.approx(math.log(10))
    assert paper.load(cache).logit_bias.item() == pytest.approx(-10.0)
    with pytest.raises(ConfigError, match="init_logit_scale and init_logit_bias are only for source=tiny"):
        HuggingFaceSigLIP(source="google/siglip-base-patch16-224", init_logit_bias=-5.0)
