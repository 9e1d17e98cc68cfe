"""Callbacks and the checkpoint writer that make a run safe to interrupt and exact to resume."""

from __future__ import annotations

import signal
import statistics
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from handclip.data.sampling import EpochSeededSampler, IdentityBalancedBatchSampler
from handclip.errors import HandClipError
from handclip.io import load_checkpoint_file, save_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file, synced, then renamed over the old one; loaded
    with `weights_only=True` so a checkpoint cannot run code."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        save_atomic(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path, map_location)


class StopRequested(KeyboardInterrupt):
    """A Ctrl-C or SIGTERM, acted on between two batches, where the run's state is consistent."""


class GracefulStop(L.Callback):
    """Ctrl-C and SIGTERM (SLURM pre-emption, `docker stop`, Kubernetes) stop a run between batches.

    The signal only sets a flag; the next training batch does not start, and a resumable
    `last.ckpt` is written: weights, optimiser, schedule and progress all after the same batch, so
    a resume is exact whenever the signal came (mid-step, just after the optimiser step, during
    validation). A second Ctrl-C stops at once. `signal_name` tells the run how it ended.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: at once
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: stopping after this batch (Ctrl-C again to stop at once)", flush=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.signal_name:
            raise StopRequested(self.signal_name)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        # Lightning's own SIGTERM handling stops at the same kind of point (after a whole batch, or
        # in validation after the epoch's last one), so its exception is saved like ours
        if isinstance(exception, (StopRequested, SIGTERMException)) and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)
            print(f"\n{self.signal_name}: saved {self.path}; resume with ckpt_path=last", flush=True)
        elif isinstance(exception, KeyboardInterrupt):
            print(f"\nstopped at once: {self.path} (if there) is from the end of the last epoch; resume with "
                  "ckpt_path=last", flush=True)  # fmt: skip


class FollowFreezeSchedule(L.Callback):
    """Applies an unfreeze schedule's policy at the start of every epoch (and of a resumed run),
    printing the freeze table and appending it to `freeze.txt` whenever it changes."""

    def __init__(self, schedule, heads, table_path: str | Path):
        self.schedule, self.heads, self.table_path = schedule, list(heads), Path(table_path)
        self.current: list | None = None
        self.unfroze_at: int | None = None  # the first epoch this process trained with more than the start
        self.observed: int | None = None  # the last epoch whose validation a schedule that acts on it heard

    def _follow(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from handclip.model.freeze import apply_freeze

        policy = self.schedule.policy_at(trainer.current_epoch)
        report = apply_freeze(pl_module.backbone, policy, always_trainable=self.heads)
        state = [(row.group, row.status) for row in report.rows]
        first, changed = self.current is None, state != self.current
        self.current = state
        if not changed or (first and trainer.current_epoch == 0):
            return  # nothing new trains, or the run printed the starting table already
        if self.unfroze_at is None:
            self.unfroze_at = trainer.current_epoch
        text = f"epoch {trainer.current_epoch}: " + report.to_text()
        print("\n" + text, flush=True)
        with open(self.table_path, "a", encoding="utf-8") as handle:  # appended: the file's history
            handle.write("\n" + text + "\n")
        for logger in trainer.loggers:
            logger.log_metrics({"freeze/trainable_parameters": report.trainable}, step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._follow(trainer, pl_module)  # a resumed run: on_train_epoch_start is skipped mid-epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._follow(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a schedule that acts on validation (OnPlateau) hears the selecting score, smoothed as it selects, after the
        # module recorded it and before the checkpoints of this epoch are written (they keep what it heard)
        from handclip.train.ema import WeightEMA

        observe = getattr(self.schedule, "observe", None)
        # the score that selects the checkpoint: the EMA's where there is one
        ema = next((c for c in trainer.callbacks if isinstance(c, WeightEMA)), None)
        selection = ema.selection if ema is not None else getattr(pl_module, "selection", None)
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if observe is None or trainer.sanity_checking or last or selection is None or not selection.history:
            return  # (after the last epoch no stage could begin)
        if self.observed == trainer.current_epoch:
            return  # one validation an epoch counts (config refuses more; a resumed epoch's may come again)
        self.observed = trainer.current_epoch
        score = statistics.fmean(selection.history[-selection.smooth :])
        if observe(trainer.current_epoch, score):
            which = f"{'ema/' if ema is not None else ''}{selection.metric}" + (
                f" (mean of {selection.smooth})" if selection.smooth > 1 else "")
            print(f"\n{which} has not risen for {self.schedule.patience} validation(s): more groups train from epoch "
                  f"{trainer.current_epoch + 1}", flush=True)  # fmt: skip

    def state_dict(self) -> dict:
        state = getattr(self.schedule, "state_dict", None)
        return {"schedule": state()} if state is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "schedule" in state_dict and hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(state_dict["schedule"])


class ExactResume(L.Callback):
    """A resumed run continues with the very batch the uninterrupted run would have trained next.

    Lightning resumes with the loader iterator it made while setting up, before it restored the
    epoch; loader workers start reading from that iterator at once, so with workers the resumed
    epoch would be trained in the order, and with the augmentation, of epoch 0. Here, once the
    checkpoint is restored and before a batch is read, the samplers are given the restored epoch
    and told to skip the batches already trained on (a mid-epoch checkpoint), and the iterator is
    made again: its workers drop what they had read ahead. Sample order and augmentation are
    functions of (seed, epoch, index), so the rest of the run is exactly the uninterrupted one, with
    any number of workers.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        if trainer.ckpt_path is None:  # a new run
            return
        loader = trainer.train_dataloader
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is None:
            return
        sampler = batch_sampler.sampler if isinstance(batch_sampler, IdentityBalancedBatchSampler) else loader.sampler
        if isinstance(sampler, EpochSeededSampler):
            sampler.set_epoch(trainer.current_epoch)
        done = loop.epoch_loop.batch_progress.current.completed
        # a checkpoint taken after the epoch's last batch (during its validation) starts a new
        # epoch: nothing of that one is skipped
        if 0 < done < len(batch_sampler):
            if isinstance(batch_sampler, IdentityBalancedBatchSampler):
                batch_sampler.skip = done
            elif isinstance(sampler, EpochSeededSampler):
                sampler.skip = done * batch_sampler.batch_size
        if loop._data_fetcher is not None:  # Lightning's own fetcher, made again as it does at an epoch's start
            iter(loop._data_fetcher)


class TestCurve(L.Callback):
    """After every validation, the test protocol's scores of the current weights, appended to `curve.json` with the
    validation scores just logged: material for studying checkpoint selection (`eval.curve`). The run never reads
    it: it selects on validation alone."""

    def __init__(self, evaluate, path: str | Path):
        self.evaluate, self.path = evaluate, Path(path)

    @staticmethod
    def check(path: str | Path) -> None:
        """Refuse to resume onto a damaged curve: its earlier epochs cannot be scored again."""
        from handclip.io import DamagedFileError, read_record

        if Path(path).is_file():
            try:
                read_record(path, list)
            except DamagedFileError as error:
                raise HandClipError(
                    f"{error}; it holds every earlier epoch's test scores (eval.curve): move it away to resume "
                    "without them, or start the run over with overwrite=true"
                ) from None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from handclip.io import read_record, write_json_atomic

        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        rows = read_record(self.path, list) if self.path.is_file() else []
        rows = [row for row in rows if row["epoch"] < trainer.current_epoch]  # a resumed run redoes later epochs
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val", "ema/val"))}
        scores = self.evaluate(pl_module.backbone, include_test=True, language=False, merged=False,
                               extras=False)["metrics"]  # fmt: skip
        tested = {k: v for k, v in scores.items() if k.startswith(("test/", "test_all/")) and not k.endswith("_std")}
        rows.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **logged, **tested})
        write_json_atomic(self.path, rows)
