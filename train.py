"""Fine-tune a CLIP model: `python train.py experiment=demo` (see README.md).

Hydra composes the configuration from conf/; `handclip.train.cli` runs what it asks for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# imported first: its start time predates every folder Hydra makes
from handclip.train.cli import check_override_keys, run_command
from handclip.train.resolvers import register_resolvers

register_resolvers()
# the absolute folder: the same whether this file runs as a script or is imported as a module
CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="train")
def run(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    return run_command(cfg, HydraConfig.get())


def main() -> None:
    """A mistyped key gets HandCLIP's "did you mean" before Hydra's advice to add it with +; then Hydra runs."""
    check_override_keys(sys.argv[1:], CONF, "train")
    run()


if __name__ == "__main__":
    main()
