import pytest
import torch

from handclip.errors import ConfigError
from handclip.model import Keep, Replace
from handclip.model.backbone import BackboneFacts, TowerFacts

FACTS = BackboneFacts(vision=TowerFacts(3, 32, 2, 64), text=TowerFacts(2, 32, 2, 64), projection_dim=16, image_size=32)


def test_replace_gives_both_towers_the_new_width(tiny_model):
    heads = Replace(dim=24, seed=1).apply(tiny_model)
    assert [tuple(p.shape) for p in heads] == [(24, 32), (24, 32)]  # text, then vision
    assert tiny_model.model.visual_projection.weight.shape == (24, 32)
    assert tiny_model.model.text_projection.weight.shape == (24, 32)
    assert tiny_model.model.config.projection_dim == 24
    pixels = torch.zeros(2, 3, 32, 32)
    ids = torch.tensor([[49406, 320, 49407], [49406, 321, 49407]])
    assert tiny_model.encode_image(pixels).shape == (2, 24)
    assert tiny_model.encode_text(ids).shape == (2, 24)
    # the new heads are the projection groups: freezing and optimiser rules see them
    assert tiny_model.layer_groups("vision")[-1].parameters["visual_projection.weight"] is heads[1]


def test_replacement_is_seeded(tiny_model):
    Replace(dim=8, seed=3).apply(tiny_model)
    first = tiny_model.model.visual_projection.weight.clone()
    Replace(dim=8, seed=3).apply(tiny_model)
    assert torch.equal(first, tiny_model.model.visual_projection.weight)


def test_keep_changes_nothing(tiny_model):
    before = tiny_model.model.visual_projection.weight.clone()
    assert Keep().apply(tiny_model) == []
    assert torch.equal(before, tiny_model.model.visual_projection.weight)


def test_one_tower_at_another_width_is_refused():
    with pytest.raises(
        ConfigError, match=r"projection.towers=\[vision\] with projection.dim=8 leaves the text projection at 16"
    ):
        Replace(dim=8, towers=["vision"]).check(FACTS)
    # at the same width replacing one tower is fine
    Replace(dim=16, towers=["vision"]).check(FACTS)
    assert Replace(dim=16, towers=["vision"]).towers == ["vision"]


def test_bad_projection_settings_are_named():
    with pytest.raises(ConfigError, match="projection.towers has 'audio'.*vision, text"):
        Replace(dim=8, towers=["audio"])
    with pytest.raises(ConfigError, match="projection.dim=0"):
        Replace(dim=0)
