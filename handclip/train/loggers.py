"""Loggers built from `conf/logger/*.yaml`, and what a run tells them beyond the metrics."""

from __future__ import annotations

import csv
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from handclip.io import atomic_write, write_text_atomic


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])  # new rows extend the same columns


class HistoryCSVLogger(CSVLogger):
    """CSV metrics that survive a resume: `logs/metrics.csv` keeps every epoch of the run.

    `keep_until(step)` drops the rows a crashed process logged after the checkpoint it resumes
    from, so no step appears twice.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    def keep_until(self, step: int) -> None:
        """Forget rows after optimiser step `step` (those the resumed checkpoint does not include)."""
        path = os.path.join(self.log_dir, "metrics.csv")
        if not os.path.isfile(path):
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            header, rows = reader.fieldnames or [], list(reader)
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) <= step]
        if len(kept) != len(rows):
            with atomic_write(path) as handle:
                writer = csv.DictWriter(handle, fieldnames=header)
                writer.writeheader()
                writer.writerows(kept)


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
