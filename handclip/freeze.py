"""Freeze policies: which parameters of a `CLIPModel` train.

Groups are counted from the top of each tower, as open_clip's `lock_image_tower` does:
projection, then the last block together with the final norm, then the block below, ..., then
the embeddings with the first norm. "last_n with vision_blocks=N" trains the projection, the
final norm and the top N blocks; N=0 leaves only the projection.

Policies (the mapping in a `conf/freeze/*.yaml` file):

    name: full | frozen | last_n | text_frozen | pattern
    vision_blocks: int        # last_n only
    text_blocks: int          # last_n only
    include: [regex, ...]     # pattern only: trainable if any include matches ...
    exclude: [regex, ...]     # ... and no exclude matches
    train_logit_scale: bool   # every policy; default true
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from handclip.errors import ConfigError
from handclip.settings import plain_dict

POLICIES = ("full", "frozen", "last_n", "text_frozen", "pattern")
_KEYS = {
    "full": set(),
    "frozen": set(),
    "text_frozen": set(),
    "last_n": {"vision_blocks", "text_blocks"},
    "pattern": {"include", "exclude"},
}
_COMMON = {"name", "train_logit_scale"}
# (tower prefix, projection, final norm, first norm or None, short name)
_TOWERS = (
    ("vision_model", "visual_projection", "post_layernorm", "pre_layrnorm", "vision"),
    ("text_model", "text_projection", "final_layer_norm", None, "text"),
)


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


def check_freeze_policy(policy: Any, vision_depth: int, text_depth: int) -> dict:
    """Validate a policy against the model's depths (no weights needed); return it as a dict."""
    policy = plain_dict(policy, "freeze policy", f" with a 'name' (one of {POLICIES})")
    name = policy.get("name")
    if name not in POLICIES:
        raise ConfigError(f"freeze.name={name!r} is not a policy; choose one of {', '.join(POLICIES)}")
    # settings of other policies are ignored (an experiment may set them for last_n and the
    # command line switch to full); a key no policy knows is a typo
    known = set().union(*_KEYS.values()) | _COMMON
    unknown = set(policy) - known
    if unknown:
        raise ConfigError(
            f"freeze.{sorted(unknown)[0]} is not a freeze setting; settings are {', '.join(sorted(known))}"
        )
    if name == "last_n":
        for key, depth, tower in (
            ("vision_blocks", vision_depth, "vision"),
            ("text_blocks", text_depth, "text"),
        ):
            value = policy.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= depth:
                raise ConfigError(
                    f"freeze.{key}={value!r} is out of range: the backbone's {tower} tower has "
                    f"{depth} blocks, so {key} must be an integer from 0 to {depth}"
                )
            policy[key] = value
    if name == "pattern":
        for key in ("include", "exclude"):
            patterns = policy.get(key) or []
            if isinstance(patterns, str):
                patterns = [patterns]
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ConfigError(f"freeze.{key}: {pattern!r} is not a regular expression: {error}") from None
            policy[key] = list(patterns)
        if not policy["include"]:
            raise ConfigError("freeze.include is empty: policy 'pattern' needs at least one regex")
    policy.setdefault("train_logit_scale", True)
    return policy


def _depth(model, tower: str) -> int:
    config = model.config.vision_config if tower == "vision_model" else model.config.text_config
    return int(config.num_hidden_layers)


def parameter_group(name: str, model) -> str:
    """The freeze group a parameter belongs to, e.g. `vision.blocks.11` or `text_projection`."""
    if name == "logit_scale":
        return "logit_scale"
    for prefix, projection, final_norm, first_norm, short in _TOWERS:
        if name.startswith(projection + "."):
            return projection
        if not name.startswith(prefix + "."):
            continue
        rest = name[len(prefix) + 1 :]
        if rest.startswith("encoder.layers."):
            return f"{short}.blocks.{int(rest.split('.')[2])}"
        if rest.startswith(final_norm + "."):
            return f"{short}.{final_norm}"
        if rest.startswith("embeddings.") or (first_norm and rest.startswith(first_norm + ".")):
            return f"{short}.embeddings"
    return "other"


def _trainable_groups(policy: dict, model) -> set[str] | None:
    """Groups that train under a block policy; None for `pattern` (decided per name)."""
    name = policy["name"]
    vision_depth, text_depth = _depth(model, "vision_model"), _depth(model, "text_model")
    everything = {parameter_group(n, model) for n, _ in model.named_parameters()}
    if name == "full":
        return everything
    if name == "pattern":
        return None
    groups = {"visual_projection", "text_projection"}
    if name == "text_frozen":
        return {g for g in everything if g.startswith("vision.") or g == "visual_projection"}
    if name == "last_n":
        for short, blocks, depth, final_norm in (
            ("vision", policy["vision_blocks"], vision_depth, "post_layernorm"),
            ("text", policy["text_blocks"], text_depth, "final_layer_norm"),
        ):
            if blocks > 0:
                groups.add(f"{short}.{final_norm}")
                groups.update(f"{short}.blocks.{i}" for i in range(depth - blocks, depth))
    return groups


def _group_order(group: str, model) -> tuple:
    # table order: logit_scale, then each tower from the top (projection) down to embeddings
    if group == "logit_scale":
        return (0, 0)
    for tower_index, (prefix, projection, final_norm, _, short) in enumerate(_TOWERS, start=1):
        depth = _depth(model, prefix)
        if group == projection:
            return (tower_index, 0)
        if group == f"{short}.{final_norm}":
            return (tower_index, 1)
        if group.startswith(f"{short}.blocks."):
            return (tower_index, 2 + depth - int(group.rsplit(".", 1)[1]))
        if group == f"{short}.embeddings":
            return (tower_index, 3 + depth)
    return (9, 0)


def apply_freeze(model, policy: Any, always_trainable: tuple[str, ...] = ()) -> FreezeReport:
    """Set `requires_grad` on every parameter of `model` by `policy`; return the report.

    `always_trainable` names parameter prefixes that train whatever the policy says
    (a replaced projection).
    """
    policy = check_freeze_policy(policy, _depth(model, "vision_model"), _depth(model, "text_model"))
    groups = _trainable_groups(policy, model)
    counts: dict[str, GroupRow] = {}
    for name, parameter in model.named_parameters():
        group = parameter_group(name, model)
        if name == "logit_scale":
            train = bool(policy["train_logit_scale"])
        elif any(name.startswith(prefix) for prefix in always_trainable):
            train = True
        elif groups is None:
            train = any(re.search(p, name) for p in policy["include"]) and not any(
                re.search(p, name) for p in policy["exclude"]
            )
        else:
            train = group in groups
        parameter.requires_grad_(train)
        row = counts.setdefault(group, GroupRow(group, 0, 0))
        row.parameters += parameter.numel()
        row.trainable += parameter.numel() if train else 0
    rows = sorted(counts.values(), key=lambda r: _group_order(r.group, model))
    label = policy["name"]
    if label == "last_n":
        label += f" (vision_blocks={policy['vision_blocks']}, text_blocks={policy['text_blocks']})"
    return FreezeReport(policy=label, rows=rows)


def trainable_parameter_names(model) -> list[str]:
    """Names of the parameters that currently require gradients."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
