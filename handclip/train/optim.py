"""The optimiser and its schedule, built from `conf/optim/*.yaml`.

    _target_: handclip.train.optim.Optimization
    lr: 1.0e-5
    weight_decay: 0.2
    head_lr_multiplier: 10.0
    optimizer: {_target_: torch.optim.AdamW, _partial_: true, betas: [0.9, 0.98], eps: 1.0e-6}
    schedule: {_target_: handclip.train.optim.warmup_cosine, _partial_: true, warmup: 0.1}

The optimiser holds every parameter of the backbone and the objective, frozen or not: AdamW
leaves a parameter without a gradient alone, so what unfreezes later (a schedule, a callback)
trains from that step on, and no new head is ever left out. Weight decay never touches biases,
norms, embeddings or logit_scale; new heads (a replaced projection, the objective's parts) train
at `lr x head_lr_multiplier`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from handclip.errors import ConfigError


@dataclass
class ParameterInfo:
    """What the optimiser needs to know about one parameter."""

    name: str
    parameter: nn.Parameter
    decay: bool  # weight decay applies
    head: bool  # a new head: lr x head_lr_multiplier


def warmup_steps(warmup: float, total: int) -> int:
    """`warmup` as a share of the total optimiser steps (< 1) or a step count (>= 1)."""
    return int(round(warmup * total)) if warmup < 1 else int(warmup)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float):
    """Linear warm-up, then cosine decay to 0, stepped once per optimiser step."""
    from transformers import get_cosine_schedule_with_warmup

    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0:
        raise ConfigError(f"optim.schedule.warmup={warmup!r} must be a share of the steps (0 to 1) or a step count")
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps(warmup, total_steps), max(total_steps, 1))


def _number(key: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"optim.{key}={value!r} is out of range: it must be a number from {low:g} to {high:g}")
    return float(value)


class Optimization:
    """Learning rate, weight decay and head multiplier, with the optimiser and schedule they feed."""

    def __init__(
        self, lr: float, weight_decay: float, head_lr_multiplier: float,
        optimizer: Callable[..., torch.optim.Optimizer], schedule: Callable | None = None,
    ):  # fmt: skip
        self.lr = _number("lr", lr, 1e-12, 1.0)
        self.weight_decay = _number("weight_decay", weight_decay, 0.0, 10.0)
        self.head_lr_multiplier = _number("head_lr_multiplier", head_lr_multiplier, 0.0, 1e6)
        if not callable(optimizer):
            raise ConfigError("optim.optimizer needs a _target_ (e.g. torch.optim.AdamW) and _partial_: true")
        from handclip.build import check_keywords

        check_keywords("optim.optimizer", optimizer)
        check_keywords("optim.schedule", schedule)
        self.optimizer = optimizer
        self.schedule = schedule
        self._try()

    def _try(self) -> None:
        """Build the optimiser and schedule once on a stand-in parameter, so bad settings fail now."""
        try:
            probe = self.optimizer([torch.nn.Parameter(torch.zeros(1))], lr=self.lr)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"optim.optimizer: {error}") from None
        if self.schedule is not None:
            try:
                self.schedule(probe, 10)
            except ConfigError:
                raise
            except (TypeError, ValueError) as error:
                raise ConfigError(f"optim.schedule: {error}") from None

    def parameter_groups(self, parameters: Iterable[ParameterInfo]) -> list[dict]:
        """Groups by (no decay, head): every parameter given, trainable now or not."""
        groups: dict[tuple[bool, bool], dict] = {}
        for info in parameters:
            key = (not info.decay, info.head)
            group = groups.setdefault(key, {
                "params": [], "names": [], "weight_decay": 0.0 if not info.decay else self.weight_decay,
                "lr": self.lr * (self.head_lr_multiplier if info.head else 1.0),
            })  # fmt: skip
            group["params"].append(info.parameter)
            group["names"].append(info.name)
        return [groups[key] for key in sorted(groups)]

    def build(self, parameters: Iterable[ParameterInfo], total_steps: int):
        """(optimizer, scheduler or None) over `parameters`."""
        groups = self.parameter_groups(parameters)
        optimizer = self.optimizer([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=self.lr)
        scheduler = self.schedule(optimizer, total_steps) if self.schedule is not None else None
        return optimizer, scheduler
