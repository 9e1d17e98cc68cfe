"""Callbacks and the checkpoint writer that make a run safe to interrupt and exact to resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO

from handclip.data.sampling import EpochSeededSampler, IdentityBalancedBatchSampler
from handclip.io import load_checkpoint_file, save_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file, synced, then renamed over the old one; loaded
    with `weights_only=True` so a checkpoint cannot run code."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        save_atomic(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path, map_location)


class SaveOnInterrupt(L.Callback):
    """Ctrl-C: write a resumable `last.ckpt` before Lightning shuts down."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)
            print(f"\ninterrupted: saved {self.path}; resume with ckpt_path=last", flush=True)


class ExactResume(L.Callback):
    """A run resumed from a mid-epoch checkpoint continues with the very next batch.

    Lightning re-iterates the loader from the start of the epoch (and skips on_train_epoch_start),
    so the samplers are told to skip the batches already trained on. Their order is a function of
    (seed, epoch), so the rest of the epoch is exactly what it would have been. Runs after the
    checkpoint is restored, before the loader is read.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        done = loop.epoch_loop.batch_progress.current.completed if loop.restarting else 0
        batch_sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if not done or batch_sampler is None:
            return
        if isinstance(batch_sampler, IdentityBalancedBatchSampler):
            batch_sampler.skip = done
        elif isinstance(batch_sampler.sampler, EpochSeededSampler):
            batch_sampler.sampler.skip = done * batch_sampler.batch_size
