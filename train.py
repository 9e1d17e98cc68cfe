"""Fine-tune a CLIP model: `python train.py experiment=demo` (see README.md)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from handclip.train.resolvers import register_resolvers, run_name_problem

STARTED = time.time()
register_resolvers()


def refuse(message: str, run_dir: Path) -> None:
    """Print one error line, take back the directories this process made for the run, exit 2."""
    from handclip.train.rundir import remove_new_empty_dirs

    print(f"error: {message}", file=sys.stderr)
    remove_new_empty_dirs(run_dir, since=STARTED)
    sys.exit(2)


def stage_composer(cfg: DictConfig, hydra_cfg, plain: dict):
    """compose(name, previous) for handclip.train.stages: this run's configuration (its command-line
    overrides) with the stage's settings after them, the stage's name and the previous stage's folder
    filled in, resolved."""
    from hydra import compose

    from handclip.train.stages import stage_overrides

    task = list(hydra_cfg.overrides.task)
    groups = {p.name for p in (Path(__file__).parent / "conf").iterdir() if p.is_dir()}
    specs = OmegaConf.to_container(cfg.stages, resolve=False)  # ${stage.previous} is resolved per stage

    def composed(name: str, previous: str | None) -> dict:
        stage = compose(config_name="train", overrides=[*task, *stage_overrides(specs[name], groups)])
        stage.stages, stage.stage.name, stage.stage.previous = None, name, previous
        resolved = OmegaConf.to_container(stage, resolve=True)
        for key in ("sweep", "logger"):  # what a sweep point adds (its folder, the logger's group)
            if key in plain:
                resolved[key] = plain[key]
        return resolved

    return composed


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from handclip.errors import HandClipError
    from handclip.train.run import run_training
    from handclip.train.sweep import record_failure

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    runs = Path(cfg.paths.runs)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        refuse(f"{missing[0]} has no value; set it on the command line, e.g. {missing[0]}=...", run_dir)
    if runs.exists() and not runs.is_dir():
        refuse(f"paths.runs={runs} is a file: point it at a folder (where run directories go)", run_dir)
    problem = run_name_problem(cfg.get("run_name"))
    if problem:
        refuse(problem, run_dir)
    plain = OmegaConf.to_container(cfg, resolve=True)
    if plain.get("dry_run"):
        from handclip.train.dry_run import dry_run
        from handclip.train.rundir import remove_new_empty_dirs

        try:
            if plain.get("stages"):  # each stage's plan, as it will run
                from handclip.train.stages import compose_stage, stage_dirs, stage_names

                names = stage_names(plain["stages"])
                compose = stage_composer(cfg, hydra_cfg, plain)
                for name, previous in zip(names, [None, *stage_dirs(run_dir, names)[:-1]], strict=True):
                    print(f"stage {name}:")
                    dry_run(compose_stage(compose, name, previous))
            else:
                dry_run(plain)
        except HandClipError as error:
            refuse(str(error), run_dir)
        remove_new_empty_dirs(run_dir, since=STARTED)  # a dry run writes nothing
        return float("nan")
    asked = plain  # what config.yaml records
    if multirun:
        plain["sweep"] = {"dir": str(Path(hydra_cfg.sweep.dir)), "name": Path(hydra_cfg.sweep.dir).name}
        if "group" in plain["logger"] and plain["logger"]["group"] is None:
            plain["logger"]["group"] = plain["sweep"]["name"]  # wandb groups a sweep's runs
        finished = run_dir / "metrics.json"
        if finished.is_file() and not plain.get("overwrite"):
            # a resumed sweep does not run finished points again, if they were run with these settings
            import yaml

            from handclip.train.sweep import changed_settings

            saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
            changed = changed_settings(saved or {}, plain)
            if not changed:
                print(f"{run_dir.name}: finished earlier, skipping")
                (run_dir / "failed.json").unlink(missing_ok=True)
                return float(json.loads(finished.read_text())["metrics"].get("val/rank1", float("nan")))
            key, before, now = changed[0]
            message = (
                f"{run_dir.name} finished earlier with other settings ({key}: {before} -> {now}"
                + (f", and {len(changed) - 1} more" if len(changed) > 1 else "")
                + "); its results are not reused. Run the point anew with overwrite=true, or give this "
                "sweep its own folder with hydra.sweep.dir=runs/sweeps/NAME"
            )
            record_failure(run_dir, HandClipError(message), plain)
            print(f"error in {message}", file=sys.stderr)
            return float("nan")
        if not plain.get("ckpt_path") and any(
            p for pattern in ("checkpoints/*.ckpt", "*/checkpoints/*.ckpt") for p in run_dir.glob(pattern)
        ):
            # an interrupted point continues where it stopped; its checkpoint already holds any
            # init_from weights, so init_from (which a resume refuses) is not given again
            asked = dict(plain)
            plain = {**plain, "ckpt_path": "last", "init_from": None}
    try:
        if plain.get("stages"):
            from handclip.train.stages import run_stages

            metrics = run_stages(plain, run_dir, stage_composer(cfg, hydra_cfg, plain))
        else:
            # writes config.yaml only once the configuration is checked and the run directory is locked
            metrics = run_training(plain, run_dir, record_as=asked)
    except Exception as error:
        if multirun:  # one failed point is recorded and the sweep goes on
            record_failure(run_dir, error, plain)
            print(f"error in {run_dir.name}: {error}", file=sys.stderr)
            return float("nan")
        if isinstance(error, HandClipError):
            refuse(str(error), run_dir)
        raise
    # what a sweeper optimises: validation, never test
    return float(metrics.get("val/rank1", 0.0))


if __name__ == "__main__":
    main()
