"""What fine-tuning costs the model's language side, and weight-space ensembling to keep it.

- `retention(baseline, final)`: the zero-shot prompt tasks (handclip.eval.zeroshot) that the model
  could do before fine-tuning (baseline accuracy at least `MARGIN` above chance), each as
  (fine-tuned accuracy - chance) / (baseline accuracy - chance), averaged: 1.0 keeps everything,
  0.0 is chance, above 1.0 improves on the baseline.
- WiSE-FT (Wortsman et al., 2022): the weights (1 - alpha) * initial + alpha * fine-tuned, for a
  few alphas, with no retraining; `choose_alpha` picks one on validation alone: the smallest alpha
  (the closest to the initial model, so the most of its zero-shot ability) whose validation gain
  over the initial model is at least `keep` of the fine-tuned model's own (alpha 1) and beyond the
  noise of the validation queries (handclip.eval.significance, at `confidence`). When no mix gains
  beyond noise, alpha 0: the initial model is reported, not a fine-tune that validation cannot
  tell from luck.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from handclip.checks import number
from handclip.errors import ConfigError

MARGIN = 0.05  # a task the baseline did not beat chance by this much has nothing to retain


def retention(baseline: Mapping[str, float], final: Mapping[str, float]) -> float | None:
    """The mean retained share of zero-shot skill above chance over the prompt tasks; None when no task qualifies."""
    shares = []
    chances = [k for k in final if k.startswith("zeroshot/") and k.endswith("_chance")]
    tasks = sorted(k[len("zeroshot/") : -len("_chance")] for k in chances)
    for task in tasks:  # whatever prompt tasks the data source has (an aspect's halves have no chance: not tasks)
        key, chance = f"zeroshot/{task}_accuracy", final.get(f"zeroshot/{task}_chance")
        if key not in final or key not in baseline or chance is None:
            continue
        if baseline[key] - chance >= MARGIN:
            shares.append((final[key] - chance) / (baseline[key] - chance))
    return statistics.fmean(shares) if shares else None


@dataclass(frozen=True)
class WiseFT:
    """`eval.wise_ft`: the mixing ratios tried after training, and the share of validation gain a mix must keep."""

    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    keep: float = 0.8
    metric: str = "val/mAP"
    # a mix must beat the initial model on validation at this confidence (paired bootstrap over the validation
    # queries); None: any gain counts, however small
    confidence: float | None = 0.95

    def __post_init__(self):
        if not isinstance(self.alphas, (list, tuple)):
            raise ConfigError(f"eval.wise_ft.alphas={self.alphas!r} must be a list of ratios from 0 to 1")
        alphas = tuple(sorted({number("eval.wise_ft.alphas[]", a, 0, 1) for a in self.alphas}))
        if 1.0 not in alphas or len(alphas) < 2:
            raise ConfigError(f"eval.wise_ft.alphas={list(self.alphas)} must hold 1.0 (the fine-tuned weights) and at "
                              "least one smaller ratio, e.g. [0.0, 0.25, 0.5, 0.75, 1.0]")  # fmt: skip
        if 0.0 not in alphas:
            raise ConfigError(f"eval.wise_ft.alphas={list(self.alphas)} must hold 0.0 (the initial weights): each "
                              "mix's gain is measured from it, and it is reported when no mix gains")  # fmt: skip
        object.__setattr__(self, "alphas", alphas)
        object.__setattr__(self, "keep", number("eval.wise_ft.keep", self.keep, 0, 1, low_open=True))
        if self.confidence is not None:
            object.__setattr__(self, "confidence",
                               number("eval.wise_ft.confidence", self.confidence, 0, 1, low_open=True, high_open=True))
        if not self.metric.startswith("val/"):
            raise ConfigError(f"eval.wise_ft.metric={self.metric!r} must be a validation metric (val/mAP, val/rank1): "
                              "a mix is never chosen on test")  # fmt: skip


def interpolate(initial: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float) -> dict:
    """(1 - alpha) * initial + alpha * tuned, for every floating-point tensor of `tuned` (by name)."""
    mixed = {}
    for name, value in tuned.items():
        start = initial[name].to(value.device, value.dtype)
        mixed[name] = torch.lerp(start, value, alpha) if value.is_floating_point() else value
    return mixed


def choose_alpha(scores: Mapping[float, float], keep: float, beyond_noise: Collection[float] | None = None) -> float:
    """The alpha to report, from each alpha's validation score (alpha 0 is the initial model): the smallest alpha
    whose gain over alpha 0 is at least `keep` of alpha 1's and, when `beyond_noise` is given, among those alphas
    (whose gain validation tells from noise). When alpha 1 gained nothing (or not beyond noise), the alpha that
    validates best among those that gain; when none gains, 0: the initial model."""
    gains = {alpha: score - scores[0.0] for alpha, score in scores.items()}
    gaining = {a: g for a, g in gains.items() if a > 0 and g > 0 and (beyond_noise is None or a in beyond_noise)}
    if not gaining:
        return 0.0
    if 1.0 in gaining:
        return min(alpha for alpha, gain in gaining.items() if gain >= keep * gaining[1.0])
    best = max(gaining.values())
    return min(alpha for alpha, gain in gaining.items() if gain == best)


def curve_rows(results: Mapping[float, Mapping[str, float]], baseline: Mapping[str, float] | None) -> list[dict]:
    """One row per alpha: its validation and test scores and zero-shot retention (for metrics.json and the figure)."""
    rows = []
    for alpha, metrics in sorted(results.items()):
        row = {"alpha": alpha}
        for key in ("val/rank1", "val/mAP", "test/rank1", "test/mAP", "test_all/rank1"):
            if key in metrics:
                row[key] = metrics[key]
        if baseline is not None:
            row["zeroshot/retention"] = retention(baseline, metrics)
        rows.append(row)
    return rows


def trade_off_figure(rows: Sequence[Mapping], chosen: float, path):
    """Re-identification Rank-1 against zero-shot retention, one point per alpha, the chosen one marked."""
    from handclip.eval.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    points = [r for r in rows if r.get("zeroshot/retention") is not None and "test/rank1" in r]
    if not points:
        plt.close(fig)
        return None
    for key, marker, label in (("test/rank1", "o", "test Rank-1"), ("val/rank1", "s", "validation Rank-1")):
        shown = [r for r in points if key in r]
        ax.plot([r["zeroshot/retention"] for r in shown], [100 * r[key] for r in shown], marker=marker, label=label)
        for r in shown:
            ax.annotate(f"{r['alpha']:g}", (r["zeroshot/retention"], 100 * r[key]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))  # fmt: skip
    picked = next(r for r in points if r["alpha"] == chosen) if any(r["alpha"] == chosen for r in points) else None
    if picked is not None:
        ax.plot([picked["zeroshot/retention"]], [100 * picked["test/rank1"]], marker="*", markersize=16,
                linestyle="", color="C3", label=f"chosen on validation (alpha {chosen:g})")  # fmt: skip
    ax.set_xlabel("zero-shot retention (1 = as before fine-tuning)")
    ax.set_ylabel("Rank-1 (%)")
    return save_figure(fig, ax, path, "WiSE-FT: re-identification against zero-shot retention")
