import pytest
import torch
from handclip.embeddings import image_embeddings, text_embeddings

from handclip.errors import ConfigError
from handclip.model.projection import check_projection, replace_projection


def test_replace_gives_both_towers_the_new_width(tiny_model):
    replaced = replace_projection(tiny_model, {"name": "replace", "dim": 24, "seed": 1})
    assert replaced == ["text_projection.", "visual_projection."]
    assert tiny_model.visual_projection.weight.shape == (24, 32)
    assert tiny_model.text_projection.weight.shape == (24, 32)
    assert tiny_model.config.projection_dim == 24
    pixels = torch.zeros(2, 3, 32, 32)
    ids = torch.tensor([[49406, 320, 49407], [49406, 321, 49407]])
    assert image_embeddings(tiny_model, pixels).shape == (2, 24)
    assert text_embeddings(tiny_model, ids).shape == (2, 24)


def test_replacement_is_seeded(tiny_model):
    replace_projection(tiny_model, {"name": "replace", "dim": 8, "seed": 3})
    first = tiny_model.visual_projection.weight.clone()
    replace_projection(tiny_model, {"name": "replace", "dim": 8, "seed": 3})
    assert torch.equal(first, tiny_model.visual_projection.weight)


def test_keep_changes_nothing(tiny_model):
    before = tiny_model.visual_projection.weight.clone()
    assert replace_projection(tiny_model, {"name": "keep"}) == []
    assert torch.equal(before, tiny_model.visual_projection.weight)


def test_one_tower_at_another_width_is_refused():
    with pytest.raises(
        ConfigError, match=r"projection.towers=\[vision\] with projection.dim=8 leaves the text projection at 16"
    ):
        check_projection({"name": "replace", "dim": 8, "towers": ["vision"]}, current_dim=16)
    # at the same width replacing one tower is fine
    assert check_projection({"name": "replace", "dim": 16, "towers": ["vision"]}, 16)["towers"] == ["vision"]


def test_bad_projection_settings_are_named():
    with pytest.raises(ConfigError, match="projection.name='swap'.*keep, replace"):
        check_projection({"name": "swap"}, 16)
    with pytest.raises(ConfigError, match="projection.dim=0"):
        check_projection({"name": "replace", "dim": 0}, 16)
