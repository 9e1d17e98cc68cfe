"""`python train.py experiment=... dry_run=true`: what a run would train, before any GPU hour is spent.

Built from the configuration and the backbone's config alone (the model's structure on the meta
device: no weights, no data, no network once a hub model's config is cached). Prints each tower's
shape and parameter count, the FLOPs of a forward pass and of a training step under the policy (the
backbone's own count, `Backbone.forward_flops`), the freeze plan per group (per epoch for an
unfreeze schedule), the optimiser's parameter groups with their learning rates and weight decay,
the trainable share and an estimate of training memory.
"""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table

from handclip.model.freeze import apply_freeze
from handclip.tools.mfu import backbone_step_flops
from handclip.train.config import build_components, objective_facts

CAPTION_TOKENS = 32  # captions are short: about 32 tokens padded


def _megabytes(count: float) -> str:
    return f"{count / 2**20:,.0f} MB"


def activation_bytes(tokens: int, width: int, heads: int, blocks: int, batch: int, bytes_per_value: int) -> float:
    """Activations a transformer keeps for backward through `blocks` blocks (Korthikanti et al. 2022:
    s*b*h*(34 + 5*a*s/h) bytes per block in 16-bit, scaled to `bytes_per_value`)."""
    per_block = tokens * batch * width * (34 + 5 * heads * tokens / width) * bytes_per_value / 2
    return per_block * blocks


def dry_run(cfg: Mapping, console: Console | None = None) -> dict:
    """Print the plan of the run `cfg` describes; return its numbers (for tests and scripts)."""
    console = console or Console()
    parts = build_components(cfg, need_data=False)
    facts = parts.facts
    skeleton = parts.backbone.skeleton()
    heads = parts.projection.apply(skeleton)
    report = apply_freeze(skeleton, parts.freeze, always_trainable=heads)
    epochs = parts.epochs

    towers = Table(title=f"backbone {parts.backbone.name}")
    for column in ("tower", "width", "blocks", "heads", "input", "projection", "parameters"):
        towers.add_column(column, justify="right")
    grid = facts.image_size // facts.patch_size if facts.patch_size else None
    inputs = {"vision": f"{facts.image_size}px" + (f", {grid}x{grid} patches" if grid else ""),
              "text": f"{facts.context_length} tokens"}  # fmt: skip
    for tower in ("vision", "text"):
        shape = facts.tower(tower)
        groups = skeleton.layer_groups(tower)
        projection = groups[-1].parameters
        out = next(iter(projection.values())).shape if projection else ()
        sizes = " -> ".join(str(v) for v in reversed(tuple(out)))
        count = f"{sum(g.numel() for g in groups):,}"
        towers.add_row(tower, str(shape.width), str(shape.depth), str(shape.heads), inputs[tower], sizes, count)
    console.print(towers)
    tokens = facts.context_length if skeleton.pads_to_context else CAPTION_TOKENS  # SigLIP fills its context
    forward = {tower: skeleton.forward_flops(tower, tokens) for tower in ("vision", "text")}
    step = backbone_step_flops(skeleton, CAPTION_TOKENS)  # under the policy as it stands at the first epoch
    if step is None:
        console.print("FLOPs: not counted for this backbone")
    else:
        console.print(
            f"forward FLOPs per sample: image {sum(forward['vision']) / 1e9:.3g} GFLOP, caption "
            f"{sum(forward['text']) / 1e9:.3g} GFLOP ({tokens} tokens); a training step under this policy: "
            f"{step / 1e9:.3g} GFLOP per pair"
        )

    if parts.freeze.changes_within(epochs):
        plan = parts.freeze.plan(skeleton, epochs, heads)
        soonest = " if validation stalls as soon as it can" if hasattr(parts.freeze, "observe") else ""
        table = Table(title=f"unfreeze plan over {epochs} epochs{soonest}")
        for column in ("from epoch", "trainable", "share", "groups that train"):
            table.add_column(column, justify="right" if column != "groups that train" else "left")
        for epoch, stage in plan:
            trained = [row.group for row in stage.rows if row.status != "no"]
            table.add_row(str(epoch), f"{stage.trainable:,}", f"{100 * stage.trainable / stage.total:.2f}%",
                          ", ".join(trained))  # fmt: skip
        console.print(table)
    else:
        console.print(report.to_rich())

    from handclip.losses import Objective
    from handclip.train.module import FineTuner

    # heads sized by the number of identities show 0 parameters: the data is not read in a dry run
    objective: Objective = parts.objective(**objective_facts(facts, 0))
    module = FineTuner(skeleton, objective, parts.optimization, heads=heads, freeze=parts.freeze)
    infos = module.optimised_parameters()
    groups = parts.optimization.parameter_groups(infos)
    optimiser = Table(title="optimiser parameter groups (every parameter is held; frozen ones get no gradient)")
    for column in ("lr", "weight decay", "tensors", "parameters", "trainable now", "e.g."):
        optimiser.add_column(column, justify="right" if column != "e.g." else "left")
    for group in groups:
        trainable = sum(p.numel() for p in group["params"] if p.requires_grad)
        count = f"{sum(p.numel() for p in group['params']):,}"
        example = group["names"][0].removeprefix("backbone.")
        optimiser.add_row(f"{group['lr']:.3g}", f"{group['weight_decay']:g}", str(len(group["params"])), count,
                          f"{trainable:,}", example)  # fmt: skip
    console.print(optimiser)

    # memory: weights for all, gradients and two AdamW moments for what trains, activations for
    # the blocks backward passes through (from the lowest trainable group up); a schedule at its widest
    widest = ""
    if parts.freeze.changes_within(epochs):
        last_epoch, report = parts.freeze.plan(skeleton, epochs, heads)[-1]
        apply_freeze(skeleton, parts.freeze.policy_at(last_epoch), always_trainable=heads)
        widest = f" from epoch {last_epoch}, when the most trains"
    from handclip.train.run import precision_for

    value_bytes = 2 if "16" in precision_for(parts.precision) else 4
    batch = parts.data.batch_size
    # contrastive accumulation holds one micro-batch's activations; checkpointing one block's, plus each block's input
    accumulate = parts.compute.accumulate
    micro = -(-batch // accumulate)
    weights = report.total * 4
    trained = report.trainable * 4 * 3  # gradient + exp_avg + exp_avg_sq, fp32
    activations = 0.0
    tokens = {"vision": (grid or 1) ** 2 + 1, "text": CAPTION_TOKENS}
    for tower in ("vision", "text"):
        groups_of_tower = skeleton.layer_groups(tower)
        needs_grad = [g for g in groups_of_tower if any(p.requires_grad for p in g.parameters.values())]
        if not needs_grad:
            continue
        lowest = min(g.index for g in needs_grad)
        blocks = sum(1 for g in groups_of_tower if g.kind == "block" and g.index >= lowest)
        shape = facts.tower(tower)
        if parts.compute.gradient_checkpointing and blocks:
            inputs = blocks * tokens[tower] * shape.width * micro * value_bytes
            activations += inputs + activation_bytes(tokens[tower], shape.width, shape.heads, 1, micro, value_bytes)
        else:
            activations += activation_bytes(tokens[tower], shape.width, shape.heads, blocks, micro, value_bytes)
    total = weights + trained + activations
    share = 100.0 * report.trainable / max(report.total, 1)
    console.print(
        f"trainable{widest}: {report.trainable:,} of {report.total:,} parameters ({share:.2f}%); estimated training "
        f"memory at batch {batch}{f' ({accumulate} micro-batches of {micro})' if accumulate > 1 else ''}: "
        f"{_megabytes(total)} (weights {_megabytes(weights)}, gradients and AdamW "
        f"state {_megabytes(trained)}, activations {_megabytes(activations)}, "
        f"{'16' if value_bytes == 2 else '32'}-bit). Nothing was loaded or written."
    )
    return {"trainable_parameters": report.trainable, "total_parameters": report.total,
            "optimizer_groups": [{"lr": g["lr"], "weight_decay": g["weight_decay"], "tensors": len(g["params"])}
                                 for g in groups], "memory_bytes": total, "step_flops": step}  # fmt: skip
