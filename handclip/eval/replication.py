"""Replicated comparisons: a sweep over seeds and data draws summarised as an experiment, not as rows.

The runs of a sweep fall into *groups*, one per combination of the swept settings other than the
replication keys (`seed`, the training seed, and `data.draw`, which draw of the data); within a
group, runs differ only by draw and seed. For every group and metric this gives n, the mean, the
standard deviation and a 95% confidence interval (Student's t), of the metric and of its gain over
each run's own baseline (the same model before fine-tuning, on the same data). Between two groups
it pairs the runs that share a draw and a seed (the same data and the same random numbers) and
gives the paired difference with its 95% interval and a two-sided p-value (a paired t-test,
`scipy.stats.ttest_rel`), and a one-line verdict:

    last_4 beats last_2 by +3.1 test Rank-1, 95% CI [+1.2, +5.0], p=0.004, 9 paired runs

What cannot be compared is said, never shown as NaN: a group with a single run has no interval
(`n` = 1 and an empty interval); runs that failed are named and left out of their pairs; two runs of
one pair trained on different data (another split file), or scored under different evaluation protocols
(`eval.protocol`), are not compared.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

REPLICATION_KEYS = ("seed", "data.draw")
# what a summary reports, by its metrics.json name and how a verdict names it (fractions, shown as percent)
METRICS = {
    "test/rank1": "test Rank-1", "test/mAP": "test mAP", "test_all/rank1": "merged-gallery Rank-1",
    "test_all/mAP": "merged-gallery mAP", "val/rank1": "val Rank-1", "val/mAP": "val mAP",
    "zeroshot/retention": "zero-shot retention", "retrieval/image_to_text_R@10": "image-to-text R@10",
}  # fmt: skip
# the metrics whose gain over the run's own baseline is reported too (`gain/<metric>`)
GAINED = ("test/rank1", "test/mAP", "test_all/rank1", "test_all/mAP", "val/rank1", "val/mAP")


def gains(metrics: Mapping[str, Any]) -> dict[str, float]:
    """`gain/<metric>` = fine-tuned minus the same run's baseline, where both were measured."""
    return {
        f"gain/{name}": metrics[name] - metrics[f"baseline/{name}"]
        for name in GAINED
        if _number(metrics.get(name)) and _number(metrics.get(f"baseline/{name}"))
    }


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Interval:
    """n, mean, standard deviation and the half-width of the 95% interval of a set of values."""

    n: int
    mean: float
    std: float | None  # None for one value
    ci95: float | None  # half-width; None for one value

    @property
    def low(self) -> float | None:
        return None if self.ci95 is None else self.mean - self.ci95

    @property
    def high(self) -> float | None:
        return None if self.ci95 is None else self.mean + self.ci95


def interval(values: Sequence[float]) -> Interval:
    """The mean of `values` with Student's t 95% interval (scipy.stats.t); no interval for a single value."""
    import numpy as np
    from scipy import stats

    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0:
        raise ValueError("an interval needs at least one value")
    mean = float(values.mean())
    if n == 1:
        return Interval(1, mean, None, None)
    std = float(values.std(ddof=1))
    return Interval(n, mean, std, float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)))


@dataclass
class Comparison:
    """Group `a` minus group `b` on `metric`, over the runs they share by draw and seed."""

    a: str
    b: str
    metric: str
    difference: Interval | None
    p_value: float | None
    pairs: int
    problem: str = ""  # why there is no difference to show

    def verdict(self) -> str:
        name = METRICS.get(self.metric.removeprefix("gain/"), self.metric)
        if self.problem:
            return f"{self.a} vs {self.b}: not compared on {name}: {self.problem}"
        d = self.difference
        if d.ci95 is None:
            return (f"{self.a} vs {self.b}: {100 * d.mean:+.1f} {name} on a single paired run: no interval "
                    "(replicate with more seeds or draws)")  # fmt: skip
        span = f"95% CI [{100 * d.low:+.1f}, {100 * d.high:+.1f}], p={self.p_value:.2g}, {self.pairs} paired runs"
        if d.low > 0:
            return f"{self.a} beats {self.b} by {100 * d.mean:+.1f} {name}, {span}"
        if d.high < 0:
            return f"{self.a} trails {self.b} by {100 * d.mean:+.1f} {name}, {span}"
        return f"{self.a} and {self.b} do not differ on {name} ({100 * d.mean:+.1f}, {span}: the interval holds 0)"


@dataclass
class Replication:
    """A sweep's runs as an experiment: groups, their intervals, the paired comparisons and what was left out."""

    swept: list[str]  # the settings that define groups
    groups: dict[str, list[dict]]  # group label -> its finished runs
    summaries: dict[str, dict[str, Interval]] = field(default_factory=dict)  # group -> metric -> interval
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be used, in words


def group_label(run: Mapping, swept: Sequence[str]) -> str:
    """A group's name: its swept settings (`freeze.vision_blocks=4`), shortened to the values when they are few."""
    if not swept:
        return "all runs"
    return ",".join(f"{key.rsplit('.', 1)[-1]}={run.get(key)}" for key in swept)


def replicate(runs: Sequence[Mapping], swept: Sequence[str], metrics: Sequence[str] | None = None) -> Replication:
    """Group the runs (dicts with their swept settings, `status`, `metrics` and `data`: the split file) by the swept
    settings other than the replication keys, summarise each group, and compare every pair of groups."""
    replication = [*REPLICATION_KEYS, *_following(runs, swept)]
    grouping = [key for key in swept if key not in replication]
    result = Replication(grouping, {})
    labels = _command_line_labels(runs, grouping)
    for run in runs:
        label = labels.get(id(run)) or group_label(run, grouping)
        if run.get("status") != "finished":
            result.notes.append(f"{run.get('run')} ({label}) {run.get('status', 'did not finish')}: left out")
            continue
        result.groups.setdefault(label, []).append(run)
    wanted = list(metrics or [*METRICS, *(f"gain/{m}" for m in GAINED)])
    for label, members in result.groups.items():
        summary = {}
        for metric in wanted:
            values = [run["metrics"][metric] for run in members if _number(run["metrics"].get(metric))]
            if values:
                summary[metric] = interval(values)
        result.summaries[label] = summary
        if len(members) == 1:
            result.notes.append(
                f"{label} has a single finished run: no 95% interval (replicate it over seeds and data draws, "
                "e.g. seed=0,1,2 data.draw=0,1,2)"
            )
    for a, b in itertools.combinations(result.groups, 2):
        for metric in wanted:
            comparison = compare(a, result.groups[a], b, result.groups[b], metric)
            if comparison is not None:
                result.comparisons.append(comparison)
    return result


def _overrides(folder: str) -> dict[str, str] | None:
    """The key=value overrides a sweep point's folder is named by (Hydra's override_dirname), or None when the name
    is not one (a hashed long name, a folder named by hand)."""
    items: list[str] = []
    for part in folder.split(","):
        if "=" in part.split("[", 1)[0] and not (items and items[-1].count("[") > items[-1].count("]")):
            items.append(part)
        elif items:  # a list value's own comma: image_size=[96,72]
            items[-1] += "," + part
        else:
            return None
    pairs = dict(item.split("=", 1) for item in items)
    return pairs if len(pairs) == len(items) else None


def _command_line_labels(runs: Sequence[Mapping], grouping: Sequence[str]) -> dict[int, str]:
    """Each run's group named as the command line swept it (`freeze=lp_ft`, `experiment=demo_strong`) rather than by
    the settings that differ inside a config group (`_target_=...Staged,...`): the overrides in its folder's name
    that are no replication key and differ between runs. Only when every run's folder is so named and these names
    split the runs exactly as their settings do; otherwise nothing (the settings name the groups)."""
    parsed = {id(run): _overrides(str(run.get("run", ""))) for run in runs}
    if not runs or not grouping or any(items is None for items in parsed.values()):
        return {}
    keys = sorted({key for items in parsed.values() for key in items if key.lstrip("+~") not in REPLICATION_KEYS})
    varying = [key for key in keys if len({parsed[id(run)].get(key) for run in runs}) > 1]
    labels = {id(run): ",".join(f"{key.lstrip('+~')}={parsed[id(run)].get(key)}" for key in varying) for run in runs}
    by_settings: dict[str, set] = {}
    by_name: dict[str, set] = {}
    for run in runs:
        by_settings.setdefault(group_label(run, grouping), set()).add(id(run))
        by_name.setdefault(labels[id(run)], set()).add(id(run))
    if not all(labels.values()) or sorted(map(sorted, by_settings.values())) != sorted(map(sorted, by_name.values())):
        return {}
    return labels


def _following(runs: Sequence[Mapping], swept: Sequence[str]) -> list[str]:
    """The swept settings that take a replication key's value in every run, as an interpolation does
    (`data.run_seed: ${seed}`): they vary with the seed or the draw, so they replicate; grouping by them would
    split each group by seed and leave no pair to compare."""
    keys = [key for key in REPLICATION_KEYS if key in swept]
    return [
        key for key in swept
        if key not in REPLICATION_KEYS
        and any(all(str(run.get(key)) == str(run.get(leader)) for run in runs) for leader in keys)
    ]  # fmt: skip


def _protocol(run: Mapping) -> str:
    """The protocol a run states it follows (metrics.json's `protocol`); runs from before they stated one followed
    HandCLIP's."""
    return (run.get("protocol") or {}).get("name", "handclip")


def _pair_key(run: Mapping) -> tuple:
    return tuple(str(run.get(key)) for key in REPLICATION_KEYS)


def compare(a: str, runs_a: Sequence[Mapping], b: str, runs_b: Sequence[Mapping], metric: str) -> Comparison | None:
    """`a` minus `b` on `metric`, paired by draw and seed; None when neither group measured the metric."""
    from scipy import stats

    by_key = {_pair_key(run): run for run in runs_b}
    pairs = [(run, by_key[_pair_key(run)]) for run in runs_a if _pair_key(run) in by_key]
    pairs = [(x, y) for x, y in pairs if _number(x["metrics"].get(metric)) and _number(y["metrics"].get(metric))]
    if not pairs:
        measured = any(_number(r["metrics"].get(metric)) for r in [*runs_a, *runs_b])
        if not measured:
            return None
        return Comparison(a, b, metric, None, None, 0, "no draw and seed was run in both groups")
    other_data = [(x, y) for x, y in pairs if x.get("data") != y.get("data")]
    if other_data:
        x, y = other_data[0]
        return Comparison(a, b, metric, None, None, 0,
                          f"{x.get('run')} and {y.get('run')} share draw and seed but not their data "
                          f"({x.get('data')} vs {y.get('data')}): a paired difference needs the same data")  # fmt: skip
    other_protocol = [(x, y) for x, y in pairs if _protocol(x) != _protocol(y)]
    if other_protocol:
        x, y = other_protocol[0]
        return Comparison(a, b, metric, None, None, 0,
                          f"{x.get('run')} and {y.get('run')} follow different evaluation protocols ({_protocol(x)} vs "
                          f"{_protocol(y)}: eval.protocol): their numbers are not of the same thing")  # fmt: skip
    differences = [x["metrics"][metric] - y["metrics"][metric] for x, y in pairs]
    spread = interval(differences)
    p_value = None
    if len(pairs) > 1:
        if spread.std < 1e-12:  # every pair differs by the same amount: the t statistic is undefined
            p_value = 0.0 if spread.mean != 0 else 1.0
        else:
            p_value = float(stats.ttest_rel([x["metrics"][metric] for x, _ in pairs],
                                            [y["metrics"][metric] for _, y in pairs]).pvalue)  # fmt: skip
    return Comparison(a, b, metric, spread, p_value, len(pairs))
