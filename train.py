"""Fine-tune a CLIP model: `python train.py experiment=demo` (see README.md).

Hydra composes the configuration from conf/; `handclip.train.cli` runs what it asks for.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from handclip.train.cli import run_command  # imported first: its start time predates every folder Hydra makes
from handclip.train.resolvers import register_resolvers

register_resolvers()


# the absolute folder: the same whether this file runs as a script or is imported as a module
@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="train")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    return run_command(cfg, HydraConfig.get())


if __name__ == "__main__":
    main()
