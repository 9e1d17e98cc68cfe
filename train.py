"""Fine-tune a CLIP model: `python train.py experiment=demo` (see README.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from handclip.train.resolvers import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from handclip.errors import HandClipError
    from handclip.io import write_text_atomic
    from handclip.train.run import run_training
    from handclip.train.sweep import record_failure

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
        if "group" in plain["logger"] and plain["logger"]["group"] is None:
            plain["logger"]["group"] = plain["sweep"]["name"]  # wandb groups a sweep's runs
        finished = run_dir / "metrics.json"
        if finished.is_file() and not plain.get("overwrite"):
            # a resumed sweep does not run finished points again
            print(f"{run_dir.name}: finished earlier, skipping")
            return float(json.loads(finished.read_text())["metrics"].get("val/rank1", float("nan")))
        if not plain.get("ckpt_path") and any((run_dir / "checkpoints").glob("*.ckpt")):
            plain["ckpt_path"] = "last"  # an interrupted point continues where it stopped
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(plain))
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
