import pytest
import torch

from handclip.errors import BackboneError, ConfigError
from handclip.model import HuggingFaceCLIP, load_backbone
from tests.conftest import TINY


def spec(**changes) -> HuggingFaceCLIP:
    return HuggingFaceCLIP(**{**TINY, **changes})


def test_tiny_backbone_round_trips_through_from_pretrained(tmp_path):
    from transformers import CLIPModel

    first = load_backbone(TINY, tmp_path)
    directory = spec().tiny_dir(tmp_path)
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    again = CLIPModel.from_pretrained(directory)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert first.image_size == 32 and first.resize_size == 32
    assert first.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_building_the_tiny_backbone_leaves_the_global_random_stream_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    spec().tiny_dir(tmp_path)  # builds it (first use)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_is_clips_real_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    backbone = load_backbone(TINY, tmp_path)
    tokenizer = backbone.tokenizer
    assert isinstance(tokenizer, CLIPTokenizer)
    assert len(tokenizer) == 49408
    # the hub's openai/clip-vit-base-patch32 tokenizer gives these ids for this text
    assert tokenizer("a photo of a hand")["input_ids"] == [49406, 320, 1125, 539, 320, 2463, 49407]
    assert backbone.tokenize(["a photo of a hand"])["input_ids"].tolist() == [[49406, 320, 1125, 539, 320, 2463, 49407]]
    assert backbone.model.config.text_config.eos_token_id == tokenizer.eos_token_id == 49407


def test_text_embedding_pools_at_end_of_text_not_first_token(tmp_path):
    backbone = load_backbone(TINY, tmp_path)
    tokens = backbone.tokenize(["a dorsal hand", "a palmar hand"])
    with torch.no_grad():
        features = backbone.encode_text(tokens["input_ids"], tokens["attention_mask"])
    # under the causal mask the first token's state is the same for every caption
    assert not torch.allclose(features[0], features[1])


def test_same_seed_same_weights(tmp_path):
    a = load_backbone(TINY, tmp_path / "a").model.visual_projection.weight
    b = load_backbone(TINY, tmp_path / "b").model.visual_projection.weight
    assert torch.equal(a, b)


def test_local_directory_loads_like_a_hub_id(tmp_path):
    directory = spec().tiny_dir(tmp_path)
    backbone = load_backbone({"name": "local", "source": str(directory)})
    assert backbone.model.config.vision_config.num_hidden_layers == 3
    facts = HuggingFaceCLIP(str(directory)).facts()
    assert facts.projection_dim == 16 and facts.vision.depth == 3 and facts.text.depth == 2
    assert facts.image_size == 32 and facts.patch_size == 16


def test_missing_weights_error_says_what_was_tried_and_how_to_fix():
    with pytest.raises(BackboneError) as error:
        load_backbone({"name": "vit_b32", "source": "no-such-org/no-such-model"})
    message = str(error.value)
    assert "Could not load backbone 'no-such-org/no-such-model'" in message and "not found" in message
    assert "HF_HUB_OFFLINE=1" in message and "backbone=local" in message and "experiment=demo" in message


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(BackboneError, match=r"backbone.source=.*no-such-model: no such directory"):
        load_backbone({"name": "local", "source": str(tmp_path / "no-such-model")})


def test_uneven_heads_are_a_config_error():
    with pytest.raises(ConfigError, match="hidden_size=30 must be divisible by num_attention_heads=4"):
        HuggingFaceCLIP("tiny", config={"vision_config": {"hidden_size": 30, "num_attention_heads": 4}}).facts()
    with pytest.raises(ConfigError, match="backbone.source is missing"):
        HuggingFaceCLIP(None)


# --- layer groups: the one partition everything reads --------------------------------------


def test_layer_groups_partition_every_parameter_in_order(tiny_model):
    tiny_model.check_partition()  # raises if a parameter is in no group or in two
    vision = tiny_model.layer_groups("vision")
    assert [g.name for g in vision] == [
        "vision.embeddings", "vision.blocks.0", "vision.blocks.1", "vision.blocks.2", "vision.final_norm",
        "vision.projection",
    ]  # fmt: skip
    assert [g.depth for g in vision] == [4, 3, 2, 1, 1, 0]
    assert [g.index for g in vision] == list(range(6))
    assert set(vision[0].parameters) == {
        "vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm.weight",
        "vision_model.pre_layrnorm.bias",
    }  # fmt: skip
    text = tiny_model.layer_groups("text")
    assert [g.name for g in text][-2:] == ["text.final_norm", "text.projection"]
    assert set(text[-1].parameters) == {"text_projection.weight"}
    counted = sum(g.numel() for g in tiny_model.all_groups()) + 1  # + logit_scale
    assert counted == sum(p.numel() for p in tiny_model.parameters())


def test_a_parameter_outside_every_group_is_reported(tiny_model):
    tiny_model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="outside every layer group: extra.weight"):
        tiny_model.check_partition()


@pytest.mark.parametrize("groups", [1, 2, 3, 4])
def test_image_prefix_then_suffix_equals_the_full_forward(tiny_model, groups):
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = tiny_model.encode_image(pixels)
        hidden = tiny_model.image_prefix(pixels, groups)
        assert hidden.shape == (3, 5, 32)  # class token + 2x2 patches, width 32
        assert torch.allclose(tiny_model.image_suffix(hidden, groups), full, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_text_prefix_then_suffix_equals_the_full_forward(tiny_model, groups):
    ids = torch.tensor([[49406, 320, 1125, 49407, 49407], [49406, 321, 49407, 49407, 49407]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        full = tiny_model.encode_text(ids, mask)
        hidden = tiny_model.text_prefix(ids, mask, groups)
        assert torch.allclose(tiny_model.text_suffix(hidden, ids, mask, groups), full, atol=1e-5)


def test_a_prefix_beyond_the_blocks_is_refused(tiny_model):
    with pytest.raises(ValueError, match="must be 1 .embeddings. to 4"):
        tiny_model.image_prefix(torch.zeros(1, 3, 32, 32), 5)


def test_save_pretrained_writes_a_directory_plain_transformers_loads(tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    backbone = load_backbone(TINY, tmp_path / "cache")
    out = backbone.save_pretrained(tmp_path / "out")
    assert (out / "model.safetensors").is_file()
    again = CLIPModel.from_pretrained(out)
    assert torch.equal(again.visual_projection.weight, backbone.model.visual_projection.weight)
    assert AutoTokenizer.from_pretrained(out)("a hand")["input_ids"][-1] == 49407


@pytest.mark.parametrize("groups", [1, 3])
def test_the_pre_projection_feature_is_what_the_projection_maps_to_the_embedding(tiny_model, groups):
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = tiny_model.encode_image(pixels)
        pre, projected = tiny_model.encode_image(pixels, pre_projection=True)
        assert pre.shape == (3, tiny_model.facts.vision.width) and torch.allclose(projected, full, atol=1e-5)
        assert torch.allclose(tiny_model.model.visual_projection(pre), full, atol=1e-5)
        pooled = tiny_model.model.vision_model(pixel_values=pixels).pooler_output
        assert torch.allclose(pre, pooled, atol=1e-5)
        suffix_pre, suffix = tiny_model.image_suffix(
            tiny_model.image_prefix(pixels, groups), groups, pre_projection=True
        )
        assert torch.allclose(suffix_pre, pre, atol=1e-5) and torch.allclose(suffix, full, atol=1e-5)
