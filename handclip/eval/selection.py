"""How good is a run's checkpoint selection? Rules compared on recorded curves, over many runs.

    python -m handclip.eval.selection runs/sweeps/NAME [--json out.json]

Every run under the folder that recorded its test curve (`eval.curve=true`: after each validation,
`curve.json` holds the validation scores and the test protocol's) is replayed under each selection
rule: a validation metric (`val/rank1`, `val/mAP`, ... whatever the runs logged), averaged over the
last k validations (k = 1, 3, 5), picks an epoch, and the test score at that epoch is what the rule
would have reported; `last` takes the final epoch. Per rule, over the runs:

- `false gain`: the share of runs in which the selected checkpoint beats the untrained model on
  validation (its selecting metric above the baseline's) but not on test (test Rank-1 at or below
  the baseline's): what selection by noise looks like;
- `test gain`: the selected checkpoint's test Rank-1 over the baseline's, mean and 95% interval;
- `regret`: the best test Rank-1 of any epoch minus the selected one's (what an oracle that
  peeks at test would gain, which no rule may do).

Test scores are read here only to judge the rules; no rule looks at them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

SMOOTHING = (1, 3, 5)
TEST = "test/rank1"


def smoothed(values: Sequence[float], k: int) -> list[float]:
    """Trailing means over the last `k` values (as `handclip.train.selection` computes them during a run)."""
    return [statistics.fmean(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def pick(curve: Sequence[Mapping], metric: str | None, k: int = 1) -> int:
    """The index of the epoch a rule selects: the first maximum of the smoothed metric; `None`: the last epoch."""
    if metric is None:
        return len(curve) - 1
    scores = smoothed([row[metric] for row in curve], k)
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def rules_of(runs: Sequence[Mapping]) -> list[tuple[str, str | None, int]]:
    """(name, metric, k) for every validation metric all runs logged and have a baseline of, at each smoothing (the
    run's own smoothed `val/select` is one of these), and the last epoch."""
    logged = [{k for k in run["curve"][0] if k.startswith(("val", "ema/val")) and not k.endswith("/select")}
              for run in runs]  # fmt: skip
    metrics = sorted(m for m in set.intersection(*logged)
                     if all(f"baseline/{m.removeprefix('ema/')}" in run["baseline"] for run in runs))  # fmt: skip
    rules = [(f"{m} best" if k == 1 else f"{m} mean of {k}", m, k) for m in metrics for k in SMOOTHING]
    return [*rules, ("last epoch", None, 1)]


def study(runs: Sequence[Mapping]) -> list[dict]:
    """Each rule's outcome over `runs` ({"curve": [...], "baseline": {...}, "run": name})."""
    from handclip.eval.replication import interval

    outcomes = []
    for name, metric, k in rules_of(runs):
        gains, regrets, false = [], [], 0
        for run in runs:
            curve, baseline = run["curve"], run["baseline"]
            chosen = curve[pick(curve, metric, k)]
            test_gain = chosen[TEST] - baseline[f"baseline/{TEST}"]
            judged = metric.removeprefix("ema/") if metric else "val/rank1"
            val_gain = chosen[metric] - baseline[f"baseline/{judged}"] if metric else 0.0
            false += val_gain > 0 and test_gain <= 0
            gains.append(test_gain)
            regrets.append(max(row[TEST] for row in curve) - chosen[TEST])
        gain = interval(gains)
        outcomes.append({"rule": name, "runs": len(runs), "false_gain": false / len(runs), "test_gain": gain.mean,
                         "test_gain_ci95": gain.ci95, "regret": statistics.fmean(regrets)})  # fmt: skip
    return outcomes


def load_runs(folder: str | Path) -> list[dict]:
    """The runs under `folder` (at any depth) with a test curve and a baseline."""
    runs = []
    for path in sorted(Path(folder).rglob("curve.json")):
        metrics = path.with_name("metrics.json")
        if not metrics.is_file():
            continue
        baseline = {k: v for k, v in json.loads(metrics.read_text())["metrics"].items() if k.startswith("baseline/")}
        curve = json.loads(path.read_text())
        if curve and f"baseline/{TEST}" in baseline:
            runs.append({"run": str(path.parent), "curve": curve, "baseline": baseline})
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a folder of runs that recorded their test curve (eval.curve=true)")
    parser.add_argument("--json", help="also write the outcomes to this file")
    args = parser.parse_args(argv)
    runs = load_runs(args.folder)
    if not runs:
        print(f"error: no run under {args.folder} recorded a test curve with a baseline: train with eval.curve=true "
              "eval.baseline=true", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    outcomes = study(runs)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"checkpoint selection over {len(runs)} runs (test: same-aspect gallery, Rank-1 points)")
    for column in ("rule", "false gain %", "test gain", "regret"):
        table.add_column(column, justify="right")
    for o in outcomes:
        ci = f" ± {100 * o['test_gain_ci95']:.1f}" if o["test_gain_ci95"] is not None else ""
        table.add_row(o["rule"], f"{100 * o['false_gain']:.0f}", f"{100 * o['test_gain']:+.1f}{ci}",
                      f"{100 * o['regret']:.1f}")  # fmt: skip
    Console(width=120).print(table)
    if args.json:
        from handclip.io import write_json_atomic

        write_json_atomic(args.json, {"runs": [r["run"] for r in runs], "outcomes": outcomes})


if __name__ == "__main__":
    main()
