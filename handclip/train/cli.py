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


# parts of Hydra's own configuration no command line sets: left out of the keys a typo is compared with
_HYDRA_INTERNALS = ("hydra.runtime.", "hydra.overrides.", "hydra.help.", "hydra.hydra_help.", "hydra.job_logging.",
                    "hydra.hydra_logging.", "hydra.callbacks.")  # fmt: skip


def check_override_keys(argv: list[str], config_dir: str | Path, config_name: str) -> None:
    """Before Hydra runs: a key the command line sets (or deletes) that the composed configuration does not have is
    refused in one `error:` line with the nearest key there is, exit 2 (Hydra would only advise adding it with +).

    Additions (+key, ++key), an unknown option of a config group, and anything Hydra alone can judge are left to
    Hydra; so is every command line this check cannot read."""
    try:
        problem = _unknown_override_key(argv, Path(config_dir), config_name)
    except Exception:  # noqa: BLE001 - never in the way: Hydra then reports what it finds
        return
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def _unknown_override_key(argv: list[str], config_dir: Path, config_name: str) -> str | None:
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_dir or args.config_path \
            or args.config_name or args.experimental_rerun:  # fmt: skip
        return None
    lines = []  # a sweep's first point stands for it (a typo fails every point the same way)
    for override in OverridesParser.create().parse_overrides(args.overrides):
        line = override.input_line
        if override.is_sweep_override():
            prefix = line[: len(line) - len(line.lstrip("+~"))]
            line = f"{prefix}{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
        lines.append((override.key_or_group, line))
    unknown = None
    while True:
        try:
            failed, cfg = _compose(config_dir, config_name, [line for _, line in lines])
        except Exception:  # noqa: BLE001 - Hydra's own message; with a typo found, the keys come from conf/ alone
            if unknown is None:
                raise
            failed, cfg = _compose(config_dir, config_name, [])
        if failed is None or not any(key == failed for key, _ in lines):
            break
        unknown = unknown or (failed, next(line for key, line in lines if key == failed))
        lines = [(key, line) for key, line in lines if key != failed]
    if unknown is None or cfg is None:
        return None
    return _did_you_mean(*unknown, cfg)


def _compose(config_dir: Path, config_name: str, overrides: list[str]):
    """(the key an override names that the configuration lacks, None) or (None, the composed configuration)."""
    import re

    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        try:
            return None, compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        except ConfigCompositionException as error:
            found = re.match(r"Could not override '([^']+)'|Could not delete from config\. '([^']+)' does not exist",
                             str(error))  # fmt: skip
            if found:
                return found.group(1) or found.group(2), None
            raise


def _did_you_mean(key: str, line: str, cfg: DictConfig) -> str:
    from handclip.train.config import _flat_keys, _nearest, _settings_of

    plain = OmegaConf.to_container(cfg, resolve=False)
    known = [k for k in _flat_keys(plain) if not k.startswith(_HYDRA_INTERNALS) and "._" not in f".{k}"]
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else None
    if isinstance(node, DictConfig) and isinstance(node.get("_target_"), str):
        from handclip.build import locate

        try:
            target = locate(node["_target_"])
        except Exception:  # noqa: BLE001 - a target that does not import is reported when the run builds it
            target = None
        if target is not None and name in _settings_of(target):
            return (f"{key} is not in the configuration, but {node['_target_']} takes it: add it with "
                    f"+{line.lstrip('+~')}")  # fmt: skip
    message = f"{key} is not a setting{_nearest(key, known)}"
    if isinstance(node, DictConfig):
        siblings = [str(k) for k in node if not str(k).startswith("_")]
        shown = ", ".join(siblings[:12]) + (", ..." if len(siblings) > 12 else "")
        message += f"; {parent} has {shown}" if siblings else f"; {parent} has no settings"
    return message
