"""Freeze policies: which parameters of a backbone train.

A policy is an object that validates its own settings, checks them against the backbone's
depths before any weights load (`check`), and answers, for each layer group and parameter,
whether it trains (`trains`). Groups come from `Backbone.layer_groups`, counted from the top of
each tower as open_clip's `lock_image_tower` does (see `handclip.model.backbone`).

Built-in policies (one `conf/freeze/*.yaml` file each, chosen with `freeze=NAME`):

    Full          everything trains
    Frozen        only the projections (and logit_scale)
    Locked        nothing of the backbone: only the objective's own parts train (CLIP-ReID stage 1)
    LastN         projection, final norm and the top N blocks of each tower (N=0: projection only)
    TextFrozen    the whole image tower; the text tower is frozen
    Pattern       parameters whose model name matches an include regex and no exclude regex

A policy of your own: subclass `FreezePolicy`, implement `trains`, and point a config file's
`_target_` at it. `train_logit_scale` is every policy's switch for the temperature.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from handclip.checks import flag, integer
from handclip.errors import ConfigError
from handclip.model.backbone import TOWERS, Backbone, BackboneFacts, LayerGroup

# settings of the built-in policies: an experiment may set them for one policy (last_n) and the
# command line switch to another (full), so each policy accepts the others' settings and ignores them
_SHARED_SETTINGS = ("vision_blocks", "text_blocks", "include", "exclude", "train_projections")


class FreezePolicy:
    """Base class: decides `requires_grad` per layer group (and, if it wants, per parameter name)."""

    def __init__(self, train_logit_scale: bool = True, **ignored):
        unknown = sorted(set(ignored) - set(_SHARED_SETTINGS))
        if unknown:
            known = ["train_logit_scale", *self.settings(), *_SHARED_SETTINGS]
            near = difflib.get_close_matches(unknown[0], known, n=1)
            raise ConfigError(
                f"freeze.{unknown[0]} is not a freeze setting"
                + (f" (did you mean freeze.{near[0]}?)" if near else "")
                + f"; settings of {type(self).__name__} are {', '.join(['train_logit_scale', *self.settings()])}"
            )
        self.train_logit_scale = flag("freeze.train_logit_scale", train_logit_scale)

    def settings(self) -> tuple[str, ...]:
        """The policy's own setting names (for messages)."""
        return ()

    @property
    def label(self) -> str:
        """How the freeze table names the policy: the class name in snake case (LastN -> last_n)."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", type(self).__name__).lower()

    def check(self, facts: BackboneFacts) -> None:
        """Refuse settings the backbone cannot satisfy (from its config, before weights load)."""

    def adapt(self, backbone: Backbone) -> None:
        """Add what the policy trains that the model lacks (adapters); once, before the optimiser is built."""

    def merge(self, backbone: Backbone) -> str | None:
        """Fold what `adapt` added into the backbone's own weights, so that it saves as a plain model (export,
        soups); return what was merged, in words (a model card line), or None: by default nothing is."""
        return None

    def trains(self, group: LayerGroup, name: str) -> bool:
        """Whether parameter `name` (a model name, in `group`) trains."""
        raise NotImplementedError

    def check_result(self, names: list[str], trainable: list[str]) -> None:
        """Refuse a result that cannot be what was meant: nothing left to train."""
        if not trainable:
            raise ConfigError(
                f"freeze: {self.label} leaves nothing to train (not even logit_scale); choose a policy that "
                "trains something, e.g. freeze=last_n"
            )

    # the schedule protocol: what trains may change with the epoch (handclip.model.schedule); a policy
    # that never changes is a schedule of one entry, so every caller asks the same questions of both
    warmup_steps: int = 0  # a group's learning rate ramps up over this many steps after it unfreezes

    def policy_at(self, epoch: int) -> FreezePolicy:
        """The policy in force during `epoch`."""
        return self

    def policies(self) -> list[FreezePolicy]:
        """Every policy the schedule can apply."""
        return [self]

    def first_epoch(self, group: LayerGroup, name: str, epochs: int) -> int | None:
        """The first epoch (of `epochs`) in which parameter `name` trains, or None if it never does."""
        return 0 if epochs > 0 and self.trains(group, name) else None

    def start_step(self, earliest: int, steps_per_epoch: int) -> int:
        """The optimiser step from which a group that `first_epoch` said starts at step `earliest` really trains (its
        warm-up runs from there): `earliest` itself, but for a schedule that acts on what validation says."""
        return earliest

    def changes_within(self, epochs: int) -> bool:
        """Whether what trains changes during the first `epochs` epochs."""
        return any(self.policy_at(epoch) is not self.policy_at(0) for epoch in range(1, epochs))

    def check_epochs(self, epochs: int) -> None:
        """Refuse a schedule whose changes all fall after the run's last epoch (they would never act)."""

    def plan(self, backbone: Backbone, epochs: int, always_trainable: Sequence = ()) -> list[tuple[int, FreezeReport]]:
        """(epoch, freeze report) at each epoch where what trains changes, applied to `backbone` (a skeleton will
        do); the backbone is left as at epoch 0. One entry for a policy that never changes."""
        changes, last = [], None
        for epoch in range(epochs if self.changes_within(epochs) else 1):
            report = apply_freeze(backbone, self.policy_at(epoch), always_trainable=always_trainable)
            state = [(row.group, row.status) for row in report.rows]
            if state != last:
                changes.append((epoch, report))
                last = state
        if len(changes) > 1:
            apply_freeze(backbone, self.policy_at(0), always_trainable=always_trainable)
        return changes


class Full(FreezePolicy):
    def trains(self, group: LayerGroup, name: str) -> bool:
        return True


class Frozen(FreezePolicy):
    def trains(self, group: LayerGroup, name: str) -> bool:
        return group.kind == "projection"


class Locked(FreezePolicy):
    """Every backbone parameter frozen, logit_scale too unless `train_logit_scale`: only the objective's
    learnable parts train (learned identity prompts, heads). Empty on the backbone by design."""

    def __init__(self, train_logit_scale: bool = False, **ignored):
        super().__init__(train_logit_scale, **ignored)

    def trains(self, group: LayerGroup, name: str) -> bool:
        return False

    def check_result(self, names: list[str], trainable: list[str]) -> None:
        pass  # what trains lives in the objective; a run without learnable objective parts is refused there


class BiasOnly(FreezePolicy):
    """BitFit: every bias trains (and the projections, with `train_projections`); weights stay."""

    def __init__(self, train_projections: bool = True, train_logit_scale: bool = True, **ignored):
        super().__init__(train_logit_scale, **ignored)
        self.train_projections = flag("freeze.train_projections", train_projections)

    def settings(self) -> tuple[str, ...]:
        return ("train_projections",)

    def trains(self, group: LayerGroup, name: str) -> bool:
        return name.endswith(".bias") or (self.train_projections and group.kind == "projection")


class NormsOnly(BiasOnly):
    """Only the normalisation layers (LayerNorm scale and shift) train, and the projections with
    `train_projections`."""

    def trains(self, group: LayerGroup, name: str) -> bool:
        return name in group.norms or (self.train_projections and group.kind == "projection")


class CLIPFit(BiasOnly):
    """CLIPFit (Li et al., EMNLP 2024): in the text tower the bias of each block's feed-forward output layer trains
    (open_clip's `c_proj.bias`, transformers' `fc2.bias`, as the authors' code unlocks), in the image tower every
    normalisation layer; all weight matrices stay (and the projections, unless `train_projections`)."""

    def trains(self, group: LayerGroup, name: str) -> bool:
        if self.train_projections and group.kind == "projection":
            return True
        if group.tower == "vision":
            return name in group.norms
        return name in group.feed_forward_output and name.endswith(".bias")


class TextFrozen(FreezePolicy):
    def trains(self, group: LayerGroup, name: str) -> bool:
        return group.tower == "vision"


def _block_count(value, key: str) -> int:
    return integer(f"freeze.{key}", value, 0, hint=" (a number of blocks)")


class LastN(FreezePolicy):
    """The top `vision_blocks` / `text_blocks` blocks of each tower, with its final norm and projection."""

    def __init__(self, vision_blocks: int | None = None, text_blocks: int | None = None, train_logit_scale: bool = True,
                 **ignored):  # fmt: skip
        super().__init__(train_logit_scale, **ignored)
        for key, value in (("vision_blocks", vision_blocks), ("text_blocks", text_blocks)):
            if value is None:  # no default here: conf/freeze/last_n.yaml gives them
                raise ConfigError(f"freeze.{key} is missing: LastN needs how many top blocks of each tower train")
        self.blocks = {
            "vision": _block_count(vision_blocks, "vision_blocks"),
            "text": _block_count(text_blocks, "text_blocks"),
        }

    def settings(self) -> tuple[str, ...]:
        return ("vision_blocks", "text_blocks")

    @property
    def label(self) -> str:
        return f"last_n (vision_blocks={self.blocks['vision']}, text_blocks={self.blocks['text']})"

    def check(self, facts: BackboneFacts) -> None:
        for tower in TOWERS:
            depth, value = facts.depth(tower), self.blocks[tower]
            if value > depth:
                raise ConfigError(
                    f"freeze.{tower}_blocks={value} is out of range: the backbone's {tower} tower has "
                    f"{depth} blocks, so {tower}_blocks must be an integer from 0 to {depth}"
                )

    def trains(self, group: LayerGroup, name: str) -> bool:
        blocks = self.blocks[group.tower]
        # depth 0 is the projection; the top block and the final norm are depth 1, and so on
        return group.depth == 0 or (group.kind != "embeddings" and group.depth <= blocks)


class Pattern(FreezePolicy):
    """Parameters whose model name matches any `include` regex and no `exclude` regex."""

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = (), train_logit_scale: bool = True,
                 **ignored):  # fmt: skip
        super().__init__(train_logit_scale, **ignored)
        self.include = self._compile(include, "include")
        self.exclude = self._compile(exclude, "exclude")
        if not self.include:
            raise ConfigError("freeze.include is empty: policy Pattern needs at least one regex")

    def settings(self) -> tuple[str, ...]:
        return ("include", "exclude")

    @staticmethod
    def _compile(patterns, key: str) -> list[re.Pattern]:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
        compiled = []
        for pattern in patterns:
            try:
                compiled.append(re.compile(pattern))
            except (re.error, TypeError) as error:
                raise ConfigError(f"freeze.{key}: {pattern!r} is not a regular expression: {error}") from None
        return compiled

    def trains(self, group: LayerGroup, name: str) -> bool:
        return any(p.search(name) for p in self.include) and not any(p.search(name) for p in self.exclude)

    def check_result(self, names: list[str], trainable: list[str]) -> None:
        for pattern in self.include:
            if not any(pattern.search(name) for name in names):
                raise ConfigError(
                    f"freeze.include: {pattern.pattern!r} matches no parameter of this model; names look like "
                    f"{names[0]}, {names[len(names) // 2]}, {names[-1]}"
                )
        super().check_result(names, trainable)


@dataclass
class GroupRow:
    group: str
    parameters: int
    trainable: int

    @property
    def status(self) -> str:
        if self.trainable == 0:
            return "no"
        return "yes" if self.trainable == self.parameters else "partial"


@dataclass
class FreezeReport:
    """What a policy did: per group parameter counts and trainability, and totals."""

    policy: str
    rows: list[GroupRow] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(r.parameters for r in self.rows)

    @property
    def trainable(self) -> int:
        return sum(r.trainable for r in self.rows)

    def as_dict(self) -> dict:
        return {
            "policy": self.policy,
            "total_parameters": self.total,
            "trainable_parameters": self.trainable,
            "groups": [{"group": r.group, "parameters": r.parameters, "trainable": r.status} for r in self.rows],
        }

    def to_text(self) -> str:
        """A plain-text table (also what goes to the log file)."""
        width = max(len(r.group) for r in self.rows + [GroupRow("total", 0, 0)])
        lines = [f"freeze policy: {self.policy}", f"{'group':<{width}}  {'parameters':>12}  trainable"]
        for r in self.rows:
            lines.append(f"{r.group:<{width}}  {r.parameters:>12,}  {r.status}")
        share = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"{'total':<{width}}  {self.total:>12,}  {self.trainable:,} ({share:.2f}%)")
        return "\n".join(lines)

    def to_rich(self):
        """A `rich.table.Table` for the console."""
        from rich.table import Table

        table = Table(title=f"freeze policy: {self.policy}")
        table.add_column("group")
        table.add_column("parameters", justify="right")
        table.add_column("trainable")
        for r in self.rows:
            colour = {"yes": "green", "partial": "yellow", "no": "dim"}[r.status]
            table.add_row(r.group, f"{r.parameters:,}", f"[{colour}]{r.status}[/{colour}]")
        share = 100.0 * self.trainable / max(self.total, 1)
        table.add_row("total", f"{self.total:,}", f"{self.trainable:,} ({share:.2f}%)", style="bold")
        return table


def freeze_report(backbone: Backbone, label: str) -> FreezeReport:
    """The table of the backbone's current `requires_grad`: logit_scale (and logit_bias), then each tower top down."""
    rows = [GroupRow(name, p.numel(), p.numel() if p.requires_grad else 0) for name, p in backbone.temperature()]
    for tower in TOWERS:
        for group in reversed(backbone.layer_groups(tower)):
            trainable = sum(p.numel() for p in group.parameters.values() if p.requires_grad)
            rows.append(GroupRow(group.name, group.numel(), trainable))
    return FreezeReport(policy=label, rows=rows)


def freeze_policy(made, target: str = "") -> FreezePolicy:
    """`made` (what a `freeze:` config built) if it is a freeze policy; else a ConfigError naming its target."""
    if not isinstance(made, FreezePolicy):
        raise ConfigError(f"freeze._target_={target or type(made).__name__} is not a handclip.model.FreezePolicy "
                          "(see conf/freeze/ and README: your own freeze policy)")  # fmt: skip
    return made


def apply_freeze(backbone: Backbone, policy: FreezePolicy, always_trainable: Sequence = ()) -> FreezeReport:
    """Set `requires_grad` on every parameter of `backbone` by `policy`; return the report.

    `always_trainable` holds parameters that train whatever the policy says (a replaced projection).
    """
    if not isinstance(policy, FreezePolicy):
        raise ConfigError(f"freeze must be a FreezePolicy (got {type(policy).__name__}); see conf/freeze/")
    policy.check(backbone.facts)
    policy.adapt(backbone)
    backbone.check_partition()  # a parameter in no group would escape the policy and the report
    keep = {id(p) for p in always_trainable}
    for group in backbone.all_groups():
        for name, parameter in group.parameters.items():
            parameter.requires_grad_(id(parameter) in keep or bool(policy.trains(group, name)))
    for _, parameter in backbone.temperature():
        parameter.requires_grad_(policy.train_logit_scale)
    names = [n for g in backbone.all_groups() for n in g.parameters]
    policy.check_result(names, trainable_parameter_names(backbone))
    return freeze_report(backbone, policy.label)


def trainable_parameter_names(backbone: Backbone) -> list[str]:
    """Model names of the parameters that currently require gradients (logit_scale and logit_bias included)."""
    names = [n for g in backbone.all_groups() for n, p in g.parameters.items() if p.requires_grad]
    return [name for name, p in backbone.temperature() if p.requires_grad] + names
