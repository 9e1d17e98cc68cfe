"""`python train.py ...`: the command's modes once Hydra has composed the configuration.

    a dry run          print the plan (each stage's, for a run in stages), write nothing
    a sweep point      `-m`: bookkeeping of the sweep (handclip.train.sweep_point), then a run
    a run in stages    handclip.train.stages
    a run              handclip.train.run

Refusals are one `error:` line and exit status 2, and take back the folders this command made
(Hydra makes the run directory before the configuration can be checked). Import this module
before Hydra starts (train.py does), so `STARTED` predates every folder it makes.
"""

from __future__ import annotations

import errno
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

STARTED = time.time()
# what a user can do when a write fails, by errno: what was written before stays (every write is atomic)
WRITE_ERRORS = {
    errno.ENOSPC: "The disk is full: free space and run the same command again (with ckpt_path=last to resume)",
    errno.EDQUOT: "The disk quota is used up: free space and run the same command again",
    errno.EFBIG: "A file size limit was reached (ulimit -f?): raise it and run the same command again",
    errno.EROFS: "The file system is read-only: point paths.runs (or the folder named) at a writable one",
    errno.EACCES: "This user may not write there: point paths.runs (or the folder named) at a folder you can write",
}


def refuse(message: str, run_dir: Path) -> None:
    """Print one error line, take back the directories this process made for the run, exit 2."""
    from handclip.train.rundir import remove_new_empty_dirs

    print(f"error: {message}", file=sys.stderr)
    remove_new_empty_dirs(run_dir, since=STARTED)
    sys.exit(2)


def run_command(cfg: DictConfig, hydra_cfg) -> float:
    """Run what the composed configuration asks for; return what a sweeper optimises (validation Rank-1)."""
    from hydra.types import RunMode

    from handclip.errors import HandClipError
    from handclip.train.resolvers import paths_problem, run_name_problem

    run_dir = Path(hydra_cfg.runtime.output_dir)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        refuse(f"{missing[0]} has no value; set it on the command line, e.g. {missing[0]}=...", run_dir)
    problem = paths_problem(cfg.paths)
    if problem:
        refuse(problem, run_dir)
    problem = run_name_problem(cfg.get("run_name")) or run_name_problem(cfg.get("name"), "name")
    if problem:
        refuse(problem, run_dir)
    plain = OmegaConf.to_container(cfg, resolve=True)
    try:  # read before anything is built: overwrite=no must not start a run over
        from handclip.train.config import check_run_settings

        check_run_settings(plain)
    except HandClipError as error:
        refuse(str(error), run_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun and plain.get("run_name"):  # it would be ignored: every point has a folder of its own
        refuse(f"run_name={plain['run_name']} names one run, and a sweep (-m) runs several, each in "
               "runs/sweeps/<name>/<sweep>/<its overrides>; name the sweep's folder with "
               f"sweep_name={plain['run_name']}, or leave run_name out", run_dir)  # fmt: skip
    if not multirun and plain.get("sweep_name") is not None:  # it would be ignored: one run has no sweep folder
        refuse(f"sweep_name={plain['sweep_name']} names a sweep's folder, and this is one run: sweep with -m, "
               "or name the run with run_name", run_dir)  # fmt: skip
    if plain.get("dry_run"):
        return dry_run_command(cfg, hydra_cfg, plain, run_dir)
    asked = plain  # what config.yaml records
    if multirun:
        from handclip.train.sweep_point import prepare_point

        prepared = prepare_point(plain, run_dir, hydra_cfg)
        if isinstance(prepared, float):  # finished earlier (its validation Rank-1), or refused and recorded
            return prepared
        plain, asked = prepared
    try:
        if plain.get("stages"):
            from handclip.train.stages import run_stages, stage_composer

            metrics = run_stages(plain, run_dir, stage_composer(cfg, hydra_cfg, plain))
        else:
            from handclip.train.run import run_training

            # writes config.yaml only once the configuration is checked and the run directory is locked
            metrics = run_training(plain, run_dir, record_as=asked)
    except Exception as error:
        if multirun:  # one failed point is recorded and the sweep goes on
            from handclip.train.sweep import record_failure

            record_failure(run_dir, error, plain)
            print(f"error in {run_dir.name}: {error}", file=sys.stderr)
            return float("nan")
        if isinstance(error, HandClipError):
            refuse(str(error), run_dir)
        if isinstance(error, OSError) and error.errno in WRITE_ERRORS:  # the disk, not the run, failed
            refuse(f"could not write {error.filename or 'a file'}: {error.strerror}. {WRITE_ERRORS[error.errno]}",
                   run_dir)  # fmt: skip
        raise
    # what a sweeper optimises: validation, never test
    return float(metrics.get("val/rank1", 0.0))


def dry_run_command(cfg: DictConfig, hydra_cfg, plain: dict, run_dir: Path) -> float:
    """Print the plan of the run (of each stage, as it will run); write nothing."""
    from handclip.errors import HandClipError
    from handclip.train.dry_run import dry_run
    from handclip.train.rundir import remove_new_empty_dirs

    try:
        if plain.get("stages"):
            from handclip.train.stages import compose_stage, stage_composer, stage_dirs, stage_names

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
