import functools

import pytest
import torch

from handclip.errors import ConfigError
from handclip.losses import ContrastiveLoss, Objective
from handclip.model import Frozen, Full, Replace, apply_freeze
from handclip.train.module import FineTuner
from handclip.train.optim import Optimization, warmup_cosine, warmup_steps


def optimization(**changes) -> Optimization:
    settings = {"lr": 1e-4, "weight_decay": 0.2, "head_lr_multiplier": 10.0,
                "optimizer": functools.partial(torch.optim.AdamW), "schedule": None, **changes}  # fmt: skip
    return Optimization(**settings)


def groups_of(backbone, optim=None, heads=()) -> list[dict]:
    objective = Objective({"clip": ContrastiveLoss()})
    module = FineTuner(backbone, objective, optim or optimization(), heads=heads)
    return (optim or optimization()).parameter_groups(module.optimised_parameters())


def test_no_weight_decay_on_biases_norms_embeddings_and_logit_scale(tiny_model):
    apply_freeze(tiny_model, Full())
    groups = groups_of(tiny_model)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    prefix = "backbone.model."
    assert prefix + "logit_scale" in plain
    assert prefix + "vision_model.embeddings.patch_embedding.weight" in plain
    assert prefix + "text_model.embeddings.token_embedding.weight" in plain
    assert prefix + "vision_model.encoder.layers.0.layer_norm1.weight" in plain
    assert prefix + "vision_model.encoder.layers.0.mlp.fc1.bias" in plain
    assert prefix + "vision_model.encoder.layers.0.mlp.fc1.weight" in decayed
    assert prefix + "visual_projection.weight" in decayed
    assert decayed | plain == {prefix + n for n, _ in tiny_model.model.named_parameters()}


def test_the_optimiser_holds_frozen_parameters_too_and_heads_get_their_own_lr(tiny_model):
    heads = Replace(dim=8).apply(tiny_model)
    apply_freeze(tiny_model, Frozen(), always_trainable=heads)
    lrs = {n.removeprefix("backbone.model."): g["lr"] for g in groups_of(tiny_model, heads=heads) for n in g["names"]}
    # everything is there, so what unfreezes later trains without rebuilding the optimiser
    assert set(lrs) == {n for n, _ in tiny_model.model.named_parameters()}
    assert lrs["logit_scale"] == 1e-4 and lrs["vision_model.encoder.layers.0.mlp.fc1.weight"] == 1e-4
    assert lrs["visual_projection.weight"] == pytest.approx(1e-3)
    assert lrs["text_projection.weight"] == pytest.approx(1e-3)


def test_a_frozen_parameter_in_the_optimiser_does_not_move(tiny_model):
    apply_freeze(tiny_model, Frozen())
    optim = optimization(lr=1e-2)
    module = FineTuner(tiny_model, Objective({"c": ContrastiveLoss()}), optim)
    optimizer, _ = optim.build(module.optimised_parameters(), 10)
    frozen = tiny_model.model.vision_model.encoder.layers[0].mlp.fc1.weight
    before, projection = frozen.detach().clone(), tiny_model.model.visual_projection.weight.detach().clone()
    loss = tiny_model.encode_image(torch.randn(2, 3, 32, 32)).pow(2).sum()
    loss.backward()
    optimizer.step()
    assert torch.equal(frozen, before)  # no gradient: AdamW (and its weight decay) leave it alone
    assert not torch.equal(tiny_model.model.visual_projection.weight, projection)


def test_warmup_as_share_or_steps():
    assert warmup_steps(0.1, 200) == 20 and warmup_steps(30, 200) == 30 and warmup_steps(0, 50) == 0


def test_schedule_warms_up_then_decays_per_step():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    schedule = warmup_cosine(optimizer, total_steps=10, warmup=0.2)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == 0.0 and rates[1] == pytest.approx(0.5) and rates[2] == pytest.approx(1.0)
    assert rates[2:] == sorted(rates[2:], reverse=True) and rates[-1] < 0.05


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": 0}, "optim.lr=0 must be"),
        ({"weight_decay": -1}, "optim.weight_decay=-1 must be"),
        ({"head_lr_multiplier": -1}, "optim.head_lr_multiplier=-1 must be"),
        ({"optimizer": None}, "optim.optimizer needs a _target_"),
    ],
)
def test_bad_optimiser_settings_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        optimization(**changes)


def test_a_negative_warmup_is_refused():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError, match="optim.schedule.warmup=-1"):
        warmup_cosine(optimizer, 10, -1)


def test_layer_decay_gives_each_group_lr_times_decay_to_its_depth(tiny_model):
    heads = Replace(dim=8).apply(tiny_model)
    apply_freeze(tiny_model, Full(), always_trainable=heads)
    optim = optimization(layer_decay={"vision": 0.5, "text": None})
    lrs = {n: g["lr"] for g in groups_of(tiny_model, optim, heads=heads) for n in g["names"]}
    for group in tiny_model.layer_groups("vision"):
        for name in group.parameters:
            expected = 1e-4 * (10.0 if group.kind == "projection" else 0.5**group.depth)  # the new head: x10
            assert lrs["backbone.model." + name] == expected, name
    assert lrs["backbone.model.vision_model.encoder.layers.2.mlp.fc1.weight"] == 1e-4 * 0.5  # the top block: depth 1
    assert lrs["backbone.model.vision_model.embeddings.patch_embedding.weight"] == 1e-4 * 0.5**4
    assert {lrs["backbone.model." + n] for g in tiny_model.layer_groups("text")[:-1] for n in g.parameters} == {1e-4}
    assert lrs["backbone.model.logit_scale"] == 1e-4
    with pytest.raises(ConfigError, match="optim.layer_decay.audio is not a tower"):
        optimization(layer_decay={"audio": 0.5})
    with pytest.raises(ConfigError, match="optim.layer_decay.vision=0 must be"):
        optimization(layer_decay={"vision": 0})
