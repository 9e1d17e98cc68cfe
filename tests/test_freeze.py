import re

import pytest

from handclip.errors import ConfigError
from handclip.model import Frozen, Full, LastN, Pattern, Replace, TextFrozen, apply_freeze, trainable_parameter_names
from handclip.model.backbone import BackboneFacts, TowerFacts


def blocks(tower: str, indices) -> set[str]:
    prefix = f"{tower}_model.encoder.layers"
    names = []
    for i in indices:
        for part in (
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.q_proj",
            "self_attn.out_proj",
            "layer_norm1",
            "mlp.fc1",
            "mlp.fc2",
            "layer_norm2",
        ):
            names += [f"{prefix}.{i}.{part}.weight", f"{prefix}.{i}.{part}.bias"]
    return set(names)


PROJECTIONS = {"visual_projection.weight", "text_projection.weight"}
POST_LN = {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"}
FINAL_LN = {"text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}


@pytest.mark.parametrize(
    ("vision_blocks", "text_blocks", "expected"),
    [
        (0, 0, PROJECTIONS | {"logit_scale"}),
        (1, 0, PROJECTIONS | {"logit_scale"} | POST_LN | blocks("vision", [2])),
        (2, 1, PROJECTIONS | {"logit_scale"} | POST_LN | blocks("vision", [1, 2]) | FINAL_LN | blocks("text", [1])),
        (
            3,
            2,
            PROJECTIONS | {"logit_scale"} | POST_LN | blocks("vision", [0, 1, 2]) | FINAL_LN | blocks("text", [0, 1]),
        ),
    ],
)
def test_last_n_trains_exactly_the_top_blocks(tiny_model, vision_blocks, text_blocks, expected):
    apply_freeze(tiny_model, LastN(vision_blocks=vision_blocks, text_blocks=text_blocks))
    assert set(trainable_parameter_names(tiny_model)) == expected
    # requires_grad itself, not only the names the helper reports
    trainable = {n.removeprefix("model.") for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == expected


def test_frozen_trains_projections_and_optionally_logit_scale(tiny_model):
    apply_freeze(tiny_model, Frozen())
    assert set(trainable_parameter_names(tiny_model)) == PROJECTIONS | {"logit_scale"}
    apply_freeze(tiny_model, Frozen(train_logit_scale=False))
    assert set(trainable_parameter_names(tiny_model)) == PROJECTIONS


def test_full_trains_everything_and_report_counts_match(tiny_model):
    report = apply_freeze(tiny_model, Full())
    total = sum(p.numel() for p in tiny_model.parameters())
    assert report.total == report.trainable == total
    assert all(row.status == "yes" for row in report.rows)


def test_text_frozen_trains_the_whole_image_tower_only(tiny_model):
    apply_freeze(tiny_model, TextFrozen())
    names = set(trainable_parameter_names(tiny_model))
    vision = {n for n, _ in tiny_model.model.named_parameters() if n.startswith("vision_model.")}
    assert names == vision | {"visual_projection.weight", "logit_scale"}
    assert "vision_model.embeddings.patch_embedding.weight" in names


def test_pattern_policy_uses_include_and_exclude(tiny_model):
    apply_freeze(
        tiny_model, Pattern(include=[r"\.mlp\.", r"^text_projection"], exclude=[r"text_model"], train_logit_scale=False)
    )
    names = set(trainable_parameter_names(tiny_model))
    expected = {n for n, _ in tiny_model.model.named_parameters() if ".mlp." in n and n.startswith("vision_model")}
    assert names == expected | {"text_projection.weight"}


def test_report_table_lists_groups_from_the_top(tiny_model):
    report = apply_freeze(tiny_model, LastN(vision_blocks=1, text_blocks=0))
    groups = [r.group for r in report.rows]
    assert groups[:5] == [
        "logit_scale",
        "vision.projection",
        "vision.final_norm",
        "vision.blocks.2",
        "vision.blocks.1",
    ]
    status = {r.group: r.status for r in report.rows}
    assert status["vision.blocks.2"] == "yes" and status["vision.blocks.1"] == "no"
    assert report.policy == "last_n (vision_blocks=1, text_blocks=0)" and Full().label == "full"
    assert TextFrozen().label == "text_frozen"
    text = report.to_text()
    assert "vision.blocks.2" in text and f"{report.trainable:,}" in text


FACTS = BackboneFacts(vision=TowerFacts(3, 32, 2, 64), text=TowerFacts(2, 32, 2, 64), projection_dim=16, image_size=32)


@pytest.mark.parametrize(("key", "value"), [("vision_blocks", 4), ("text_blocks", 3), ("vision_blocks", -1)])
def test_too_many_or_negative_blocks_is_a_config_error(key, value):
    with pytest.raises(ConfigError, match=rf"freeze.{key}={value} (is out of range|must be)"):
        LastN(**{"vision_blocks": 0, "text_blocks": 0, key: value}).check(FACTS)
    LastN(vision_blocks=3, text_blocks=2).check(FACTS)  # the largest values pass


def test_unknown_settings_and_bad_values_are_named():
    with pytest.raises(ConfigError, match="freeze.vision_block is not a freeze setting .did you mean .*vision_blocks"):
        LastN(vision_block=1)
    with pytest.raises(ConfigError, match="freeze.text_blocks is missing"):
        LastN(vision_blocks=1)
    with pytest.raises(ConfigError, match="not a regular expression"):
        Pattern(include=["("])
    with pytest.raises(ConfigError, match="freeze.include is empty"):
        Pattern(include=[])
    with pytest.raises(ConfigError, match="freeze.train_logit_scale='yes' must be true or false"):
        Full(train_logit_scale="yes")
    # an experiment's last_n settings do not stop a switch to another policy on the command line
    assert Full(vision_blocks=4, text_blocks=4).train_logit_scale is True


def test_applying_a_policy_checks_it_against_the_model(tiny_model):
    with pytest.raises(ConfigError, match="freeze.vision_blocks=4 is out of range: the backbone's vision tower has 3"):
        apply_freeze(tiny_model, LastN(vision_blocks=4, text_blocks=0))


def test_a_pattern_that_matches_nothing_or_a_policy_that_trains_nothing_is_refused(tiny_model):
    message = re.escape("freeze.include: '^visual_proj$' matches no parameter of this model")
    with pytest.raises(ConfigError, match=message):
        apply_freeze(tiny_model, Pattern(include=["^visual_proj$"]))
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        apply_freeze(tiny_model, Pattern(include=["^visual_projection"], exclude=["weight"], train_logit_scale=False))


def test_replaced_heads_train_under_any_policy(tiny_model):
    heads = Replace(dim=8).apply(tiny_model)
    apply_freeze(tiny_model, Pattern(include=["^text_model.embeddings.token"], exclude=["."]), always_trainable=heads)
    assert set(trainable_parameter_names(tiny_model)) == PROJECTIONS | {"logit_scale"}


def test_bias_only_trains_every_bias_and_the_projections(tiny_model):
    from handclip.model import BiasOnly

    apply_freeze(tiny_model, BiasOnly(train_projections=True))
    names = set(trainable_parameter_names(tiny_model))
    biases = {n for n, _ in tiny_model.model.named_parameters() if n.endswith(".bias")}
    assert names == biases | PROJECTIONS | {"logit_scale"}
    apply_freeze(tiny_model, BiasOnly(train_projections=False, train_logit_scale=False))
    assert set(trainable_parameter_names(tiny_model)) == biases


def test_clipfit_trains_the_text_feed_forward_biases_and_the_image_norms(tiny_model):
    from handclip.model import CLIPFit

    apply_freeze(tiny_model, CLIPFit(train_projections=False, train_logit_scale=False))
    names = set(trainable_parameter_names(tiny_model))
    clip = tiny_model.model
    # the feed-forward output layer's bias, as the authors' code unlocks (open_clip's c_proj.bias)
    text = {f"text_model.encoder.layers.{i}.mlp.fc2.bias" for i in range(len(clip.text_model.encoder.layers))}
    vision = {n for n, _ in clip.vision_model.named_parameters() if "norm" in n or "layrnorm" in n}
    assert names == text | {f"vision_model.{n}" for n in vision}
    assert len(text) == 2 and len(vision) == 2 * (2 * 3 + 2)  # 2 text blocks; 3 blocks' 2 norms + pre, post


def test_norms_only_trains_exactly_the_layer_norms(tiny_model):
    from handclip.model import NormsOnly

    apply_freeze(tiny_model, NormsOnly(train_projections=False, train_logit_scale=False))
    names = set(trainable_parameter_names(tiny_model))
    norms = {n for n, _ in tiny_model.model.named_parameters() if "norm" in n}  # layer_norm1, pre_layrnorm, ...
    assert names == norms and len(norms) == 2 * (2 * 3 + 2 + 2 * 2 + 1)  # weight+bias: blocks' 2, pre/post, final
