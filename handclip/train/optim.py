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

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from handclip.checks import number
from handclip.errors import ConfigError


@dataclass
class ParameterInfo:
    """What the optimiser needs to know about one parameter."""

    name: str
    parameter: nn.Parameter
    decay: bool  # weight decay applies
    head: bool  # a new head: lr x head_lr_multiplier
    tower: str | None = None  # "vision" | "text" for a backbone parameter in a layer group
    depth: int = 0  # its group's distance from the top of the tower (projection 0)
    starts_at: int = 0  # the optimiser step at which it starts to train (an unfreeze schedule)


def warmup_steps(warmup: float, total: int) -> int:
    """`warmup` as a share of the total optimiser steps (< 1) or a step count (>= 1)."""
    return int(round(warmup * total)) if warmup < 1 else int(warmup)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float, starts: list[int] | None = None, ramp: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """Linear warm-up, then cosine decay to 0, stepped once per optimiser step.

    `starts` (one per parameter group) and `ramp`: a group that starts to train at step `s > 0` (an
    unfreeze schedule) has its rate ramped up linearly over `ramp` steps from then on, on top.
    """
    number("optim.schedule.warmup", warmup, 0, hint=" (a share of the steps below 1, or a step count)")
    warm, total = warmup_steps(warmup, total_steps), max(total_steps, 1)

    def factor(step: int) -> float:  # what transformers' get_cosine_schedule_with_warmup computes
        if step < warm:
            return step / max(1, warm)
        progress = (step - warm) / max(1, total - warm)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    starts = list(starts or [0] * len(optimizer.param_groups))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [_ramped(factor, start, ramp) for start in starts])


def _layer_decay(layer_decay: Mapping[str, float | None] | float | None) -> dict[str, float | None]:
    if isinstance(layer_decay, (int, float)) and not isinstance(layer_decay, bool):  # one number: both towers
        layer_decay = {"vision": layer_decay, "text": layer_decay}
    if layer_decay is not None and not isinstance(layer_decay, Mapping):
        raise ConfigError(f"optim.layer_decay={layer_decay!r} must be a number (both towers), "
                          "{vision: ..., text: ...} or null")  # fmt: skip
    layer_decay = dict(layer_decay or {})
    unknown = sorted(set(layer_decay) - {"vision", "text"})
    if unknown:
        raise ConfigError(f"optim.layer_decay.{unknown[0]} is not a tower; give vision and/or text")
    for tower, value in layer_decay.items():
        if value is not None:
            _number(f"layer_decay.{tower}", value, 1e-6, 1.0)
    return layer_decay


def _number(key: str, value, low: float, high: float) -> float:
    return number(f"optim.{key}", value, low, high)


class Optimization:
    """Learning rate, weight decay and head multiplier, with the optimiser and schedule they feed."""

    def __init__(
        self, lr: float, weight_decay: float, head_lr_multiplier: float,
        optimizer: Callable[..., torch.optim.Optimizer], schedule: Callable | None = None,
        layer_decay: Mapping[str, float | None] | None = None,
    ):  # fmt: skip
        self.layer_decay = _layer_decay(layer_decay)
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

    def lr_of(self, info: ParameterInfo) -> float:
        """lr; x head_lr_multiplier for a new head; x decay ** depth under layer-wise decay."""
        if info.head:
            return self.lr * self.head_lr_multiplier
        decay = self.layer_decay.get(info.tower) if info.tower else None
        return self.lr * (decay**info.depth if decay is not None else 1.0)

    def parameter_groups(self, parameters: Iterable[ParameterInfo]) -> list[dict]:
        """Groups by (no decay, lr): every parameter given, trainable now or not."""
        groups: dict[tuple, dict] = {}
        for info in parameters:
            lr = self.lr_of(info)
            key = (not info.decay, info.head, -lr, info.starts_at)
            group = groups.setdefault(key, {
                "params": [], "names": [], "weight_decay": 0.0 if not info.decay else self.weight_decay, "lr": lr,
                "starts_at": info.starts_at,
            })  # fmt: skip
            group["params"].append(info.parameter)
            group["names"].append(info.name)
        return [groups[key] for key in sorted(groups)]

    def build(self, parameters: Iterable[ParameterInfo], total_steps: int, unfreeze_warmup: int = 0,
              start_step: Callable[[int], int] | None = None):  # fmt: skip
        """(optimizer, scheduler or None) over `parameters`.

        A group that starts to train later (an unfreeze schedule) ramps its learning rate up
        linearly over `unfreeze_warmup` steps from then on, on top of the schedule; `start_step` maps the step
        it was planned to start at to the step it really did (a schedule that acts on validation), asked each step.
        """
        groups = self.parameter_groups(parameters)
        optimizer = self.optimizer(
            [{k: v for k, v in g.items() if k not in ("names", "starts_at")} for g in groups],
            lr=self.lr,
            **fused_if_cuda(self.optimizer, [p for g in groups for p in g["params"]]),
        )
        if self.schedule is None:
            return optimizer, None
        starts = [g["starts_at"] for g in groups]
        if start_step is not None:
            starts = [functools.partial(start_step, start) if start else 0 for start in starts]
        if unfreeze_warmup and any(starts):
            if not _takes(self.schedule, "starts", "ramp"):
                raise ConfigError(
                    "freeze.warmup_steps ramps each group's rate after it unfreezes, which needs a schedule that "
                    "takes starts= and ramp= (as handclip.train.optim.warmup_cosine does): set freeze.warmup_steps=0 "
                    "or use that schedule"
                )
            return optimizer, self.schedule(optimizer, total_steps, starts=starts, ramp=unfreeze_warmup)
        return optimizer, self.schedule(optimizer, total_steps)


def _takes(function: Callable, *names: str) -> bool:
    import inspect

    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return all(name in parameters for name in names)


def fused_if_cuda(optimizer: Callable, parameters: list[torch.Tensor]) -> dict:
    """`fused=True` for Adam/AdamW when every parameter is on a GPU (one kernel for the whole update),
    unless the config chose `fused` or `foreach` itself."""
    chosen = getattr(optimizer, "keywords", {})
    target = getattr(optimizer, "func", optimizer)
    if target not in (torch.optim.AdamW, torch.optim.Adam) or {"fused", "foreach"} & set(chosen):
        return {}
    on_gpu = bool(parameters) and all(p.is_cuda and p.is_floating_point() for p in parameters)
    return {"fused": True} if on_gpu else {}


def _ramped(base: Callable[[int], float], start: int, steps: int) -> Callable[[int], float]:
    """`base`, times a linear ramp from 0 at step `start` to 1 at `start + steps`; `start` may be a function of
    nothing that says the step when asked (a stage that begins when validation stalls)."""
    if not start:
        return base
    if callable(start):
        return lambda step: base(step) * min(1.0, max(0.0, (step - start() + 1) / steps))
    return lambda step: base(step) * min(1.0, max(0.0, (step - start + 1) / steps))
