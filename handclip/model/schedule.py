"""Unfreeze schedules: freeze policies that change with the epoch.

    Gradual   start from a policy, and every `every` epochs let `blocks` more groups of each
              named tower train, from the top down (gradual unfreezing, as in ULMFiT)
    Staged    an explicit list {epoch: policy}, e.g. the projection for two epochs, then the
              last 4 vision blocks
    OnPlateau start from a policy, and whenever the selecting validation score has stalled for
              `patience` validations let `blocks` more groups of each named tower train

Every policy answers the same questions (`FreezePolicy`'s schedule protocol: `policy_at(epoch)`,
`first_epoch`, `changes_within`, `plan`, `warmup_steps`), a policy that never changes being a
schedule of one entry; a schedule answers them for what it trains at each epoch. The training glue
asks `policy_at(epoch)` at the start of each epoch. The policy is a pure function of the epoch, so a
resumed run is at the same point of the schedule (its settings are part of the resume signature).
Parameters that start frozen are already in the optimiser; `first_epoch` tells it when each group
starts to train, for its own warm-up.

`OnPlateau` is a function of the epoch and of what validation said so far: the epochs its stages began
(`state_dict`, kept in every checkpoint by the training glue, so a resumed run is at the same point).
What it cannot know in advance it answers for the earliest it could happen: `first_epoch` is the
first epoch a group could train (a stage needs `patience` + 1 validations), so caches never store a
group that may unfreeze, and `start_step` moves a group's warm-up to the step its stage really began.
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


class _TopDown(FreezeSchedule):
    """Base class: start from `start`, then `blocks` more groups of each of `towers` at each stage, from the top down
    (subclasses say when a stage begins)."""

    def __init__(self, start: FreezePolicy, blocks: int = 1, towers: Sequence[str] = ("vision",), warmup_steps: int = 0,
                 train_logit_scale: bool = True, **ignored):  # fmt: skip
        super().__init__(warmup_steps, train_logit_scale, **ignored)
        self.start = _policy("start", start)
        self.blocks = _positive("blocks", blocks)
        towers = [towers] if isinstance(towers, str) else list(towers)
        if not towers or any(t not in TOWERS for t in towers):
            raise ConfigError(f"freeze.towers={towers!r}: choose from {', '.join(TOWERS)}")
        self.towers = towers

    def check(self, facts: BackboneFacts) -> None:
        self.start.check(facts)

    def policies(self) -> list[FreezePolicy]:
        return [self.start]

    def at_stage(self, stage: int) -> FreezePolicy:
        """What trains after `stage` stages (0: the start)."""
        if stage == 0:
            return self.start
        return _Frontier(self.start, self.towers, stage * self.blocks, self.train_logit_scale)


class Gradual(_TopDown):
    """Every `every` epochs, `blocks` more groups of each of `towers` train, from the top down."""

    def __init__(self, start: FreezePolicy, every: int = 1, blocks: int = 1, towers: Sequence[str] = ("vision",),
                 warmup_steps: int = 0, train_logit_scale: bool = True, **ignored):  # fmt: skip
        super().__init__(start, blocks, towers, warmup_steps, train_logit_scale, **ignored)
        self.every = _positive("every", every)

    def settings(self) -> tuple[str, ...]:
        return ("start", "every", "blocks", "towers", "warmup_steps")

    @property
    def label(self) -> str:
        return f"gradual ({self.blocks} more group(s) of {'+'.join(self.towers)} every {self.every} epoch(s))"

    def check_epochs(self, epochs: int) -> None:
        if epochs <= self.every:
            raise ConfigError(
                f"freeze.every={self.every} with trainer.max_epochs={epochs}: the first group would unfreeze at epoch "
                f"{self.every}, after the run's last epoch ({epochs - 1}), so the schedule would never act; lower "
                "freeze.every or raise trainer.max_epochs"
            )

    def policy_at(self, epoch: int) -> FreezePolicy:
        return self.at_stage(epoch // self.every)


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


class OnPlateau(_TopDown):
    """Start from `start`; whenever the selecting validation score (`eval.select`, smoothed as it selects) has not
    risen by more than `min_delta` over `patience` validations of the current stage, `blocks` more groups of each of
    `towers` train from the next epoch, from the top down, until every group of them trains."""

    def __init__(self, start: FreezePolicy, patience: int = 2, min_delta: float = 0.0, blocks: int = 1,
                 towers: Sequence[str] = ("vision",), warmup_steps: int = 0, train_logit_scale: bool = True,
                 **ignored):  # fmt: skip
        super().__init__(start, blocks, towers, warmup_steps, train_logit_scale, **ignored)
        from handclip.checks import number

        self.patience = _positive("patience", patience)
        self.min_delta = number("freeze.min_delta", min_delta, 0, 1)
        self.stages: int | None = None  # how many stages unfreeze every group of the towers (from the facts)
        self.begun: list[int] = []  # the epoch each stage after the first began
        self.scores: list[float] = []  # the current stage's selecting scores, one per validation

    def settings(self) -> tuple[str, ...]:
        return ("start", "patience", "min_delta", "blocks", "towers", "warmup_steps")

    @property
    def label(self) -> str:
        return (f"on plateau ({self.blocks} more group(s) of {'+'.join(self.towers)} after {self.patience} "
                "validation(s) without a gain)")  # fmt: skip

    def check(self, facts: BackboneFacts) -> None:
        super().check(facts)
        deepest = max(facts.depth(tower) + 1 for tower in self.towers)  # the embeddings' depth
        self.stages = -(-deepest // self.blocks)

    def check_epochs(self, epochs: int) -> None:
        if epochs <= self.patience + 1:
            raise ConfigError(
                f"freeze.patience={self.patience} with trainer.max_epochs={epochs}: a stage needs {self.patience + 1} "
                f"validations before the next can begin, at epoch {self.patience + 1} at the earliest, after the run's "
                "last epoch, so the schedule would never act; lower freeze.patience or raise trainer.max_epochs"
            )

    def policy_at(self, epoch: int) -> FreezePolicy:
        return self.at_stage(sum(1 for began in self.begun if began <= epoch))

    def _stage_of(self, group: LayerGroup) -> int | None:
        """The stage from which `group` trains (1: the first after the start), or None if none makes it train."""
        if group.tower not in self.towers:
            return None
        return max(1, -(-group.depth // self.blocks))

    def first_epoch(self, group: LayerGroup, name: str, epochs: int) -> int | None:
        """The earliest epoch `name` could train, whatever validation says: stage k begins after k x (patience + 1)
        validations at the soonest. It never depends on what the run has seen, so the optimiser's groups and the
        caches planned from it are the same in a run and in its resume."""
        if epochs > 0 and self.start.trains(group, name):
            return 0
        stage = self._stage_of(group)
        if stage is None or (self.stages is not None and stage > self.stages):
            return None
        epoch = stage * (self.patience + 1)
        return epoch if epoch < epochs else None

    def changes_within(self, epochs: int) -> bool:
        return epochs > self.patience + 1

    def plan(self, backbone, epochs: int, always_trainable: Sequence = ()) -> list:
        """The plan if every stage stalled as early as it can: what the earliest unfreezes would train."""
        begun = self.begun
        self.begun = [stage * (self.patience + 1) for stage in range(1, (self.stages or 1) + 1)]
        try:
            return super().plan(backbone, epochs, always_trainable)
        finally:
            self.begun = begun

    def observe(self, epoch: int, score: float) -> bool:
        """Record the selecting score of the validation after `epoch`; True when that begins a new stage, at the
        next epoch (the current stage's best has not been beaten by more than `min_delta` for `patience`
        validations)."""
        if self.stages is not None and len(self.begun) >= self.stages:
            return False  # every group of the towers trains already
        self.scores.append(float(score))
        if len(self.scores) <= self.patience:
            return False
        before = max(self.scores[: -self.patience])
        if any(score > before + self.min_delta for score in self.scores[-self.patience :]):
            return False
        self.begun.append(epoch + 1)
        self.scores = []
        return True

    def start_step(self, earliest: int, steps_per_epoch: int) -> int:
        """The step a group whose earliest start is step `earliest` really began to train (`earliest` until its stage
        begins): its warm-up runs from there."""
        if not earliest or not steps_per_epoch:
            return earliest
        stage = earliest // steps_per_epoch // (self.patience + 1)
        return self.begun[stage - 1] * steps_per_epoch if 1 <= stage <= len(self.begun) else earliest

    def state_dict(self) -> dict:
        return {"begun": list(self.begun), "scores": list(self.scores)}

    def load_state_dict(self, state: dict) -> None:
        self.begun = [int(epoch) for epoch in state.get("begun", [])]
        self.scores = [float(score) for score in state.get("scores", [])]
