import lightning as L
import pytest
import torch

from handclip.errors import ConfigError
from handclip.model import Frozen, LastN, apply_freeze, load_backbone, trainable_parameter_names
from handclip.model.schedule import Gradual, Staged
from handclip.train.callbacks import FollowFreezeSchedule
from tests.conftest import TINY
from tests.test_module import datamodule_for, fine_tuner, trainer


def test_gradual_adds_groups_from_the_top_every_n_epochs(tiny_model):
    schedule = Gradual(start=Frozen(), every=2, blocks=1, towers=["vision"])
    names = {}
    for epoch in range(8):
        apply_freeze(tiny_model, schedule.policy_at(epoch))
        names[epoch] = {n for n in trainable_parameter_names(tiny_model) if n.startswith("vision_model")}
    assert names[0] == names[1] == set()
    assert names[2] == names[3] and {n.split(".")[1] for n in names[2]} == {"encoder", "post_layernorm"}
    assert all(".layers.2." in n or "post_layernorm" in n for n in names[2])
    assert any(".layers.1." in n for n in names[4]) and not any(".layers.0." in n for n in names[4])
    assert not any("embeddings" in n for n in names[6]) and any(".layers.0." in n for n in names[6])
    assert [e for e, _ in schedule.plan(tiny_model, 8)] == [0, 2, 4, 6]


def test_staged_follows_its_plan_and_checks_it():
    schedule = Staged(stages={0: Frozen(), "3": LastN(vision_blocks=2, text_blocks=0)})
    assert schedule.policy_at(2).label == "frozen" and schedule.policy_at(3).label.startswith("last_n")
    with pytest.raises(ConfigError, match="starts at epoch 2: give the policy for epoch 0 too"):
        Staged(stages={2: Frozen()})
    with pytest.raises(ConfigError, match="freeze.stages: 'x' is not an epoch number"):
        Staged(stages={"x": Frozen()})
    with pytest.raises(ConfigError, match="freeze.every=0 must be an integer >= 1"):
        Gradual(start=Frozen(), every=0)


def test_a_schedule_unfreezes_at_its_epochs_and_weights_move_only_after(synthetic_hands, tmp_path):
    backbone = load_backbone(TINY, tmp_path)
    schedule = Staged(stages={0: Frozen(), 2: LastN(vision_blocks=1, text_blocks=0)}, warmup_steps=2)
    apply_freeze(backbone, schedule)
    datamodule = datamodule_for(synthetic_hands, backbone)
    module = fine_tuner(backbone, datamodule, lr=1e-3)
    module.freeze = schedule
    layers = backbone.model.vision_model.encoder.layers
    top, below = layers[2].mlp.fc1.weight, layers[1].mlp.fc1.weight
    seen = {}

    class Watch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen[trainer.current_epoch] = (top.detach().clone(), below.detach().clone(), top.requires_grad)

    fit = trainer(4, FollowFreezeSchedule(schedule, [], tmp_path / "freeze.txt"), Watch())
    fit.fit(module, datamodule=datamodule)
    assert [seen[e][2] for e in range(4)] == [False, False, True, True]
    assert torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[1][0], seen[2][0])
    assert not torch.equal(seen[2][0], seen[3][0])
    assert torch.equal(seen[0][1], below.detach())  # below the unfrozen block: never trained
    assert "epoch 2: freeze policy: last_n" in (tmp_path / "freeze.txt").read_text()
    # the optimiser held the top block from the start
    held = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert id(top) in held and id(below) in held


def test_a_group_that_unfreezes_later_warms_up_from_then_on(tiny_model):
    import functools

    from handclip.losses import ContrastiveLoss, Objective
    from handclip.train.module import FineTuner
    from handclip.train.optim import Optimization, warmup_cosine

    schedule = Staged(stages={0: Frozen(), 2: LastN(vision_blocks=1, text_blocks=0)}, warmup_steps=4)
    optimization = Optimization(1e-3, 0.0, 1.0, functools.partial(torch.optim.AdamW),
                                functools.partial(warmup_cosine, warmup=0))  # fmt: skip
    module = FineTuner(tiny_model, Objective({"c": ContrastiveLoss()}), optimization, freeze=schedule)
    optimizer, scheduler = optimization.build(module.optimised_parameters(steps_per_epoch=5, epochs=4), 20, 4)
    top = tiny_model.model.vision_model.encoder.layers[2].mlp.fc1.weight
    group = next(g for g in optimizer.param_groups if any(p is top for p in g["params"]))
    projection = next(g for g in optimizer.param_groups if any(p is tiny_model.model.visual_projection.weight
                                                                   for p in g["params"]))  # fmt: skip
    rates = []
    for _ in range(14):
        rates.append((group["lr"], projection["lr"]))
        optimizer.step()
        scheduler.step()
    assert all(r == 0.0 for r, _ in rates[:10])  # frozen until epoch 2 = step 10
    assert rates[10][0] == pytest.approx(0.25 * rates[10][1]) and rates[13][0] == pytest.approx(rates[13][1])
