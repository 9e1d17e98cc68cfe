"""One point of a sweep (`python train.py -m ...`): what it must do before it runs.

- A point that finished earlier with the same settings is not run again (its validation Rank-1 is
  returned); one that finished with other settings is refused and recorded as failed, so a summary
  never mixes two settings under one name.
- A point that was interrupted continues from its checkpoint (`ckpt_path=last`), without
  `init_from` (its checkpoint already holds those weights).
- The point knows its sweep (folder and name) and its wandb group is the sweep's name.
"""

from __future__ import annotations

import sys
from pathlib import Path

from handclip.errors import HandClipError


def sweep_label(sweep: Path, plain: dict) -> str:
    """The sweep's name for loggers: its folder below runs/sweeps (`demo/2025-01-31_12-00-00`), or its folder's name
    when it lies elsewhere (hydra.sweep.dir=DIR)."""
    sweeps = Path(str(plain.get("paths", {}).get("runs", ""))) / "sweeps"
    try:
        return sweep.relative_to(sweeps).as_posix()
    except ValueError:
        return sweep.name


def prepare_point(plain: dict, run_dir: Path, hydra_cfg) -> tuple[dict, dict] | float:
    """(the configuration to run, the configuration to record), or the point's result when it does not run:
    its validation Rank-1 when it finished earlier, NaN when it is refused (recorded in its failed.json)."""
    from handclip.train.rundir import finished_run
    from handclip.train.sweep import changed_settings, record_failure

    sweep = Path(hydra_cfg.sweep.dir)
    plain["sweep"] = {"dir": str(sweep), "name": sweep_label(sweep, plain)}
    if "group" in plain["logger"] and plain["logger"]["group"] is None:
        plain["logger"]["group"] = plain["sweep"]["name"]  # wandb groups a sweep's runs
    result = None if plain.get("overwrite") else finished_run(run_dir, "running the point again")
    if result is not None:
        saved, metrics = result
        changed = changed_settings(saved, plain)
        if not changed:
            print(f"{run_dir.name}: finished earlier, skipping")
            (run_dir / "failed.json").unlink(missing_ok=True)
            return float(metrics.get("val/rank1", float("nan")))
        key, before, now = changed[0]
        message = (
            f"{run_dir.name} finished earlier with other settings ({key}: {before} -> {now}"
            + (f", and {len(changed) - 1} more" if len(changed) > 1 else "")
            + "); its results are not reused. Run the point anew with overwrite=true, or leave sweep_name out "
            "(a sweep without one gets a folder of its own)"
        )
        record_failure(run_dir, HandClipError(message), plain)
        print(f"error in {message}", file=sys.stderr)
        return float("nan")
    asked = plain
    if not plain.get("ckpt_path") and any(
        p for pattern in ("checkpoints/*.ckpt", "*/checkpoints/*.ckpt") for p in run_dir.glob(pattern)
    ):
        # an interrupted point continues where it stopped; its checkpoint already holds any
        # init_from weights, so init_from (which a resume refuses) is not given again
        plain = {**plain, "ckpt_path": "last", "init_from": None}
    return plain, asked
