"""How a training step is computed: memory and speed settings that never change what is learnt.

    _target_: handclip.train.compute.Compute
    accumulate: 1                  # micro-batches per batch; the loss still sees all of data.batch_size
    gradient_checkpointing: false  # recompute block activations in the backward pass
    attention: auto                # auto | sdpa | eager
    compile: false                 # torch.compile each transformer block

`data.batch_size` is the contrastive batch (every pair a negative of every other); `accumulate`
only decides how much of it is in memory at once (see `handclip.train.accumulate`).
"""

from __future__ import annotations

from handclip.checks import flag, integer, one_of
from handclip.errors import ConfigError

ATTENTION = ("auto", "sdpa", "eager")


class Compute:
    """Validated compute settings, applied to a loaded backbone by `apply`."""

    def __init__(
        self, accumulate: int = 1, gradient_checkpointing: bool = False, attention: str = "auto", compile: bool = False
    ):  # fmt: skip
        integer("compute.accumulate", accumulate, 1, 4096)
        flag("compute.gradient_checkpointing", gradient_checkpointing)
        flag("compute.compile", compile)
        one_of("compute.attention", attention, ATTENTION)
        self.accumulate = accumulate
        self.gradient_checkpointing = gradient_checkpointing
        self.attention = attention
        self.compile = compile

    def check(self, batch_size: int, trainer: dict, precision: str) -> None:
        """Refuse combinations that would train something else than asked, naming the keys."""
        if self.accumulate > batch_size:
            raise ConfigError(
                f"compute.accumulate={self.accumulate} is larger than data.batch_size={batch_size}: "
                "each micro-batch needs at least one pair"
            )
        if self.accumulate == 1:
            return
        if int(trainer.get("accumulate_grad_batches") or 1) > 1:
            raise ConfigError(
                "compute.accumulate and trainer.accumulate_grad_batches together: give only compute.accumulate "
                "(set data.batch_size to the whole batch)"
            )
        devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
        count = len(devices) if isinstance(devices, (list, tuple)) else devices
        several = (isinstance(count, int) and count > 1) or count in (-1, "-1")
        if several or nodes > 1:
            raise ConfigError(
                f"compute.accumulate={self.accumulate} runs on one device only (trainer.devices={devices!r}, "
                f"trainer.num_nodes={nodes}): use compute.accumulate=1 with several devices, whose features "
                "are gathered for the loss"
            )
        if precision in ("16-mixed", "16"):
            raise ConfigError(
                "compute.accumulate with trainer.precision=16-mixed: its loss scaling is not applied to the "
                "micro-batches' backward; use bf16-mixed or 32-true"
            )

    def apply(self, backbone) -> None:
        """Gradient checkpointing, attention kernel and compilation on a loaded backbone."""
        if self.attention != "auto":
            backbone.set_attention(self.attention)
        backbone.set_gradient_checkpointing(self.gradient_checkpointing)
        if self.compile:
            # regional compilation: each block once, so partial forwards and frozen prefixes still use it
            for tower in ("vision", "text"):
                for block in backbone.blocks(tower):
                    block.compile()


def compute_settings(made, target: str = "") -> Compute:
    """`made` (what a `compute:` config built) if it is a `Compute`; else a ConfigError naming its target."""
    if not isinstance(made, Compute):
        raise ConfigError(f"compute._target_={target or type(made).__name__} is not a handclip.train.compute.Compute")
    return made


def contrastive_accumulation_refused(trainer: dict, needs_text: bool) -> ConfigError | None:
    """Lightning's accumulate_grad_batches with a contrastive loss (each micro-batch loses the others' negatives)."""
    batches = trainer.get("accumulate_grad_batches") or 1
    if not needs_text or batches == 1:
        return None
    return ConfigError(
        f"trainer.accumulate_grad_batches={batches} with a contrastive loss: each micro-batch would only see its "
        f"own negatives, which is not a larger batch. Set data.batch_size to the whole batch and "
        f"compute.accumulate={batches} to hold it in memory in {batches} micro-batches with all negatives"
    )
