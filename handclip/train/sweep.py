"""Sweep summaries: a CSV, a plot and a printed table, and for a replicated sweep an experiment's statistics.

`write_summary(sweep_dir)` reads each run's `config.yaml` and `metrics.json` (or `failed.json`),
finds the swept keys as those whose values differ between runs (so it works for any sweeper:
grid, Optuna, ...), and writes into the sweep directory:

- a sweep over settings alone: `summary.csv` (one row per run) and `summary.png`;
- a replicated sweep (it sweeps `seed` and/or `data.draw` too, `handclip.eval.replication`):
  `runs.csv` (one row per run), `summary.csv` (one row per group of the other settings: `n` and
  `<metric>_mean`, `<metric>_std`, `<metric>_ci95` for each metric and its gain over the run's own
  baseline), `comparisons.csv` (each pair of groups, paired by draw and seed: metric, difference,
  ci95, p_value) and `summary.png` (each group's mean with its 95% interval), and prints a verdict
  per comparison.

`SweepSummary` is the Hydra callback that calls it when a multirun ends.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handclip.errors import first_line
from handclip.io import atomic_write, write_json_atomic

IGNORED = ("paths.", "hydra.", "run_name", "sweep_name", "ckpt_path", "overwrite", "sweep.")
COLUMNS = (
    "status", "trainable_parameters", "val/rank1", "test/rank1", "test/rank1_std", "test/mAP", "test/mAP_std",
    "test_all/rank1", "test_all/rank1_std", "test_all/mAP", "test_all/mAP_std", "train_time_s", "wall_time_s",
    "peak_memory_mb", "baseline/test/rank1", "baseline/test/mAP", "baseline/test_all/rank1", "baseline/test_all/mAP",
    "zeroshot/aspect_accuracy", "zeroshot/skin_accuracy", "zeroshot/gender_accuracy", "zeroshot/nail_polish_accuracy",
)  # fmt: skip
ZERO_SHOT = ("aspect", "skin", "gender", "nail_polish")
RETRIEVAL = "retrieval/"  # image-text recall (`retrieval/image_to_text_R@1`, ...), measured on caption data


def metric_columns(runs: list[dict]) -> list[str]:
    """The summary's columns after the swept settings: `status`, then those of COLUMNS that some run holds (in
    their order), then the retrieval recalls some run holds (image-to-text first, R@1 before R@5)."""
    held = {key for row in runs for key in row.get("metrics") or {}}
    recalls = [key for key in held if key.startswith(RETRIEVAL)]
    recalls.sort(key=lambda k: (k.rsplit("_R@", 1)[0], int(k.rsplit("@", 1)[1]) if k[-1].isdigit() else 0, k))
    return [key for key in COLUMNS if key == "status" or key in held] + recalls


def sweep_headline(runs: list[dict]) -> str:
    """The evaluation the runs' stated protocol heads with (metrics.json's `protocol`, `test_all` for the published
    protocol on 11k); `test` for runs from before they stated one, and where the runs do not agree."""
    heads = {(row.get("protocol") or {}).get("headline", "test") for row in runs if row.get("status") == "finished"}
    return heads.pop() if len(heads) == 1 else "test"


def test_wording(runs: list[dict], head: str = "test") -> str:
    """What the test columns (the `head` evaluation's) measure, as the runs say it (metrics.json's `galleries`, the
    data source's words, and the protocol they follow); for runs from before they said it, read off their metrics:
    `test` is the same-aspect gallery only where a gallery merged over aspects (`test_all`) exists beside it; other
    data has one gallery per test run."""
    said = {(row.get("galleries") or {}).get(head) for row in runs} - {None}
    named = {(row.get("protocol") or {}).get("name") for row in runs if row.get("status") == "finished"} - {None}
    protocol = f", {named.pop()} protocol" if len(named) == 1 else ""
    if len(said) == 1:
        return f"{head}: {said.pop()}{protocol}"
    held = {key for row in runs for key in row.get("metrics") or {}}
    if head == "test_all":
        return f"test_all: gallery merged over aspects{protocol}"
    if any(key.startswith("test_all/") for key in held):
        return f"test: same-aspect gallery{protocol}"
    return f"test: queries against each run's gallery{protocol}"


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def collect_runs(sweep_dir: str | Path) -> tuple[list[str], list[dict]]:
    """(swept keys, one dict per run) for the runs under `sweep_dir`."""
    runs = []
    points = sorted({p.parent for name in ("config.yaml", "failed.json") for p in Path(sweep_dir).glob(f"*/{name}")})
    for run_dir in points:
        failed, finished = run_dir / "failed.json", run_dir / "metrics.json"
        damage = []  # a record that cannot be read is said in the row, never read in part
        failure = _record(failed, damage) if failed.is_file() else None
        if (run_dir / "config.yaml").is_file():
            config = _record(run_dir / "config.yaml", damage) or {}
        else:  # refused before its run directory was written: the failure keeps what was asked
            config = (failure or {}).get("config") or {}
        payload = _record(finished, damage) if finished.is_file() else None
        if payload is not None and not isinstance(payload.get("metrics"), Mapping):
            damage.append(f"{finished} is damaged: it has no metrics")
            payload = None
        row: dict[str, Any] = {"run": run_dir.name, "config": _flatten(config if isinstance(config, Mapping) else {})}
        # a failure recorded after the point finished (a rerun refused) is the point's state now
        if damage:
            row.update(status="damaged", error=damage[0])
        elif failure is not None and (payload is None or failed.stat().st_mtime >= finished.stat().st_mtime):
            row.update(status="failed", error=failure.get("error", ""))
        elif payload is not None:
            from handclip.eval.replication import gains

            metrics = {**payload["metrics"], **gains(payload["metrics"])}
            shown = {k: v for k, v in metrics.items() if k in COLUMNS or k.startswith(RETRIEVAL)}
            row.update(shown, status="finished")
            row.update(metrics=metrics, data=payload.get("manifest"), galleries=payload.get("galleries"),
                       protocol=payload.get("protocol"))  # fmt: skip
        else:
            row["status"] = "unfinished"
        runs.append(row)
    keys = sorted({k for r in runs for k in r["config"]})
    swept = [
        k
        for k in keys
        if not k.startswith(IGNORED) and len({json.dumps(r["config"].get(k), default=str) for r in runs}) > 1
    ]
    for row in runs:
        for key in swept:
            row[key] = row["config"].get(key)
    return swept, runs


def sweeps_in(folder: str | Path) -> list[Path]:
    """The sweeps directly inside `folder` (runs/sweeps/<name> holds one folder per sweep), in name order: the
    folders that hold points (subfolders with config.yaml or failed.json)."""
    inner = [p for p in Path(folder).iterdir() if p.is_dir()] if Path(folder).is_dir() else []
    return sorted(p for p in inner if any(p.glob("*/config.yaml")) or any(p.glob("*/failed.json")))


def _record(path: Path, damage: list[str]) -> dict | None:
    """The record in `path`, or None with the reason added to `damage` when it cannot be read."""
    from handclip.io import DamagedFileError, read_record

    try:
        return read_record(path)
    except DamagedFileError as error:
        damage.append(str(error))
        return None


def write_summary(sweep_dir: str | Path) -> tuple[Path, Path | None]:
    """Write summary.csv (and summary.png when something finished); print the table. A replicated sweep (over
    seeds or data draws) is summarised as an experiment (see the module docstring)."""
    from handclip.eval.replication import REPLICATION_KEYS

    sweep_dir = Path(sweep_dir)
    swept, runs = collect_runs(sweep_dir)
    fields = ["run", *swept, *metric_columns(runs), "error"]
    replicated = any(key in swept for key in REPLICATION_KEYS)
    csv_path = sweep_dir / ("runs.csv" if replicated else "summary.csv")
    with atomic_write(csv_path) as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    _print_table(swept, runs)
    if replicated:
        return write_replication(sweep_dir, swept, runs)
    png = _plot(sweep_dir / "summary.png", swept, runs)
    return csv_path, png


def write_replication(sweep_dir: Path, swept: list[str], runs: list[dict]) -> tuple[Path, Path | None]:
    """summary.csv (per group), comparisons.csv (per pair of groups), summary.png and the verdicts, printed."""
    from handclip.eval.replication import METRICS, replicate

    result = replicate(runs, swept)
    metrics = sorted({metric for summary in result.summaries.values() for metric in summary},
                     key=lambda m: (m.startswith("gain/"), list(METRICS).index(m.removeprefix("gain/"))
                                    if m.removeprefix("gain/") in METRICS else 99, m))  # fmt: skip
    rows = []
    for label, members in result.groups.items():
        row = {"group": label, **{key: members[0].get(key) for key in result.swept}, "n": len(members)}
        for metric in metrics:
            spread = result.summaries[label].get(metric)
            if spread is not None:
                row.update({f"{metric}_mean": spread.mean, f"{metric}_std": _blank(spread.std),
                            f"{metric}_ci95": _blank(spread.ci95)})  # fmt: skip
        rows.append(row)
    fields = ["group", *result.swept, "n", *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "ci95"))]
    summary = sweep_dir / "summary.csv"
    with atomic_write(summary) as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(sweep_dir / "comparisons.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=["a", "b", "metric", "difference", "ci95", "ci95_low",
                                                    "ci95_high", "p_value", "pairs", "note"])  # fmt: skip
        writer.writeheader()
        for c in result.comparisons:
            d = c.difference
            writer.writerow({
                "a": c.a, "b": c.b, "metric": c.metric, "difference": "" if d is None else d.mean,
                "ci95": "" if d is None else _blank(d.ci95), "ci95_low": "" if d is None else _blank(d.low),
                "ci95_high": "" if d is None else _blank(d.high), "p_value": _blank(c.p_value), "pairs": c.pairs,
                "note": c.problem,
            })  # fmt: skip
    head = sweep_headline(runs)
    _print_replication(result, test_wording(runs, head), head)
    png = _plot_replication(sweep_dir / "summary.png", result, head)
    return summary, png


def _blank(value: float | None) -> float | str:
    return "" if value is None else value


def _print_replication(result, wording: str, head: str = "test") -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"replicated sweep: mean ± 95% CI over draws and seeds ({wording}, %)")
    for name in ["group", "n", "test R1", "gain R1", "test mAP", "gain mAP", "val R1", "retention"]:
        table.add_column(name, justify="right")

    def cell(label: str, metric: str, scale: float = 100.0) -> str:
        spread = result.summaries[label].get(metric)
        if spread is None:
            return "-"
        shown = f"{scale * spread.mean:.1f}" if scale == 100.0 else f"{spread.mean:.2f}"
        if spread.ci95 is None:
            return shown
        return shown + (f" ± {scale * spread.ci95:.1f}" if scale == 100.0 else f" ± {spread.ci95:.2f}")

    for label, members in result.groups.items():
        table.add_row(label, str(len(members)), cell(label, f"{head}/rank1"), cell(label, f"gain/{head}/rank1"),
                      cell(label, f"{head}/mAP"), cell(label, f"gain/{head}/mAP"), cell(label, "val/rank1"),
                      cell(label, "zeroshot/retention", 1.0))  # fmt: skip
    console.print(table)
    for note in result.notes:  # plain lines, never wrapped: a user greps them
        print(f"note: {note}")
    for comparison in result.comparisons:
        if comparison.metric in (f"{head}/rank1", f"{head}/mAP", "zeroshot/retention"):
            print(comparison.verdict())


def _plot_replication(path: Path, result, head: str = "test") -> Path | None:
    """Each group's headline Rank-1 (beside its baseline) and its gain: mean and 95% interval over draws and
    seeds."""
    groups = [label for label in result.groups if f"{head}/rank1" in result.summaries[label]]
    if not groups:
        return None
    from handclip.eval.plots import pyplot
    from handclip.eval.protocol import headline_name

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    xs = list(range(len(groups)))
    names = [f"{label}\n(n={len(result.groups[label])})" for label in groups]
    named = headline_name(head)
    for ax, metric, title in ((axes[0], f"{head}/rank1", f"{named} Rank-1 (%)"),
                              (axes[1], f"gain/{head}/rank1", "gain over the run's baseline (points)")):  # fmt: skip
        spreads = [result.summaries[label].get(metric) for label in groups]
        means = [100 * s.mean if s else float("nan") for s in spreads]
        errors = [100 * (s.ci95 or 0.0) if s else 0.0 for s in spreads]
        ax.errorbar(xs, means, yerr=errors, fmt="o", capsize=4, color="C0", label="mean and 95% CI")
        if metric.startswith("gain/"):
            ax.axhline(0.0, color="grey", linestyle=":", label="no gain")
        else:
            gained = [result.summaries[label].get(f"gain/{head}/rank1") for label in groups]
            baseline = [m - 100 * g.mean if g else float("nan") for m, g in zip(means, gained, strict=True)]
            ax.plot(xs, baseline, linestyle="", marker="_", markersize=20, color="C1", label="baseline (mean)")
        ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("replicated sweep: mean and 95% interval over data draws and seeds")
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, dpi=120, format="png")
    plt.close(fig)
    return path


def _pct(row: Mapping, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    std = row.get(key + "_std")
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


# the tables' columns after the swept settings: heading, whether a row holds it, its cell
TABLE = {
    "trainable": (lambda r: r.get("trainable_parameters"), lambda r: f"{r['trainable_parameters']:,}"),
    "val R1": (lambda r: r.get("val/rank1") is not None, lambda r: _pct(r, "val/rank1")),
    "test R1": (lambda r: r.get("test/rank1") is not None, lambda r: _pct(r, "test/rank1")),
    "test mAP": (lambda r: r.get("test/mAP") is not None, lambda r: _pct(r, "test/mAP")),
    "merged R1": (lambda r: r.get("test_all/rank1") is not None, lambda r: _pct(r, "test_all/rank1")),
    "merged mAP": (lambda r: r.get("test_all/mAP") is not None, lambda r: _pct(r, "test_all/mAP")),
    "zero-shot a/s/g/n": (lambda r: zero_shot(r) != "-", lambda r: zero_shot(r)),
    "image→text R@1": (lambda r: r.get("retrieval/image_to_text_R@1") is not None,
                       lambda r: _pct(r, "retrieval/image_to_text_R@1")),
    "text→image R@1": (lambda r: r.get("retrieval/text_to_image_R@1") is not None,
                       lambda r: _pct(r, "retrieval/text_to_image_R@1")),
    "train s": (lambda r: r.get("train_time_s"), lambda r: f"{r['train_time_s']:.0f}"),
}  # fmt: skip


def table_columns(runs: list[dict], names: tuple[str, ...] | None = None) -> list[str]:
    """Those of the table's columns `names` that some run holds: a column no run has is left out. By default the
    headline evaluation's: the merged gallery's columns stand in for the same-aspect ones where the runs' protocol
    heads with it."""
    if names is None:
        merged = sweep_headline(runs) == "test_all"
        names = tuple(n for n in TABLE if n not in (("test R1", "test mAP") if merged else ("merged R1", "merged mAP")))
    return [name for name in names if any(TABLE[name][0](row) for row in runs)]


def _cells(row: Mapping, columns: list[str]) -> list[str]:
    return [TABLE[name][1](row) if TABLE[name][0](row) else "-" for name in columns]


def _print_table(swept: list[str], runs: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    columns = table_columns(runs)
    tested = bool({"test R1", "test mAP", "merged R1", "merged mAP"} & set(columns))
    wording = test_wording(runs, sweep_headline(runs))
    table = Table(title="sweep summary" + (f" ({wording}, mean ± std over runs)" if tested else ""))
    for name in [*swept, "status", *columns]:
        table.add_column(name, justify="right")
    for row in runs:
        table.add_row(*[str(row.get(k)) for k in swept], row["status"], *_cells(row, columns))
    Console().print(table)


def zero_shot(row: Mapping) -> str:
    """Zero-shot accuracies after training (percent): aspect/skin/gender/nail polish, "-" where not measured."""
    values = [row.get(f"zeroshot/{name}_accuracy") for name in ZERO_SHOT]
    if all(v is None for v in values):
        return "-"
    return "/".join("-" if v is None else f"{100 * v:.0f}" for v in values)


def _plot(path: Path, swept: list[str], runs: list[dict]) -> Path | None:
    head = sweep_headline(runs)
    finished = [r for r in runs if r["status"] == "finished" and r["metrics"].get(f"{head}/rank1") is not None]
    if not finished:
        return None
    from handclip.eval.plots import pyplot, save_figure
    from handclip.eval.protocol import headline_name

    plt = pyplot()
    key = swept[0] if swept else None
    numeric = key is not None and all(isinstance(r.get(key), (int, float)) for r in finished)
    finished.sort(key=lambda r: r.get(key) if numeric else str(r.get(key)))
    xs = [r[key] for r in finished] if numeric else list(range(len(finished)))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    named = headline_name(head)
    for (metric, marker), colour in zip(((f"{head}/rank1", "o"), (f"{head}/mAP", "s")), ("C0", "C1"), strict=True):
        ys = [100 * r["metrics"][metric] for r in finished]
        errors = [100 * (r["metrics"].get(metric + "_std") or 0.0) for r in finished]
        ax.errorbar(xs, ys, yerr=errors, marker=marker, capsize=3, color=colour,
                    label=metric.replace(f"{head}/", f"{named} "))  # fmt: skip
        before = [r["metrics"].get("baseline/" + metric) for r in finished]
        if all(b is not None for b in before):  # the same model before training, for scale
            label = metric.replace(f"{head}/", "untrained ")
            ax.plot(xs, [100 * b for b in before], linestyle=":", color=colour, label=label)
    if numeric:
        ax.set_xticks(sorted(set(xs)))
    else:
        ax.set_xticks(xs, [str(r.get(key, r["run"])) for r in finished], rotation=30, ha="right")
    ax.set_xlabel(key or "run")
    ax.set_ylabel("%")
    times = [r.get("train_time_s") for r in finished]
    if all(t is not None for t in times):  # what each point cost, on its own axis
        cost = ax.twinx()
        cost.plot(xs, times, linestyle="--", marker="x", color="grey", label="training time")
        cost.set_ylabel("training time (s)", color="grey")
        cost.set_ylim(bottom=0)
    plt.close(save_figure(fig, ax, path, f"{named} Rank-1 and mAP against " + (key or "run")))
    return path


def record_failure(run_dir: str | Path, error: BaseException, config: Mapping | None = None) -> None:
    """Mark a run of a sweep as failed (its summary row says so; the sweep goes on)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"error": f"{type(error).__name__}: {first_line(error)}", "config": dict(config) if config else None}
    write_json_atomic(run_dir / "failed.json", payload)


# settings that cannot change a point's result: where files go, how it is logged, how fast it loads
NOT_RESULT = ("paths.", "sweep.", "sweep_name", "hydra.", "logger.", "callbacks.", "ckpt_path", "overwrite", "run_name",
              "data.num_workers", "eval.batch_size", "trainer.enable_progress_bar")  # fmt: skip


def changed_settings(before: Mapping, now: Mapping) -> list[tuple[str, Any, Any]]:
    """(key, before, now) for each setting that differs and could change a run's result."""
    old, new = _flatten(before), _flatten(now)
    return [
        (key, old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if not key.startswith(NOT_RESULT) and old.get(key) != new.get(key)
    ]


def _sweep_dir(config) -> Path:
    return Path(config.hydra.sweep.dir)


try:  # the callback is glue: only defined where Hydra is installed
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class SweepSummary(_HydraCallback):
    """Hydra callback: check and say the sweep's folder; name the swept experiment in each point's folder; summarise
    the sweep directory when a multirun ends, and exit 2 when every point this command ran failed."""

    def __init__(self) -> None:
        self.points: list[Path] = []  # the folders of this command's points (of the jobs that ran in this process)

    def on_multirun_start(self, config, **kwargs) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from handclip.train.resolvers import SWEPT_EXPERIMENT, run_name_problem

        os.environ.pop(SWEPT_EXPERIMENT, None)
        self.points = []
        overrides = OverridesParser.create().parse_overrides([str(o) for o in config.hydra.overrides.task])
        folder_given = any(str(o).startswith("hydra.sweep.dir=") for o in config.hydra.overrides.hydra)
        sweep_name = config.get("sweep_name")
        problem = run_name_problem(sweep_name, "sweep_name")
        if any(o.key_or_group == "sweep_name" and o.is_sweep_override() for o in overrides):
            problem = "sweep_name names the one folder of a sweep: give one name, not several"
        elif sweep_name is not None and folder_given:
            problem = f"sweep_name={sweep_name} and hydra.sweep.dir both name the sweep's folder: give one of them"
        if problem:  # before the sweeper makes any folder: a refused command writes nothing
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        if any(o.key_or_group == "experiment" and o.is_sweep_override() for o in overrides):
            os.environ[SWEPT_EXPERIMENT] = str(config.name)
        print(f"sweep folder: {_sweep_dir(config)}", flush=True)

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        # (a launcher that runs jobs elsewhere, SLURM, ends them in their own process: then every point counts)
        self.points.append(Path(config.hydra.runtime.output_dir))

    def on_multirun_end(self, config, **kwargs) -> None:
        from handclip.train.resolvers import SWEPT_EXPERIMENT

        os.environ.pop(SWEPT_EXPERIMENT, None)
        sweep_dir = _sweep_dir(config)
        if sweep_dir.is_dir():
            csv_path, png = write_summary(sweep_dir)
            print(f"sweep summary: {csv_path}" + (f" and {png}" if png else ""))
            _, runs = collect_runs(sweep_dir)
            # this command's points; a named sweep's folder may hold others, finished by an earlier command
            ran = {p.name for p in self.points}
            mine = [r for r in runs if r["run"] in ran] if ran else runs
            if mine and all(r["status"] == "failed" for r in mine):
                print(f"error: every point of the sweep failed; see {csv_path}", file=sys.stderr)
                sys.exit(2)


def markdown_table(swept: list[str], runs: list[dict]) -> str:
    """The summary as a Markdown table (percent, mean ± std over the test runs); columns no run has are left out."""
    names = ("trainable", "train s", "test R1", "test mAP", "zero-shot a/s/g/n", "image→text R@1", "text→image R@1")
    columns = table_columns(runs, names)
    head = ["run", *swept, *(name.replace("a/s/g/n", "aspect/skin/gender/nails %") for name in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in runs:
        cells = [row["run"], *[str(row.get(k)) for k in swept], *_cells(row, columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """`python -m handclip.train.sweep DIR [--markdown]`: summarise the runs in DIR (a sweep, or any folder of runs)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", help="a folder whose subfolders are runs (config.yaml, metrics.json)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"error: {folder} is not a folder", file=sys.stderr)
        sys.exit(2)
    swept, runs = collect_runs(folder)
    if not runs:
        inner = sweeps_in(folder)
        if inner:  # runs/sweeps/<name>: one folder per sweep, each summarised on its own
            print(f"error: {folder} holds sweeps ({len(inner)}), not runs: summarise one of them, e.g. {inner[-1]}",
                  file=sys.stderr)  # fmt: skip
        else:
            print(f"error: no runs in {folder} (a run is a subfolder with config.yaml or failed.json)", file=sys.stderr)
        sys.exit(2)
    csv_path, png = write_summary(folder)
    print(f"summary: {csv_path}" + (f" and {png}" if png else ""))
    if args.markdown:
        print(markdown_table(swept, runs))


if __name__ == "__main__":
    main()
