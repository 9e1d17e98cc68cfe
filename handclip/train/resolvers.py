"""OmegaConf resolvers that `conf/` uses; `register_resolvers()` before composing or resolving.

`train.py` calls it at import; tests and library users call it before `hydra.compose` so a
composed configuration resolves without importing `train.py`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def short(overrides: str) -> str:
    """Overrides as a directory name: readable, and hashed when too long for a file system."""
    overrides = overrides.replace("/", "_")
    if len(overrides) <= 120:
        return overrides
    return overrides[:80] + "-" + hashlib.sha1(overrides.encode()).hexdigest()[:10]


def run_dir(name: str, run_name: str | None, overrides: str) -> str:
    """runs/<name> or runs/<name>/<overrides that matter>, or runs/<run_name>: stable, so that
    `ckpt_path=last` from a new process finds the same run."""
    if run_name:
        return str(run_name)
    return name if not overrides else f"{name}/{short(overrides)}"


def register_resolvers() -> None:
    """Register `handclip.cwd`, `handclip.run_dir` and `handclip.short` (idempotent)."""
    from omegaconf import OmegaConf

    # the directory the command was started from; unlike ${hydra:runtime.cwd} it also resolves
    # while Hydra sets up a multirun's sweep directory (before its HydraConfig exists)
    OmegaConf.register_new_resolver("handclip.cwd", lambda: str(Path.cwd()), replace=True)
    OmegaConf.register_new_resolver("handclip.run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("handclip.short", short, replace=True)
