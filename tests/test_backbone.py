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
    assert backbone.model.config.text_config.eos_token_id == tokenizer.eos_token_id == 49407


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


def test_save_pretrained_writes_a_directory_plain_transformers_loads(tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    backbone = load_backbone(TINY, tmp_path / "cache")
    out = backbone.save_pretrained(tmp_path / "out")
    assert (out / "model.safetensors").is_file()
    again = CLIPModel.from_pretrained(out)
    assert torch.equal(again.visual_projection.weight, backbone.model.visual_projection.weight)
    assert AutoTokenizer.from_pretrained(out)("a hand")["input_ids"][-1] == 49407


def test_the_pre_projection_feature_is_the_pooled_class_token_the_projection_maps(tiny_model):
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = tiny_model.encode_image(pixels)
        pre, _ = tiny_model.encode_image(pixels, pre_projection=True)
        assert torch.allclose(tiny_model.model.visual_projection(pre), full, atol=1e-5)
        pooled = tiny_model.model.vision_model(pixel_values=pixels).pooler_output  # post_layernorm(CLS)
        assert torch.allclose(pre, pooled, atol=1e-5)
        assert tiny_model.image_prefix(pixels, 2).shape == (3, 5, 32)  # class token + 2x2 patches, width 32


def test_the_export_folder_is_recognised_by_its_config_and_needs_safetensors(tmp_path):
    directory = spec().tiny_dir(tmp_path)
    assert HuggingFaceCLIP.recognises(directory) and not HuggingFaceCLIP.recognises(tmp_path)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    assert not HuggingFaceCLIP.recognises(tmp_path / "bert")
    loaded = HuggingFaceCLIP.from_export(directory)
    assert loaded.source == str(directory) and loaded.facts() == spec().facts()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(BackboneError, match="has config.json but no model.safetensors"):
        HuggingFaceCLIP.from_export(tmp_path / "bert")


def test_a_folder_that_is_there_but_does_not_load_is_named_with_what_to_do(tmp_path):
    # a damaged local or cached model folder was answered with `hf download <folder>`, which cannot fix it
    directory = spec().tiny_dir(tmp_path)
    (directory / "model.safetensors").write_bytes(b"cut short")
    with pytest.raises(BackboneError) as error:
        load_backbone({"name": "local", "source": str(directory)})
    message = str(error.value)
    assert f"backbone folder {directory} could not be loaded" in message and "delete the folder" in message
    assert "hf download" not in message
