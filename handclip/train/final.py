"""The end of a run: which weights it reports, and what choosing them cost.

After training, in this order:

1. *the last weights* (end of training), when they are not the selected checkpoint, are scored
   under `last/`: the price of selection shows as the difference;
2. *the selected weights*: `best.ckpt` (the best validation score), its EMA when the run keeps one
   (the raw weights of the same checkpoint under `raw/`); `selection/epoch` says which epoch and
   `selection/val_gain` how much validation it gained over the untrained model;
3. *WiSE-FT* (`eval.wise_ft`): the selected weights mixed with the weights the run started from
   at each ratio, every mix scored; the mix is chosen on validation alone (the smallest ratio that
   keeps `keep` of the validation gain, among the ratios whose gain is beyond the noise of the
   validation queries; none: ratio 0, the untrained weights; handclip.eval.forgetting) and becomes
   the reported model, the unmixed one's scores kept under `finetuned/`; the curve is saved
   (`wise_ft.png`);
4. *retention*: `zeroshot/retention`, the reported model's zero-shot skill over the untrained one's;
   `reported/val_gain` (with `_low`, `_high`: its 95% interval), the reported model's paired
   validation gain over the untrained one;
5. *closing warnings* (`closing_warnings`): a run that trained but reports (close to) the untrained model
   says so at its end and in metrics.json's `warnings`: the selected checkpoint is epoch 0, no validation
   beat the untrained model, an unfreeze schedule never unfroze anything (or the selected checkpoint is from
   before it did), WiSE-FT reports the untrained weights.

The weights a run starts from (what WiSE-FT mixes with) are kept in `initial_weights.safetensors`
in the run directory, for the parameters that train, so that a resumed run mixes the same ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INITIAL = "initial_weights.safetensors"


def keep_initial_weights(backbone, names: list[str], run_dir: Path, resumed: bool) -> dict[str, torch.Tensor] | None:
    """The starting weights of the parameters that train: kept on disk when the run starts, read back on a resume
    (None when a resumed run has none kept: it started before they were kept)."""
    from safetensors.torch import load_file, save

    from handclip.io import atomic_write

    path = Path(run_dir) / INITIAL
    if resumed:
        return load_file(str(path)) if path.is_file() else None
    parameters = dict(backbone.named_parameters())
    initial = {name: parameters[name].detach().cpu().clone().contiguous() for name in names}
    with atomic_write(path, "wb") as handle:
        handle.write(save(initial))
    return initial


def selection_facts(best_path: str, monitor: str, metric: str, baseline: Mapping[str, float] | None) -> dict[str, Any]:
    """`selection/epoch` (of the selected checkpoint), `selection/val_score` (its selecting score: `metric`, perhaps
    smoothed) and `selection/val_gain` (that score over the untrained model's `metric`), from the checkpoint."""
    from handclip.io import load_checkpoint_file

    if not best_path:
        return {}
    saved = load_checkpoint_file(best_path)
    facts: dict[str, Any] = {"selection/epoch": int(saved.get("epoch", -1))}
    for state in (saved.get("callbacks") or {}).values():
        if state.get("monitor") == monitor and state.get("best_model_score") is not None:  # the selecting callback
            score = float(state["best_model_score"])
            facts["selection/val_score"] = score
            if baseline is not None and metric in baseline:
                facts["selection/val_gain"] = score - baseline[metric]
    return facts


def score_last(module, backbone, evaluate, last_path: str, best_path: str) -> dict | None:
    """The last checkpoint's raw weights scored, when it is not the selected one (None otherwise)."""
    from handclip.io import load_checkpoint_file

    if not last_path or not Path(last_path).is_file() or not best_path:
        return None
    last, best = load_checkpoint_file(last_path), load_checkpoint_file(best_path)
    if (last.get("epoch"), last.get("global_step")) == (best.get("epoch"), best.get("global_step")):
        return None
    module.load_state_dict(last["state_dict"])
    del last, best
    return evaluate(backbone)


def wise_ft(backbone, evaluate, settings, initial: Mapping[str, torch.Tensor], tuned_result: dict,
            baseline: Mapping[str, float] | None, run_dir: Path):  # fmt: skip
    """Score each mix of `initial` and the backbone's current weights; leave the chosen mix in the backbone.

    Returns (chosen alpha, its result, the curve rows); alpha 1 is `tuned_result` (not scored again)."""
    from handclip.eval.forgetting import choose_alpha, curve_rows, interpolate, trade_off_figure
    from handclip.eval.plots import pyplot
    from handclip.eval.significance import validation_gain

    parameters = dict(backbone.named_parameters())
    tuned = {name: parameters[name].detach().clone() for name in initial}
    results = {1.0: tuned_result}
    for alpha in settings.alphas:
        if alpha == 1.0:
            continue
        _load(parameters, interpolate(initial, tuned, alpha))
        results[alpha] = evaluate(backbone)
    metric = settings.metric
    gains = {}
    if any(metric not in r["metrics"] for r in results.values()):
        chosen = 1.0  # no validation to compare the mixes on: the fine-tuned weights stay
    else:
        if settings.confidence is not None:
            gains = {a: validation_gain(r, results[0.0], metric, settings.confidence) for a, r in results.items() if a}
        beyond = {a for a, g in gains.items() if g is not None and g.beyond_noise} if gains else None
        chosen = choose_alpha({a: r["metrics"][metric] for a, r in results.items()}, settings.keep, beyond)
    _load(parameters, interpolate(initial, tuned, chosen))
    rows = curve_rows({a: r["metrics"] for a, r in results.items()}, baseline)
    for row in rows:  # each mix's validation gain over the initial model, with its interval
        gain = gains.get(row["alpha"])
        if gain is not None:
            row.update({f"{metric}_gain": gain.mean, f"{metric}_gain_low": gain.low, f"{metric}_gain_high": gain.high})
    figure = trade_off_figure(rows, chosen, run_dir / "wise_ft.png")
    if figure is not None:
        pyplot().close(figure)
    return chosen, results[chosen], rows


def _load(parameters: Mapping[str, torch.nn.Parameter], values: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in values.items():
            parameters[name].copy_(value)


def final_evaluation(spec, run, weights, best_path: str, last_path: str, results: dict, initial,
                     run_dir: Path) -> tuple[dict, dict]:  # fmt: skip
    """Steps 1-4 of the module docstring. Adds to `results` (label -> evaluation result; the reported model last,
    as "fine-tuned") and returns (metrics, what else metrics.json records)."""
    from handclip.eval.forgetting import retention
    from handclip.eval.significance import validation_gain

    baseline = (results.get("baseline") or {}).get("metrics")
    metrics: dict[str, Any] = {}
    last = score_last(run.module, run.backbone, run.evaluate, last_path, best_path)
    if last is not None:
        metrics.update({f"last/{k}": v for k, v in last["metrics"].items()})
    tested = weights.restore_best(run.module, run.backbone, best_path, run.evaluate)
    if tested == "ema":  # the raw weights of the same checkpoint, scored too
        results["fine-tuned (raw)"] = weights.raw_result
        metrics.update({f"raw/{k}": v for k, v in weights.raw_result["metrics"].items()})
    metrics.update(selection_facts(best_path, weights.monitor, spec.eval.select, baseline))
    final = run.evaluate(run.backbone)
    extra: dict[str, Any] = {"weights": tested}
    mixing = spec.eval.wise_ft
    if mixing is not None:
        why_not = _why_no_wise_ft(run, initial)
        if why_not:
            extra["wise_ft"] = {"skipped": why_not}
        else:
            alpha, chosen, rows = wise_ft(run.backbone, run.evaluate, mixing, initial, final, baseline, run_dir)
            extra["wise_ft"] = {"alpha": alpha, "metric": mixing.metric, "keep": mixing.keep, "curve": rows}
            metrics["wise_ft/alpha"] = alpha
            if alpha != 1.0:
                results["fine-tuned, unmixed"] = final
                metrics.update({f"finetuned/{k}": v for k, v in final["metrics"].items()})
                final = chosen
            if alpha == 0.0 and results.get("baseline") is not None:
                # the untrained model is reported: its scores as measured before training, the objective's heads
                # untrained too (the mix at 0 holds the starting backbone but the trained heads: a BN-neck feature
                # would score neither model)
                before = results["baseline"]
                final = {**final, **{k: before[k] for k in ("metrics", "runs", "cmc", "per_query") if k in before}}
    results["fine-tuned"] = final
    metrics.update(final["metrics"])
    # the reported model's paired validation gain over the untrained one, with its 95% interval (none without a
    # baseline that kept its validation queries' scores)
    start = results.get("baseline")
    metric = mixing.metric if mixing is not None else spec.eval.select
    gain = validation_gain(final, start, metric) if start is not None else None
    if gain is not None:
        metrics.update({"reported/val_gain": gain.mean, "reported/val_gain_low": gain.low,
                        "reported/val_gain_high": gain.high})  # fmt: skip
    kept = retention(baseline, final["metrics"]) if baseline is not None else None
    if kept is not None:
        metrics["zeroshot/retention"] = kept
    return metrics, extra


@dataclass
class TrainingFacts:
    """What training did, for the closing warnings: the selecting metric's value after each validation (one list
    per kind of weights validated: raw, and the EMA's where the run keeps one), and when an unfreeze schedule
    first changes what trains (`first_unfreeze`, None without a schedule) and when it did (`unfroze_at`, None if
    training never got there)."""

    select: str
    histories: list[list[float]]
    first_unfreeze: int | None = None
    unfroze_at: int | None = None


def first_unfreeze(freeze, epochs: int) -> int | None:
    """The first epoch at which a freeze schedule trains more than at epoch 0 (None: it never changes)."""
    start = freeze.policy_at(0)
    return next((epoch for epoch in range(1, epochs) if freeze.policy_at(epoch) is not start), None)


def closing_warnings(metrics: Mapping[str, Any], baseline: Mapping[str, float] | None,
                     facts: TrainingFacts) -> list[str]:  # fmt: skip
    """Plain sentences for a run whose reported model is (close to) the untrained one; [] for one that trained and
    gained."""
    found = []
    epoch = metrics.get("selection/epoch")
    if epoch == 0:
        found.append(f"the selected checkpoint is from epoch 0, the first: later epochs never scored higher on "
                     f"{facts.select}, so the reported model had one epoch of training and is close to the untrained "
                     "model; try a higher optim.lr or more trainer.max_epochs")  # fmt: skip
    scores = [value for history in facts.histories for value in history]
    if baseline is not None and facts.select in baseline and scores and max(scores) <= baseline[facts.select]:
        found.append(f"the model never beat the untrained model on validation: its best {facts.select} after any "
                     f"epoch was {100 * max(scores):.1f}%, the untrained model's {100 * baseline[facts.select]:.1f}%"
                     + (" (validation is saturated: it cannot tell a better model)" if baseline[facts.select] >= 1
                        else ""))  # fmt: skip
    if facts.first_unfreeze is not None:
        if facts.unfroze_at is None:
            found.append(f"the freeze schedule never unfroze anything: it first trains more at epoch "
                         f"{facts.first_unfreeze}, which training never reached; only the groups trainable from the "
                         "start trained")  # fmt: skip
        elif isinstance(epoch, int) and epoch < facts.first_unfreeze:
            found.append(f"the selected checkpoint (epoch {epoch}) is from before the freeze schedule first unfroze "
                         f"more (epoch {facts.first_unfreeze}): the reported model has only its starting groups "
                         "trained")  # fmt: skip
    if metrics.get("wise_ft/alpha") == 0:
        found.append("WiSE-FT reports the untrained model (mix 0): no mix of the fine-tuned weights beat it on "
                     "validation beyond the noise of its queries; the fine-tuned weights' own scores are under "
                     "finetuned/ in metrics.json")  # fmt: skip
    return found


def _why_no_wise_ft(run, initial) -> str | None:
    if run.heads:
        return "the run replaced its projection heads, which start from random weights: a mix would be meaningless"
    if initial is None:
        return f"this run was started before its starting weights were kept ({INITIAL} is missing)"
    return None


def choice_line(metrics: Mapping[str, Any], select: str, smooth: int) -> str | None:
    """One line on how the reported model was chosen: the selected epoch and its validation gain, what the last
    epoch's weights would have scored, the WiSE-FT ratio and the retention (None when nothing was selected)."""
    if "selection/epoch" not in metrics:
        return None
    how = select if smooth == 1 else f"{select} (mean of {smooth})"
    parts = [f"selected epoch {metrics['selection/epoch']} by {how}"]
    if "selection/val_gain" in metrics:
        parts[0] += f", {100 * metrics['selection/val_gain']:+.1f} over the untrained model"
    if "last/test/rank1" in metrics:
        parts.append(f"the last epoch would score test Rank-1 {100 * metrics['last/test/rank1']:.1f}%")
    if "raw/test/rank1" in metrics:
        parts.append(f"the raw (not EMA) weights {100 * metrics['raw/test/rank1']:.1f}%")
    if "wise_ft/alpha" in metrics:
        alpha = metrics["wise_ft/alpha"]
        parts.append(f"WiSE-FT mix {alpha:g} of the fine-tuned weights" if alpha else
                     "WiSE-FT reports the untrained model: no mix beat it on validation beyond the noise of its "
                     "queries")  # fmt: skip
    if "reported/val_gain" in metrics:
        low, high = 100 * metrics["reported/val_gain_low"], 100 * metrics["reported/val_gain_high"]
        parts.append(f"validation gain of the reported model {100 * metrics['reported/val_gain']:+.1f}, 95% CI "
                     f"[{low:+.1f}, {high:+.1f}]" + ("" if low > 0 or metrics.get("wise_ft/alpha") == 0 else
                     ": within noise, it may be no better than the untrained model on people never seen"))  # fmt: skip
    if "zeroshot/retention" in metrics:
        parts.append(f"zero-shot retention {metrics['zeroshot/retention']:.2f}")
    return "; ".join(parts)
