"""Unfreezing on a validation plateau (`freeze=plateau`, `handclip.model.schedule.OnPlateau`): the rule, what it
plans before it knows, a run that follows it, and a resume across one of its stages."""

from __future__ import annotations

import csv
import re
import signal

import pytest
import torch

from handclip.errors import ConfigError
from handclip.model import Frozen, apply_freeze
from handclip.model.schedule import OnPlateau


def plateau(**settings) -> OnPlateau:
    return OnPlateau(Frozen(), **{"patience": 2, "blocks": 1, "towers": ["vision"], **settings})


def stalls(scores: list[float], patience: int, min_delta: float = 0.0) -> list[int]:
    """The epochs a stage begins at, for the selecting scores of epochs 0, 1, ...: written out from the rule, apart
    from the schedule (a stage's best not beaten by more than min_delta in its last `patience` validations)."""
    begun, stage = [], []
    for epoch, score in enumerate(scores):
        stage.append(score)
        if len(stage) > patience and max(stage[-patience:]) <= max(stage[:-patience]) + min_delta:
            begun.append(epoch + 1)
            stage = []
    return begun


@pytest.mark.parametrize("scores, patience, min_delta", [
    ([0.1, 0.2, 0.3, 0.3, 0.3, 0.4, 0.4, 0.4, 0.4], 2, 0.0),
    ([0.5, 0.4, 0.3, 0.2, 0.6, 0.6], 1, 0.0),
    ([0.1, 0.105, 0.11, 0.2, 0.21], 2, 0.01),
])  # fmt: skip
def test_a_stage_begins_after_patience_validations_without_a_gain(tiny_model, scores, patience, min_delta):
    schedule = plateau(patience=patience, min_delta=min_delta)
    apply_freeze(tiny_model, schedule)  # reads the tower's depth: 3 blocks, so 4 stages unfreeze every group
    began = [epoch + 1 for epoch, score in enumerate(scores) if schedule.observe(epoch, score)]
    assert began == schedule.begun == stalls(scores, patience, min_delta)[:4]
    assert began  # every case stalls at least once
    groups = {g.name: g for g in tiny_model.layer_groups("vision")}
    top, first = groups["vision.blocks.2"], began[0]
    assert not schedule.policy_at(first - 1).trains(top, next(iter(top.parameters)))
    assert schedule.policy_at(first).trains(top, next(iter(top.parameters)))  # the top block and final norm first
    assert schedule.policy_at(first).label.endswith("groups of depth <= 1 in vision")


def test_what_it_plans_is_the_earliest_a_group_could_train_whatever_validation_says(tiny_model):
    schedule = plateau(patience=2)
    apply_freeze(tiny_model, schedule)
    groups = {g.name: g for g in tiny_model.all_groups()}
    first = {name: schedule.first_epoch(g, next(iter(g.parameters)), 12) for name, g in groups.items()}
    # the projection trains from the start (Frozen trains the projections); stage k no sooner than k x 3
    assert first["vision.projection"] == 0 and first["vision.blocks.2"] == first["vision.final_norm"] == 3
    assert (first["vision.blocks.1"], first["vision.blocks.0"], first["vision.embeddings"]) == (6, 9, None)
    assert first["text.blocks.1"] is None  # the text tower is not in the schedule's towers
    for epoch, score in enumerate([0.5, 0.5, 0.5, 0.5, 0.5, 0.5]):  # stalls at once: stages at 3 and 6...
        schedule.observe(epoch, score)
    # ... and the plan does not move with what the run heard: optimiser groups and caches are the same on resume
    assert schedule.first_epoch(groups["vision.blocks.2"], next(iter(groups["vision.blocks.2"].parameters)), 12) == 3
    # the warm-up of a group planned for epoch 6 (stage 2) begins where stage 2 really began
    schedule.load_state_dict({"begun": [4, 8], "scores": [0.1]})
    assert schedule.start_step(6 * 10, 10) == 80 and schedule.start_step(3 * 10, 10) == 40
    assert schedule.start_step(9 * 10, 10) == 90  # stage 3 has not begun: as planned
    again = plateau(patience=2)
    again.load_state_dict(schedule.state_dict())
    assert (again.begun, again.scores) == ([4, 8], [0.1])


def test_settings_that_could_never_act_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"freeze.patience=3 with trainer.max_epochs=4: .* never act"):
        plateau(patience=3).check_epochs(4)
    with pytest.raises(ConfigError, match=r"freeze.patience=0"):
        plateau(patience=0)
    with pytest.raises(ConfigError, match=r"freeze.min_delta"):
        plateau(min_delta=-0.1)
    with pytest.raises(ConfigError, match=r"freeze.towers=\['image'\]"):
        plateau(towers=["image"])


PLATEAU = ["freeze=plateau", "freeze.patience=1", "eval.smooth=1", "freeze.warmup_steps=3"]


@pytest.mark.slow
def test_a_run_unfreezes_where_its_validation_stalled_and_a_resume_crosses_a_stage_exactly(tmp_path):
    from tests.test_resume import STOPPED, start, weights_of
    from tests.test_train import train

    overrides = [*STOPPED, "trainer.max_epochs=6", *PLATEAU]
    whole = train(tmp_path / "whole", *overrides)
    run = tmp_path / "whole" / "runs" / "r"
    history = [float(r["val/mAP"]) for r in csv.DictReader(open(next(run.rglob("metrics.csv")))) if r.get("val/mAP")]
    assert len(history) == 6
    expected = [epoch for epoch in stalls(history[:-1], 1) if epoch < 6]  # the last validation begins nothing
    table = (run / "freeze.txt").read_text()
    assert [int(e) for e in re.findall(r"^epoch (\d+): freeze policy", table, re.M)] == expected
    assert expected, "the tiny model's validation never stalled: the run shows nothing"
    assert "unfreeze plan if validation stalls soonest" in whole.stdout
    # the same run, interrupted in the epoch after its first stage began, then resumed
    process = start(tmp_path / "split", *overrides, script="tests/step_printer.py")
    from handclip.io import load_checkpoint_file

    steps = load_checkpoint_file(run / "checkpoints" / "last.ckpt")["global_step"] // 6  # steps per epoch
    stop_at = expected[0] * steps + 1  # inside the first epoch of the new stage, after its first step
    for line in process.stdout:
        if line.strip() == f"handclip-test-step {stop_at}":
            process.send_signal(signal.SIGINT)
            break
    assert process.communicate(timeout=120)[0] is not None and process.returncode == 1
    result = train(tmp_path / "split", *overrides, "ckpt_path=last")
    assert "resuming" in result.stdout
    split_table = (tmp_path / "split" / "runs" / "r" / "freeze.txt").read_text()
    assert re.findall(r"^epoch (\d+): freeze", split_table, re.M) == re.findall(r"^epoch (\d+): freeze", table, re.M)
    a, b = weights_of(tmp_path / "whole"), weights_of(tmp_path / "split")
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-5), name


def test_a_late_groups_warm_up_starts_where_its_stage_really_began():
    from functools import partial

    from torch import nn

    from handclip.train.optim import Optimization, ParameterInfo, warmup_cosine

    early, late = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimization = Optimization(lr=1.0, weight_decay=0.0, head_lr_multiplier=1.0, optimizer=torch.optim.SGD,
                                schedule=partial(warmup_cosine, warmup=0))  # fmt: skip
    schedule = plateau(patience=2)
    schedule.load_state_dict({"begun": [5]})  # stage 1, planned for epoch 3 at the soonest, began at epoch 5
    infos = [ParameterInfo("early", early, False, False), ParameterInfo("late", late, False, False, starts_at=30)]
    optimizer, scheduler = optimization.build(infos, 100, 4, partial(schedule.start_step, steps_per_epoch=10))
    ramp = []
    for _ in range(56):
        ramp.append(optimizer.param_groups[1]["lr"] / optimizer.param_groups[0]["lr"])  # the late group's factor
        optimizer.step()
        scheduler.step()
    # the ramp over 4 steps runs from step 50 (epoch 5), not from the planned step 30
    assert ramp[30:50] == [0.0] * 20
    assert ramp[50:56] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_validating_more_than_once_an_epoch_is_refused_with_this_schedule(tmp_path):
    from handclip.train.config import build_components
    from tests.test_config import compose_plain

    cfg = compose_plain(tmp_path, "experiment=demo", "freeze=plateau", "+trainer.val_check_interval=0.5")
    with pytest.raises(ConfigError, match=r"counts one validation an epoch, and trainer.val_check_interval=0.5"):
        build_components(cfg)


@pytest.mark.slow
def test_a_scheduled_run_refuses_to_resume_over_another_number_of_epochs(tmp_path):
    from tests.test_resume import STOPPED
    from tests.test_train import train

    scheduled = [*STOPPED, "trainer.max_epochs=3", "freeze=gradual", "freeze.every=1"]
    train(tmp_path, *scheduled)
    def files():  # what the run left, but the lock file a process holds while it runs
        return sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "runs" / "r").rglob("*") if p.name != ".lock")

    before = files()
    result = train(tmp_path, *scheduled, "trainer.max_epochs=5", "ckpt_path=last", check=False)
    assert result.returncode == 2
    assert "trainer.max_epochs=5, but the run was planned over 3 epochs" in result.stderr + result.stdout
    assert files() == before  # nothing written
