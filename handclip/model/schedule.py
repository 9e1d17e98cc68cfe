"""Unfreeze schedules: freeze policies that change with the epoch.

    Gradual   start from a policy, and every `every` epochs let `blocks` more groups of each
              named tower train, from the top down (gradual unfreezing, as in ULMFiT)
    Staged    an explicit list {epoch: policy}, e.g. the projection for two epochs, then the
              last 4 vision blocks

Every policy answers the same questions (`FreezePolicy`'s schedule protocol: `policy_at(epoch)`,
`first_epoch`, `changes_within`, `plan`, `warmup_steps`), a policy that never changes being a
schedule of one entry; a schedule answers them for what it trains at each epoch. The training glue
asks `policy_at(epoch)` at the start of each epoch. The policy is a pure function of the epoch, so a
resumed run is at the same point of the schedule (its settings are part of the resume signature).
Parameters that start frozen are already in the optimiser; `first_epoch` tells it when each group
starts to train, for its own warm-up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from handclip.checks import integer
from handclip.errors import ConfigError
from handclip.model.backbone import TOWERS, BackboneFacts, LayerGroup
from handclip.model.freeze import FreezePolicy


def _positive(key: str, value, low: int = 1) -> int:
    return integer(f"freeze.{key}", value, low)


def _policy(key: str, value) -> FreezePolicy:
    if not isinstance(value, FreezePolicy):
        raise ConfigError(f"freeze.{key} must be a freeze policy with a _target_ (see conf/freeze/), got {value!r}")
    return value


class FreezeSchedule(FreezePolicy):
    """Base class: a policy per epoch. `warmup_steps`: the ramp of a group's lr after it unfreezes."""

    def __init__(self, warmup_steps: int = 0, train_logit_scale: bool = True, **ignored):
        super().__init__(train_logit_scale, **ignored)
        self.warmup_steps = _positive("warmup_steps", warmup_steps, low=0)

    def policy_at(self, epoch: int) -> FreezePolicy:
        raise NotImplementedError

    def policies(self) -> list[FreezePolicy]:
        raise NotImplementedError

    def adapt(self, backbone) -> None:
        # adapters of every stage exist from the start, so the optimiser holds them all
        for policy in self.policies():
            policy.adapt(backbone)

    def merge(self, backbone) -> str | None:
        merged = [line for policy in self.policies() if (line := policy.merge(backbone))]
        return "; ".join(merged) or None

    def trains(self, group: LayerGroup, name: str) -> bool:
        return self.policy_at(0).trains(group, name)

    def check_result(self, names: list[str], trainable: list[str]) -> None:
        self.policy_at(0).check_result(names, trainable)

    def first_epoch(self, group: LayerGroup, name: str, epochs: int) -> int | None:
        return next((e for e in range(epochs) if self.policy_at(e).trains(group, name)), None)


class _Frontier(FreezePolicy):
    """`start`, plus every group of `towers` within `depth` of the top."""

    def __init__(self, start: FreezePolicy, towers: Sequence[str], depth: int, train_logit_scale: bool):
        super().__init__(train_logit_scale)
        self.start, self.towers, self.depth = start, towers, depth

    @property
    def label(self) -> str:
        return f"{self.start.label} + groups of depth <= {self.depth} in {', '.join(self.towers)}"

    def trains(self, group: LayerGroup, name: str) -> bool:
        return self.start.trains(group, name) or (group.tower in self.towers and group.depth <= self.depth)


class Gradual(FreezeSchedule):
    """Every `every` epochs, `blocks` more groups of each of `towers` train, from the top down."""

    def __init__(self, start: FreezePolicy, every: int = 1, blocks: int = 1, towers: Sequence[str] = ("vision",),
                 warmup_steps: int = 0, train_logit_scale: bool = True, **ignored):  # fmt: skip
        super().__init__(warmup_steps, train_logit_scale, **ignored)
        self.start = _policy("start", start)
        self.every, self.blocks = _positive("every", every), _positive("blocks", blocks)
        towers = [towers] if isinstance(towers, str) else list(towers)
        if not towers or any(t not in TOWERS for t in towers):
            raise ConfigError(f"freeze.towers={towers!r}: choose from {', '.join(TOWERS)}")
        self.towers = towers

    def settings(self) -> tuple[str, ...]:
        return ("start", "every", "blocks", "towers", "warmup_steps")

    @property
    def label(self) -> str:
        return f"gradual ({self.blocks} more group(s) of {'+'.join(self.towers)} every {self.every} epoch(s))"

    def check(self, facts: BackboneFacts) -> None:
        self.start.check(facts)

    def check_epochs(self, epochs: int) -> None:
        if epochs <= self.every:
            raise ConfigError(
                f"freeze.every={self.every} with trainer.max_epochs={epochs}: the first group would unfreeze at epoch "
                f"{self.every}, after the run's last epoch ({epochs - 1}), so the schedule would never act; lower "
                "freeze.every or raise trainer.max_epochs"
            )

    def policies(self) -> list[FreezePolicy]:
        return [self.start]

    def policy_at(self, epoch: int) -> FreezePolicy:
        depth = (epoch // self.every) * self.blocks
        if depth == 0:
            return self.start
        return _Frontier(self.start, self.towers, depth, self.train_logit_scale)


class Staged(FreezeSchedule):
    """An explicit plan: `stages` maps the epoch a policy starts at to that policy (epoch 0 needed)."""

    def __init__(self, stages: Mapping[int | str, FreezePolicy], warmup_steps: int = 0, train_logit_scale: bool = True,
                 **ignored):  # fmt: skip
        super().__init__(warmup_steps, train_logit_scale, **ignored)
        if not isinstance(stages, Mapping) or not stages:
            raise ConfigError("freeze.stages must map epochs to policies, e.g. {0: ..., 2: ...}")
        parsed = {}
        for epoch, policy in stages.items():
            try:
                number = int(epoch)
            except (TypeError, ValueError):
                raise ConfigError(f"freeze.stages: {epoch!r} is not an epoch number") from None
            parsed[_positive(f"stages.{epoch}", number, low=0)] = _policy(f"stages.{epoch}", policy)
        if 0 not in parsed:
            raise ConfigError(f"freeze.stages starts at epoch {min(parsed)}: give the policy for epoch 0 too")
        self.stages = dict(sorted(parsed.items()))

    def settings(self) -> tuple[str, ...]:
        return ("stages", "warmup_steps")

    @property
    def label(self) -> str:
        return "staged (" + "; ".join(f"epoch {e}: {p.label}" for e, p in self.stages.items()) + ")"

    def check(self, facts: BackboneFacts) -> None:
        for policy in self.stages.values():
            policy.check(facts)

    def check_epochs(self, epochs: int) -> None:
        late = [epoch for epoch in self.stages if epoch >= epochs]
        if late:
            raise ConfigError(
                f"freeze.stages.{late[0]} starts at epoch {late[0]}, but trainer.max_epochs={epochs} ends the run "
                f"after epoch {epochs - 1}, so that stage would never act; remove it or raise trainer.max_epochs"
            )

    def policies(self) -> list[FreezePolicy]:
        return list(self.stages.values())

    def policy_at(self, epoch: int) -> FreezePolicy:
        return self.stages[max(e for e in self.stages if e <= epoch)]
