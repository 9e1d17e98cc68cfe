"""Model Stock (Jang, Yun and Han, ECCV 2024): two fine-tuned runs averaged layer by layer towards the pretrained
weights, exported like any run.

    python -m handclip.export --stock RUN_A RUN_B OUT [--weights ema|raw] [--overwrite] [--trust MODULE]

Two runs fine-tuned from the same start move their weights in directions that share the signal and differ in the
noise. For each layer group g of the model (`Backbone.layer_groups`: embeddings, each block, the final norm, the
projection), with w0 the starting weights and d_a = w_a - w0, d_b = w_b - w0 over g's parameters:

    cos = <d_a, d_b> / (|d_a| |d_b|),   t = 2 cos / (1 + cos),   w = t (w_a + w_b) / 2 + (1 - t) w0

so a group whose two runs agree (cos near 1) takes their average, and one where they disagree stays nearer the
start. t is kept in [0, 1] (two runs moving apart, cos < 0, keep w0); a group the runs left frozen keeps w0
(the two runs must share their freeze policy, so they train the same groups).
Parameters in no layer group (the temperature) take the plain average. w0 is the runs' backbone as its config
loads it (the pretrained weights): runs that started from another run's checkpoint (`init_from`) or replaced their
projection have no such start and are refused, as are runs of other backbones, adapters or data (as for soups).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from handclip.errors import HandClipError


def stock_ratio(tuned_a: torch.Tensor, tuned_b: torch.Tensor, start: torch.Tensor) -> tuple[float, float]:
    """(cos, t) of one group's two weight changes (flattened): Model Stock's interpolation ratio, in [0, 1]."""
    a, b = (tuned_a - start).double(), (tuned_b - start).double()
    norms = float(a.norm() * b.norm())
    if norms == 0.0:
        return float("nan"), 0.0  # the runs left the group where it started (frozen): it keeps the start
    cos = float((a @ b) / norms)
    return cos, min(1.0, max(0.0, 2 * cos / (1 + cos))) if cos > -1 else 0.0


def stock_states(backbone, state_a: dict, state_b: dict, start: dict) -> tuple[dict, list[dict]]:
    """(merged state dict, one row per layer group: name, cos, t) of two runs' weights and their start; what is in
    no layer group takes the plain average (`handclip.model.averaging.average_states`, as soups)."""
    from handclip.model.averaging import average_states

    names = {id(p): name for name, p in backbone.named_parameters()}
    merged, rows = {}, []
    for group in backbone.all_groups():
        members = [names[id(p)] for p in group.parameters.values() if id(p) in names]
        if not members:
            continue
        flat = [torch.cat([state[n].float().reshape(-1) for n in members]) for state in (state_a, state_b, start)]
        cos, t = stock_ratio(*flat)
        for name in members:
            mixed = t * (state_a[name].float() + state_b[name].float()) / 2 + (1 - t) * start[name].float()
            merged[name] = mixed.to(state_a[name].dtype)
        rows.append({"group": group.name, "cos": None if math.isnan(cos) else round(cos, 4), "t": round(t, 4)})
    rest = [name for name in state_a if name not in merged]  # in no layer group (the temperature), and buffers
    merged.update(average_states([{name: state[name] for name in rest} for state in (state_a, state_b)]))
    return merged, rows


def model_stock(run_a: str | Path, run_b: str | Path, out_dir: str | Path, overwrite: bool = False,
                weights: str | None = None, trust: Sequence[str] = ()) -> Path:  # fmt: skip
    """Merge the two runs by Model Stock and export the result with its model card; return the folder."""
    from handclip.build import build
    from handclip.model.projection import Keep
    from handclip.tools.card import model_card, run_files
    from handclip.tools.export import check_destination, check_finite, find_checkpoint, load_run, write_export
    from handclip.tools.soup import check_ingredients

    out_dir = Path(out_dir)
    dirs = [find_checkpoint(run)[1] for run in (run_a, run_b)]
    if dirs[0].resolve() == dirs[1].resolve():
        raise HandClipError(f"--stock {run_a} {run_b}: the same run twice; Model Stock merges two runs")
    for run_dir in dirs:
        check_destination(out_dir, run_dir, overwrite)
    files = [run_files(run_dir) for run_dir in dirs]
    check_ingredients([(run_dir, f[0]) for run_dir, f in zip(dirs, files, strict=True)], trust)
    if files[0][0].get("freeze") != files[1][0].get("freeze"):
        raise HandClipError(f"{dirs[0].name} and {dirs[1].name} differ in their freeze policy: Model Stock merges "
                            "two runs of one recipe, which train the same layer groups")  # fmt: skip
    for run_dir, (config, _, _) in zip(dirs, files, strict=True):
        if config.get("init_from"):
            raise HandClipError(f"{run_dir.name} started from {config['init_from']} (init_from), not from the "
                                "pretrained weights: Model Stock needs the start both runs share")  # fmt: skip
        if not isinstance(build(config["projection"], "projection", trust), Keep):
            raise HandClipError(f"{run_dir.name} replaced its projection, whose new weights have no pretrained start: "
                                "Model Stock needs one for every weight")  # fmt: skip
    runs = [load_run(run_dir, weights, trust) for run_dir in dirs]
    merged_by = [run.policy.merge(run.backbone) for run in runs]  # adapters folded in: plain weights are merged
    start_model = runs[0].spec.load((runs[0].config.get("paths") or {}).get("cache"))
    states = [{k: v.detach().cpu() for k, v in run.backbone.state_dict().items()} for run in runs]
    for run, state in zip(runs, states, strict=True):
        check_finite(state, f"Model Stock ingredient {run.run_dir.name}")
    start = {k: v.detach().cpu() for k, v in start_model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in states[0].items()} != {k: tuple(v.shape) for k, v in start.items()}:
        raise HandClipError(f"{dirs[0].name}'s weights differ in shape from the backbone its config loads")
    backbone = runs[0].backbone
    merged, rows = stock_states(backbone, states[0], states[1], start)
    backbone.load_state_dict(merged)
    used = runs[0].weights if runs[0].weights == runs[1].weights else "mixed"
    ingredients = []
    for run_dir, (_, payload, _) in zip(dirs, files, strict=True):
        metrics = (payload or {}).get("metrics") or {}
        ingredients.append({"name": run_dir.name, "val": metrics.get("val/rank1"), "test": metrics.get("test/rank1"),
                            "path": str(run_dir)})  # fmt: skip
    ratios = ", ".join(f"{row['group']} {row['t']:.2f}" for row in rows)
    notes = [f"Model Stock of {dirs[0].name} and {dirs[1].name}: each layer group interpolated towards the "
             f"pretrained weights at t = 2 cos / (1 + cos) of the two runs' weight changes: {ratios}"]  # fmt: skip
    config, _, policy = files[0]
    merged_adapters = merged_by[0] or merged_by[1]
    card = model_card(config, None, policy, spec=runs[0].spec, backbone=backbone, merged=merged_adapters,
                      weights=used, ingredients=ingredients, notes=notes, source=f"{dirs[0]} + {dirs[1]}",
                      combined="Model Stock: two runs merged group by group towards the starting weights")  # fmt: skip
    marker = {"source": [str(d) for d in dirs], "stock": rows, "weights": used}
    print(f"Model Stock of {dirs[0].name} and {dirs[1].name}: t per layer group {ratios}", flush=True)
    return write_export(backbone, out_dir, marker, card)
