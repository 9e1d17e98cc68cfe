"""Loggers built from `conf/logger/*.yaml`, and the one small protocol a run speaks to them.

Besides Lightning's metrics, a run tells its logger four things (`RunLogger`):

    keep_until(step)           a resumed run: forget what was logged after the checkpoint's step
    log_run_facts(config, report)   the resolved configuration and the freeze table
    log_figures(figures)       the run's figures (the CSV logger keeps the PNGs beside it instead)
    log_final(metrics, step)   the final numbers (the CSV logger's are metrics.json instead)

Every logger a conf file names implements them; a Lightning logger of a user's own gets the
defaults through `run_logger(logger)`.
"""

from __future__ import annotations

import csv
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment

from handclip.checks import one_of
from handclip.errors import ConfigError
from handclip.io import atomic_write, write_text_atomic


class RunLogger:
    """The protocol, with the defaults any Lightning logger can follow (mixed into ours)."""

    def keep_until(self, step: int) -> None:
        """Forget what was logged after optimiser step `step` (a resumed run redoes it)."""

    def log_run_facts(self, config: Mapping, report) -> None:
        """The resolved configuration (without its paths) and the freeze table."""
        self.log_hyperparams({k: v for k, v in config.items() if k not in ("paths",)})

    def log_figures(self, figures: Mapping) -> None:
        """The run's figures (matplotlib), by name; closed afterwards by the caller."""

    def log_final(self, metrics: Mapping, step: int) -> None:
        """The final numbers, then the end of the run."""
        self.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        self.finalize("success")


class _Defaults(RunLogger):
    """The protocol's defaults for a Lightning logger that does not follow it itself."""

    def __init__(self, logger: Logger):
        self.logger = logger

    def __getattr__(self, name: str):
        return getattr(self.logger, name)


def run_logger(logger: Logger) -> RunLogger:
    """`logger` itself when it follows the protocol, else a view of it with the protocol's defaults."""
    return logger if isinstance(logger, RunLogger) else _Defaults(logger)


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])  # new rows extend the same columns


class HistoryCSVLogger(RunLogger, CSVLogger):
    """CSV metrics that survive a resume: `logs/metrics.csv` keeps every epoch of the run.

    `keep_until(step)` drops the rows a crashed process logged after the checkpoint it resumes
    from, so no step appears twice. Its final numbers are the run's metrics.json.
    """

    def log_final(self, metrics: Mapping, step: int) -> None:
        pass

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


WANDB_MODES = ("online", "offline", "disabled")
# WANDB_MODE as wandb reads it, in HandCLIP's modes (wandb fails on any other value, even with logger.mode set)
_WANDB_ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline",
                    "run": "online", "shared": "online"}  # fmt: skip


def wandb_mode(mode: str | None) -> str:
    """`logger.mode`, or where it is null the environment's WANDB_MODE, else online; a value wandb would fail on
    later (after the data and the baseline) is refused now, naming the setting it came from."""
    env = os.environ.get("WANDB_MODE")
    if env and env not in _WANDB_ENV_MODES:
        raise ConfigError(
            f"WANDB_MODE={env!r} (in the environment) is not a mode of wandb: set it to one of "
            f"{', '.join(WANDB_MODES)} (e.g. export WANDB_MODE=offline), or unset it and give logger.mode"
        )
    if mode is not None:
        return one_of("logger.mode", mode, WANDB_MODES)
    return _WANDB_ENV_MODES[env] if env else "online"


def _wandb_host() -> tuple[str, str, int]:
    from urllib.parse import urlsplit

    url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    parts = urlsplit(url if "://" in url else f"https://{url}")
    return url, parts.hostname or "api.wandb.ai", parts.port or (80 if parts.scheme == "http" else 443)


def _has_wandb_credentials(host: str) -> bool:
    """An API key where wandb looks for one: WANDB_API_KEY (or an identity token file), or the .netrc entry that
    `wandb login` writes."""
    import netrc

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def check_wandb_can_start(mode: str, said: str = "logger.mode=online") -> None:
    """Refuse, in one line naming the fix, a wandb logger that would fail once the run has started: wandb not
    installed; online without an API key or without a route to the server. Nothing is sent anywhere."""
    import importlib.util
    import socket

    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("logger=wandb needs the wandb package, which is not installed: pip install wandb, "
                          "or choose logger=csv or logger=tensorboard")  # fmt: skip
    if mode != "online":
        return
    later = "or run offline (WANDB_MODE=offline, then wandb sync), or choose logger=csv"
    url, host, port = _wandb_host()
    if not _has_wandb_credentials(host):
        raise ConfigError(f"logger=wandb is online ({said}) but no W&B API key was found for {url}: "
                          f"run wandb login or set WANDB_API_KEY, {later}")  # fmt: skip
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as error:
        raise ConfigError(f"logger=wandb is online ({said}) but {url} cannot be reached ({error.strerror or error}): "
                          f"check the network, {later}") from None  # fmt: skip


def wandb_logger(
    save_dir: str, project: str, entity: str | None = None, tags: Sequence[str] = (), mode: str | None = None,
    group: str | None = None,
):  # fmt: skip
    """A `WandbLogger` named after the run directory, resuming its run id; `group` is the sweep. `mode` null: the
    environment's WANDB_MODE, else online. Refused (ConfigError) when it could not start: see
    `check_wandb_can_start`."""
    env = os.environ.get("WANDB_MODE")
    said = f"logger.mode={mode}" if mode is not None else f"WANDB_MODE={env}" if env else "by default"
    mode = wandb_mode(mode)
    check_wandb_can_start(mode, said)
    return _wandb_class()(
        project=project, entity=entity, tags=list(tags or []), save_dir=str(save_dir), offline=mode == "offline",
        mode=mode, name=Path(save_dir).name, id=stable_wandb_id(save_dir), resume="allow", group=group,
    )  # fmt: skip


class TensorBoardRunLogger(RunLogger, TensorBoardLogger):
    """TensorBoard event files, with the freeze table as text and the figures as images."""

    def log_run_facts(self, config: Mapping, report) -> None:
        super().log_run_facts(config, report)
        self.experiment.add_text("freeze", "```\n" + report.to_text() + "\n```")

    def log_figures(self, figures: Mapping) -> None:
        for name, figure in figures.items():
            self.experiment.add_figure(f"plots/{name}", figure, close=False)


def _wandb_class():
    from lightning.pytorch.loggers import WandbLogger

    class WandbRunLogger(RunLogger, WandbLogger):
        """Weights & Biases, with the freeze table as a table and the figures as images."""

        def log_run_facts(self, config: Mapping, report) -> None:
            import wandb

            super().log_run_facts(config, report)
            table = wandb.Table(columns=["group", "parameters", "trainable"])
            for row in report.rows:
                table.add_data(row.group, row.parameters, row.status)
            self.experiment.log({"freeze": table})
            self.experiment.summary["trainable_parameters"] = report.trainable

        def log_figures(self, figures: Mapping) -> None:
            import wandb

            for name, figure in figures.items():
                self.experiment.log({f"plots/{name}": wandb.Image(figure)})

        def log_final(self, metrics: Mapping, step: int) -> None:
            super().log_final(metrics, step)
            # the wandb run ends with the HandCLIP run: the next run of this process (a sweep's next point,
            # Hydra running points one after another) starts its own instead of logging into this one
            self.experiment.finish()

    return WandbRunLogger
