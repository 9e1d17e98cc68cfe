import pytest
import torch
from handclip.backbone import load_backbone, read_backbone_config, tiny_backbone_dir

from handclip.errors import BackboneError, ConfigError
from tests.conftest import TINY


def test_tiny_backbone_round_trips_through_from_pretrained(tmp_path):
    from transformers import CLIPModel

    first = load_backbone(TINY, tmp_path)
    directory = tiny_backbone_dir(TINY, tmp_path)
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    again = CLIPModel.from_pretrained(directory)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert first.image_size == 32 and first.resize_size == 32
    assert first.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_tokenizer_is_clips_real_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    backbone = load_backbone(TINY, tmp_path)
    tokenizer = backbone.tokenizer
    assert isinstance(tokenizer, CLIPTokenizer)
    assert len(tokenizer) == 49408
    # the hub's openai/clip-vit-base-patch32 tokenizer gives these ids for this text
    assert tokenizer("a photo of a hand")["input_ids"] == [49406, 320, 1125, 539, 320, 2463, 49407]
    assert backbone.model.config.text_config.eos_token_id == tokenizer.eos_token_id == 49407


def test_text_embedding_pools_at_end_of_text_not_first_token(tmp_path):
    from handclip.embeddings import text_embeddings

    backbone = load_backbone(TINY, tmp_path)
    tokens = backbone.tokenizer(["a dorsal hand", "a palmar hand"], padding=True, return_tensors="pt")
    with torch.no_grad():
        features = text_embeddings(backbone.model, tokens["input_ids"], tokens["attention_mask"])
    # under the causal mask the first token's state is the same for every caption
    assert not torch.allclose(features[0], features[1])


def test_same_seed_same_weights(tmp_path):
    a = load_backbone(TINY, tmp_path / "a").model.visual_projection.weight
    b = load_backbone(TINY, tmp_path / "b").model.visual_projection.weight
    assert torch.equal(a, b)


def test_local_directory_loads_like_a_hub_id(tmp_path):
    directory = tiny_backbone_dir(TINY, tmp_path)
    backbone = load_backbone({"name": "local", "source": str(directory)})
    assert backbone.model.config.vision_config.num_hidden_layers == 3
    assert read_backbone_config({"source": str(directory)}).projection_dim == 16


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
    spec = {"source": "tiny", "config": {"vision_config": {"hidden_size": 30, "num_attention_heads": 4}}}
    with pytest.raises(ConfigError, match="hidden_size=30 must be divisible by num_attention_heads=4"):
        read_backbone_config(spec)
