"""Loggers built from `conf/logger/*.yaml`, and what a run tells them beyond the metrics."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from handclip.io import write_text_atomic


def stable_wandb_id(run_dir: str | Path) -> str:
    """One wandb run id per run directory, kept in a file so a resumed run continues it."""
    path = Path(run_dir) / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    write_text_atomic(path, run_id)
    return run_id


def wandb_logger(
    save_dir: str, project: str, entity: str | None = None, tags: Sequence[str] = (), mode: str = "online",
    group: str | None = None,
):  # fmt: skip
    """A `WandbLogger` named after the run directory, resuming its run id; `group` is the sweep."""
    from lightning.pytorch.loggers import WandbLogger

    from handclip.errors import ConfigError

    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"logger.mode={mode!r}: choose one of online, offline, disabled")
    return WandbLogger(
        project=project, entity=entity, tags=list(tags or []), save_dir=str(save_dir), offline=mode == "offline",
        mode=mode, name=Path(save_dir).name, id=stable_wandb_id(save_dir), resume="allow", group=group,
    )  # fmt: skip


def log_run_facts(logger, cfg: Mapping, report) -> None:
    """The resolved config and the freeze table, sent to the logger."""
    logger.log_hyperparams({k: v for k, v in cfg.items() if k not in ("paths",)})
    if type(logger).__name__ == "WandbLogger":
        import wandb

        table = wandb.Table(columns=["group", "parameters", "trainable"])
        for row in report.rows:
            table.add_data(row.group, row.parameters, row.status)
        logger.experiment.log({"freeze": table})
        logger.experiment.summary["trainable_parameters"] = report.trainable
    elif type(logger).__name__ == "TensorBoardLogger":
        logger.experiment.add_text("freeze", "```\n" + report.to_text() + "\n```")


def log_figures(logger, figures: dict) -> None:
    """Send figures to wandb or TensorBoard (the CSV logger keeps the PNGs beside it), then close them."""
    import matplotlib.pyplot as plt

    for name, figure in figures.items():
        try:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log({f"plots/{name}": wandb.Image(figure)})
            elif type(logger).__name__ == "TensorBoardLogger":
                logger.experiment.add_figure(f"plots/{name}", figure)
        finally:
            plt.close(figure)
