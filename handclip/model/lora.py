"""LoRA through peft: low-rank adapters on the attention and MLP layers of the top blocks.

    _target_: handclip.model.lora.Lora
    rank: 8
    alpha: 16
    dropout: 0.0
    targets: [q, k, v, out]     # and/or fc1, fc2 (the MLP)
    towers: [vision]
    blocks: 4                   # the top N blocks of each tower in `towers` (from the layer groups)
    train_projections: true     # combinable with training the projections ...
    train_norms: false          # ... and the LayerNorms

The adapters are injected into the model in place (`peft.inject_adapter_in_model`), so they sit
inside their block's layer group: the freeze table counts them, layer-wise learning rates and
checkpoints see them like any weight. `Lora.merge` (`merge_lora`) folds them into the base weights for
export and soups, which then load as a plain model without peft.
"""

from __future__ import annotations

from collections.abc import Sequence

from handclip.checks import flag, fraction, integer, number
from handclip.errors import ConfigError
from handclip.model.backbone import TOWERS, Backbone, BackboneFacts, LayerGroup
from handclip.model.freeze import FreezePolicy

TARGETS = ("q", "k", "v", "out", "fc1", "fc2")


class Lora(FreezePolicy):
    """Only LoRA adapters train (and the projections / norms if asked); the base weights are frozen."""

    def __init__(
        self, rank: int, alpha: float, dropout: float, targets: Sequence[str], towers: Sequence[str], blocks: int,
        train_projections: bool = True, train_norms: bool = False, train_logit_scale: bool = True, **ignored,
    ):  # fmt: skip
        super().__init__(train_logit_scale, **ignored)
        integer("freeze.rank", rank, 1)
        number("freeze.alpha", alpha, 0, low_open=True)
        fraction("freeze.dropout", dropout)
        targets, towers = list(targets), [towers] if isinstance(towers, str) else list(towers)
        bad = [t for t in targets if t not in TARGETS]
        if not targets or bad:
            raise ConfigError(f"freeze.targets={targets!r}: choose from {', '.join(TARGETS)}")
        if not towers or any(t not in TOWERS for t in towers):
            raise ConfigError(f"freeze.towers={towers!r}: choose from {', '.join(TOWERS)}")
        integer("freeze.blocks", blocks, 1, hint=" (the top N blocks)")
        flag("freeze.train_projections", train_projections)
        flag("freeze.train_norms", train_norms)
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.targets, self.towers, self.blocks = targets, towers, blocks
        self.train_projections, self.train_norms = train_projections, train_norms

    def settings(self) -> tuple[str, ...]:
        return ("rank", "alpha", "dropout", "targets", "towers", "blocks", "train_projections", "train_norms")

    @property
    def label(self) -> str:
        return (f"lora (rank {self.rank}, alpha {self.alpha:g}, {'+'.join(self.targets)} in the top {self.blocks} "
                f"blocks of {'+'.join(self.towers)})")  # fmt: skip

    def check(self, facts: BackboneFacts) -> None:
        for tower in self.towers:
            if self.blocks > facts.depth(tower):
                raise ConfigError(
                    f"freeze.blocks={self.blocks} is out of range: the backbone's {tower} tower has "
                    f"{facts.depth(tower)} blocks"
                )
            # an adapter B @ A of a layer in -> out has rank at most min(in, out); the attention layers are
            # width x width, the MLP's width x mlp_width: a larger rank only adds parameters
            width = facts.tower(tower).width
            if self.rank > width:
                raise ConfigError(
                    f"freeze.rank={self.rank} is out of range: the backbone's {tower} tower is {width} wide, and an "
                    f"adapter's rank cannot exceed its layers' width; choose from 1 to {width} (a few to 64 is usual)"
                )

    def module_names(self, backbone: Backbone) -> list[str]:
        """The linear layers that get adapters, relative to the backbone's adapter host."""
        names = []
        for tower in self.towers:
            blocks = [g for g in backbone.layer_groups(tower) if g.kind == "block" and g.depth <= self.blocks]
            for group in blocks:
                roles = backbone.adapter_targets(tower, group.block)
                names += [roles[t] for t in self.targets]
        return names

    def adapt(self, backbone: Backbone) -> None:
        host = backbone.adapter_host()
        if any("lora_" in name for name, _ in host.named_parameters()):
            return  # injected already (a schedule, a resumed check): once only
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise ConfigError("freeze=lora needs the peft package: pip install peft") from None
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.module_names(backbone), bias="none")  # fmt: skip
        inject_adapter_in_model(config, host)

    def trains(self, group: LayerGroup, name: str) -> bool:
        return (
            "lora_" in name
            or (self.train_projections and group.kind == "projection")
            or (self.train_norms and name in group.norms)
        )

    def merge(self, backbone: Backbone) -> str | None:
        """Fold the adapters into their layers (`merge_lora`): the export loads without peft."""
        layers = merge_lora(backbone)
        if not layers:
            return None
        return f"{self.label}: the adapters of {layers} layers merged into the weights; loads without peft"


def merge_lora(backbone: Backbone) -> int:
    """Fold every LoRA adapter into its base layer and put the plain layer back; return how many."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    host = backbone.adapter_host()
    merged = 0
    for name, module in list(host.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = host.get_submodule(parent_name) if parent_name else host
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged
