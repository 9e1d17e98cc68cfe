"""OmegaConf resolvers that `conf/` uses; `register_resolvers()` before composing or resolving.

`train.py` calls it at import; tests and library users call it before `hydra.compose` so a
composed configuration resolves without importing `train.py`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# the sweep's own name (its folder under runs/sweeps), set while a multirun sweeps `experiment`
# (handclip.train.sweep.SweepSummary): the experiment is left out of folder names made from overrides (a run's name
# says it), so a sweep over it names it in each point's folder, which would otherwise be the same for every
# experiment at the same other settings, and keeps every point in that one sweep folder
SWEPT_EXPERIMENT = "HANDCLIP_SWEPT_EXPERIMENT"


def short(overrides: str) -> str:
    """Overrides as a directory name: readable, and hashed when too long for a file system."""
    if os.environ.get(SWEPT_EXPERIMENT):
        overrides = _with_experiment(overrides)
    overrides = overrides.replace("/", "_")
    if len(overrides) <= 120:
        return overrides
    return overrides[:80] + "-" + hashlib.sha1(overrides.encode()).hexdigest()[:10]


def _with_experiment(overrides: str) -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return overrides
    choice = HydraConfig.get().runtime.choices.get("experiment")
    return f"experiment={choice}" + (f",{overrides}" if overrides else "") if choice else overrides


# where a run whose run_name would leave runs/ is pointed, so nothing is written outside runs/;
# train.py refuses it before anything is written there
REFUSED_RUN_NAME = ".refused-run-name"
NAME_MAX = 255  # bytes in one file or folder name, on every common file system


def run_name_problem(run_name, key: str = "run_name") -> str | None:
    """Why `run_name` (or `name`, the other setting a run directory is named by) cannot name a folder under runs/,
    or None."""
    if run_name is None:
        return None
    text = str(run_name)
    if not text.strip() or text.startswith(("/", "~")) or ".." in Path(text).parts or "\\" in text:
        return (
            f"{key}={text!r} must be a relative name inside paths.runs (letters, digits, - _ . and /); "
            "absolute paths and .. are not allowed. To keep runs elsewhere, set paths.runs=DIR"
        )
    if not Path(text).parts:  # `.`: the runs folder itself, which holds every other run
        return f"{key}={text!r} names paths.runs itself: give the run a name of its own inside it, e.g. {key}=mine"
    longest = max(Path(text).parts, key=lambda part: len(os.fsencode(part)))
    if len(os.fsencode(longest)) > NAME_MAX:
        return (f"{key}={text[:40]!r}...: a folder name of {len(os.fsencode(longest))} bytes, longer than the "
                f"{NAME_MAX} a file system allows; choose a shorter name")  # fmt: skip
    return None


FOLDERS = {  # the paths.* folders, and what each holds
    "runs": "where run directories go",
    "data": "where datasets are read and synthetic data is drawn",
    "cache": "where built backbones are kept",
}


def folder_problem(key: str, path: str, writable: bool = False) -> str | None:
    """Why `paths.<key>` cannot be used: a file where the folder goes, or (`writable`) a folder this process may not
    write; None when it can."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        return f"paths.{key}={path} is a file: point it at a folder ({FOLDERS[key]})"
    while writable and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if writable and not os.access(folder, os.W_OK | os.X_OK):
        return (f"paths.{key}={path}: {folder} is not writable by this user (read-only?); point paths.{key} at a "
                "folder you can write")  # fmt: skip
    return None


def runs_problem(path: str) -> str | None:
    """Why runs cannot be written under `paths.runs` (a file there, or a folder this process may not write), or None."""
    return folder_problem("runs", path, writable=True)


def paths_problem(paths) -> str | None:
    """The first of `paths.runs`, `paths.data` and `paths.cache` that cannot be used, said why; None when all can
    (a file where the data or cache folder goes was a NotADirectoryError traceback)."""
    problems = [runs_problem(str(paths.runs))]
    problems += [folder_problem(key, str(paths[key])) for key in ("data", "cache") if paths.get(key)]
    return next((problem for problem in problems if problem), None)


def runs_dir(path: str) -> str:
    """`paths.runs`, or, when runs cannot be written there, a stand-in folder that train.py refuses and removes:
    Hydra makes the run directory before any check can run, and must not fail with a traceback."""
    if runs_problem(path):
        import tempfile

        return str(Path(tempfile.gettempdir()) / f"handclip-refused-{os.getpid()}")
    return path


def run_dir(name: str, run_name: str | None, overrides: str) -> str:
    """runs/<name> or runs/<name>/<overrides that matter>, or runs/<run_name>: stable, so that
    `ckpt_path=last` from a new process finds the same run."""
    if run_name_problem(run_name) or run_name_problem(name, "name"):
        return REFUSED_RUN_NAME
    if run_name:
        return str(run_name)
    return name if not overrides else f"{name}/{short(overrides)}"


def safe_name(name: str) -> str:
    """`name` as a folder under runs/sweeps, or the stand-in that train.py refuses when it would leave it. While a
    multirun sweeps `experiment`, every point's name is the sweep's (each experiment has its own), so that all points
    land in one sweep folder."""
    name = os.environ.get(SWEPT_EXPERIMENT) or name
    return REFUSED_RUN_NAME if run_name_problem(name, "name") else name


def sweep_folder(sweep_name, started: str) -> str:
    """A sweep's own folder under runs/sweeps/<name>: `sweep_name`, or the time the sweep started when it has none
    (every sweep a folder of its own, so that no summary, soup or failure mixes two sweeps); the stand-in that the
    sweep refuses when the name would leave that folder."""
    if sweep_name is None:
        return started
    return REFUSED_RUN_NAME if run_name_problem(sweep_name, "sweep_name") else str(sweep_name)


def register_resolvers() -> None:
    """Register `handclip.cwd`, `handclip.run_dir` and `handclip.short` (idempotent)."""
    from omegaconf import OmegaConf

    # the directory the command was started from; unlike ${hydra:runtime.cwd} it also resolves
    # while Hydra sets up a multirun's sweep directory (before its HydraConfig exists)
    OmegaConf.register_new_resolver("handclip.cwd", lambda: str(Path.cwd()), replace=True)
    OmegaConf.register_new_resolver("handclip.run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("handclip.runs_dir", runs_dir, replace=True)
    OmegaConf.register_new_resolver("handclip.short", short, replace=True)
    OmegaConf.register_new_resolver("handclip.safe_name", safe_name, replace=True)
    OmegaConf.register_new_resolver("handclip.sweep_folder", sweep_folder, replace=True)
