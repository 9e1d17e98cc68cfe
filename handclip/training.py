"""Lightning glue: the fine-tuning module, the data module, atomic checkpoints.

Everything here wraps plain functions from the rest of the package (loss, freeze, metric,
datasets); nothing outside this module and `handclip.run` imports Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from handclip.captions import DEFAULT_TEMPLATES, Captioner
from handclip.checkpoints import load_checkpoint_file, save_atomic
from handclip.data.dataset import CaptionCollator, ManifestImages
from handclip.embeddings import image_embeddings, text_embeddings
from handclip.errors import ConfigError, HandClipError
from handclip.evaluation import images_needed, score_protocol
from handclip.losses import clamp_logit_scale, contrastive_loss
from handclip.sampling import EpochSeededSampler, IdentityBalancedBatchSampler, balanced_sampler_for
from handclip.transforms import eval_transform, train_transform


class NonFiniteLossError(HandClipError):
    """The loss became NaN or infinite; the message gives the step, lr and logit_scale."""


def no_decay(name: str, parameter: torch.Tensor) -> bool:
    """Parameters that must not be weight-decayed: 1-D (biases, norms), embeddings, logit_scale."""
    return parameter.ndim < 2 or "embedding" in name or "norm" in name or name.endswith("logit_scale")


def parameter_groups(
    model, weight_decay: float, lr: float, head_prefixes: Sequence[str] = (), head_lr_multiplier: float = 1.0
) -> list[dict]:
    """AdamW groups over trainable parameters: decay / no decay, new heads at a higher lr."""
    groups: dict[tuple[bool, bool], list] = {}
    names: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        key = (no_decay(name, parameter), any(name.startswith(p) for p in head_prefixes))
        groups.setdefault(key, []).append(parameter)
        names.setdefault(key, []).append(name)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if skip_decay else weight_decay,
            "lr": lr * (head_lr_multiplier if head else 1.0),
            "names": names[(skip_decay, head)],
        }
        for (skip_decay, head), params in sorted(groups.items())
    ]


def warmup_steps(warmup: float, total: int) -> int:
    """`warmup` as a share of the total optimiser steps (< 1) or a step count (>= 1)."""
    return int(round(warmup * total)) if warmup < 1 else int(warmup)


class ClipFineTuner(L.LightningModule):
    """Contrastive fine-tuning of a `CLIPModel`, validated by re-identification on val images."""

    def __init__(
        self, model, optim: Mapping[str, Any], loss: Mapping[str, Any], val_rows: Sequence[dict] = (),
        head_prefixes: Sequence[str] = (), signature: Mapping[str, Any] | None = None,
    ):  # fmt: skip
        super().__init__()
        # what a resumed run must share with the run that wrote the checkpoint
        self.signature = dict(signature or {})
        # from_pretrained returns a model in eval mode, and Lightning keeps the mode it finds
        self.model = model.train()
        self.optim = dict(optim)
        self.loss_cfg = dict(loss)
        self.val_rows = list(val_rows)
        self.val_images = images_needed(self.val_rows, include_test=False) if self.val_rows else []
        self.head_prefixes = tuple(head_prefixes)
        self._val_features: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []
        # training time carried across resumes (wall time of one process would restart at 0)
        self.seconds_before = 0.0
        self._fit_started = time.time()

    def on_fit_start(self) -> None:
        self._fit_started = time.time()

    def on_train_start(self) -> None:
        # resuming a checkpoint taken mid-epoch (Ctrl-C): Lightning re-iterates the loader from
        # the start of the epoch (and skips on_train_epoch_start), so skip the batches already
        # trained on. The order is a function of (seed, epoch): the rest of the epoch is exactly
        # what it would have been. Runs after the checkpoint is restored, before the loader is read.
        loop = self.trainer.fit_loop
        done = loop.epoch_loop.batch_progress.current.completed if loop.restarting else 0
        datamodule = getattr(self.trainer, "datamodule", None)
        if done and isinstance(datamodule, HandDataModule):
            datamodule.skip_batches(done)

    def train_seconds(self) -> float:
        """Seconds spent in fit, over this process and the runs it resumed."""
        return self.seconds_before + time.time() - self._fit_started

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["handclip"] = {"signature": self.signature, "train_seconds": self.train_seconds()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.seconds_before = float((checkpoint.get("handclip") or {}).get("train_seconds", 0.0))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_embeddings(self.model, pixel_values)

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        image = image_embeddings(self.model, batch["pixel_values"])
        text = text_embeddings(self.model, batch["input_ids"], batch["attention_mask"])
        identities = batch["identities"] if self.loss_cfg.get("multi_positive", True) else None
        if self.trainer.world_size > 1:
            # negatives from the global batch: gather features (with gradients) from every rank
            image = self.all_gather(image, sync_grads=True).flatten(0, 1)
            text = self.all_gather(text, sync_grads=True).flatten(0, 1)
            if identities is not None:
                identities = self.all_gather(identities).flatten(0, 1)
        loss = contrastive_loss(image, text, self.model.logit_scale, identities)
        if not torch.isfinite(loss):
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                f"last lr {lr:.3g}, logit_scale {self.model.logit_scale.item():.3f}. The last good "
                "checkpoint is kept: lower optim.lr or raise trainer.gradient_clip_val and resume"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["pixel_values"]))
        self.log("train/temperature", 1.0 / self.model.logit_scale.exp(), batch_size=len(batch["pixel_values"]))
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        clamp_logit_scale(self.model.logit_scale)  # after every step, as CLIP does

    def on_validation_epoch_start(self) -> None:
        self._val_features, self._val_index = [], []

    def validation_step(self, batch: dict, batch_index: int) -> None:
        self._val_features.append(image_embeddings(self.model, batch["pixel_values"]).float())
        self._val_index.append(batch["index"])

    def on_validation_epoch_end(self) -> None:
        if not self._val_features:
            return
        features, index = torch.cat(self._val_features), torch.cat(self._val_index)
        if self.trainer.world_size > 1:
            # each process saw a shard (padded with repeats): gather and put back in order
            features = self.all_gather(features).flatten(0, 1)
            index = self.all_gather(index).flatten(0, 1)
        ordered = torch.zeros(len(self.val_images), features.shape[1], device=features.device)
        ordered[index] = features
        metrics = score_protocol(ordered.cpu(), self.val_images, self.val_rows, include_test=False)["metrics"]
        for name in ("val/rank1", "val/rank5", "val/mAP"):
            self.log(name, metrics[name], prog_bar=name == "val/rank1", sync_dist=False, rank_zero_only=False)

    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        groups = parameter_groups(
            self.model, float(self.optim["weight_decay"]), float(self.optim["lr"]),
            self.head_prefixes, float(self.optim.get("head_lr_multiplier", 1.0)),
        )  # fmt: skip
        for group in groups:
            group.pop("names")
        optimizer = torch.optim.AdamW(
            groups, lr=float(self.optim["lr"]), betas=tuple(self.optim.get("betas", (0.9, 0.98))),
            eps=float(self.optim.get("eps", 1e-6)),
        )  # fmt: skip
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, warmup_steps(float(self.optim.get("warmup", 0.1)), total), max(total, 1)
        )
        # stepped once per optimiser step, with T_max counted in optimiser steps
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class HandDataModule(L.LightningDataModule):
    """Training pairs (image, caption, identity) and the validation images, from manifest rows."""

    def __init__(
        self, rows: Sequence[dict], root: str | Path, backbone, data: Mapping[str, Any], cache_size: int, seed: int
    ):
        super().__init__()
        self.rows = list(rows)
        self.root = root
        self.data = dict(data)
        self.seed = seed
        size, resize = backbone.image_size, backbone.resize_size
        mean, std = backbone.image_mean, backbone.image_std
        self.collate = CaptionCollator(backbone.tokenizer)
        self.captioner = Captioner(self.data.get("captions") or DEFAULT_TEMPLATES)
        train_rows = [r for r in self.rows if r["split"] == "train"]
        self.captioner.check_rows(train_rows)
        self.train_set = ManifestImages(
            train_rows, root, train_transform(size, resize, mean, std, self.data.get("augment")),
            cache_size, self.captioner, seed=seed,
        )  # fmt: skip
        val_rows = [r for r in self.rows if r["split"] in ("train", "val")]
        self.val_rows = val_rows
        self.val_set = ManifestImages(
            images_needed(val_rows, include_test=False), root, eval_transform(size, resize, mean, std), cache_size
        )
        if self.data.get("sampler", "random") == "identity_balanced":
            self.balanced_sampler()  # fails now, with the key, if it cannot be filled
        batch = int(self.data["batch_size"])
        if len(self.train_set) < batch:
            raise ConfigError(
                f"data.batch_size={batch} is larger than the {len(self.train_set)} training images: "
                "lower it so at least one full batch exists"
            )

    def _workers(self) -> dict:
        workers = int(self.data.get("num_workers", 0))
        return {"num_workers": workers, "persistent_workers": workers > 0}

    def skip_batches(self, batches: int) -> None:
        """Let the next iteration of the training loader start after `batches` batches."""
        loader = self.trainer.train_dataloader if self.trainer else None
        batch_sampler = getattr(loader, "batch_sampler", None)
        if isinstance(batch_sampler, IdentityBalancedBatchSampler):
            batch_sampler.skip = batches
        elif batch_sampler is not None and isinstance(batch_sampler.sampler, EpochSeededSampler):
            batch_sampler.sampler.skip = batches * batch_sampler.batch_size

    def train_dataloader(self) -> DataLoader:
        common = {"collate_fn": self.collate, "pin_memory": torch.cuda.is_available(), **self._workers()}
        if self.data.get("sampler", "random") == "identity_balanced":
            return DataLoader(self.train_set, batch_sampler=self.balanced_sampler(), **common)
        return DataLoader(
            self.train_set, batch_size=int(self.data["batch_size"]),
            sampler=EpochSeededSampler(len(self.train_set), self.seed), drop_last=True, **common,
        )  # fmt: skip

    def balanced_sampler(self) -> IdentityBalancedBatchSampler:
        return balanced_sampler_for(self.train_set.rows, self.data, self.seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=int(self.data.get("eval_batch_size", 64)), shuffle=False, **self._workers()
        )


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
