"""Fine-tune a CLIP model: `python train.py experiment=demo` (see README.md)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


def _short(overrides: str) -> str:
    """Overrides as a directory name: readable, and hashed when too long for a file system."""
    overrides = overrides.replace("/", "_")
    if len(overrides) <= 120:
        return overrides
    return overrides[:80] + "-" + hashlib.sha1(overrides.encode()).hexdigest()[:10]


def _run_dir(name: str, run_name: str | None, overrides: str) -> str:
    # stable run directories (runs/<name> or runs/<name>/<overrides that matter>), so that
    # `ckpt_path=last` from a new process finds the same run
    if run_name:
        return str(run_name)
    return name if not overrides else f"{name}/{_short(overrides)}"


# the directory train.py was started from; unlike ${hydra:runtime.cwd} it also resolves while
# Hydra sets up a multirun's sweep directory (before its HydraConfig exists)
OmegaConf.register_new_resolver("handclip.cwd", lambda: str(Path.cwd()), replace=True)
OmegaConf.register_new_resolver("handclip.run_dir", _run_dir, replace=True)
OmegaConf.register_new_resolver("handclip.short", _short, replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from handclip.errors import HandClipError
    from handclip.run import run_training
    from handclip.sweep import record_failure

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        print(f"error: {missing[0]} has no value; set it on the command line, e.g. {missing[0]}=...", file=sys.stderr)
        sys.exit(2)
    plain = OmegaConf.to_container(cfg, resolve=True)
    if multirun:
        plain["sweep"] = {"dir": str(Path(hydra_cfg.sweep.dir)), "name": Path(hydra_cfg.sweep.dir).name}
        finished = run_dir / "metrics.json"
        if finished.is_file() and not plain.get("overwrite"):
            # a resumed sweep does not run finished points again
            print(f"{run_dir.name}: finished earlier, skipping")
            return float(json.loads(finished.read_text())["metrics"].get("val/rank1", float("nan")))
        if not plain.get("ckpt_path") and any((run_dir / "checkpoints").glob("*.ckpt")):
            plain["ckpt_path"] = "last"  # an interrupted point continues where it stopped
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(plain))
    (run_dir / "failed.json").unlink(missing_ok=True)
    try:
        metrics = run_training(plain, run_dir)
    except Exception as error:
        if multirun:  # one failed point is recorded and the sweep goes on
            record_failure(run_dir, error)
            print(f"error in {run_dir.name}: {error}", file=sys.stderr)
            return float("nan")
        if isinstance(error, HandClipError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise
    # what a sweeper optimises: validation, never test
    return float(metrics.get("val/rank1", 0.0))


if __name__ == "__main__":
    main()
