"""The Lightning module: a backbone trained by an objective, validated by re-identification.

It wraps plain parts of the package: the backbone (`handclip.model`), the objective
(`handclip.losses`), the optimisation (`handclip.train.optim`) and the protocol's scoring
(`handclip.eval.protocol`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch

from handclip.data.sampling import identity_index
from handclip.errors import HandClipError, NonFiniteError
from handclip.eval.feature import ImageEncoder
from handclip.eval.protocol import ID_ACCURACY, images_needed, score_protocol
from handclip.losses import LossInputs, Objective, clamp_logit_scale
from handclip.model.backbone import Backbone
from handclip.model.forward import Forward
from handclip.model.freeze import FreezePolicy
from handclip.train.accumulate import contrastive_step
from handclip.train.compute import Compute
from handclip.train.optim import Optimization, ParameterInfo
from handclip.train.selection import MONITOR, Selection


class NonFiniteLossError(NonFiniteError):
    """The loss or the weights became NaN or infinite; the message gives the step, the lr and logit_scale (or the
    parameter)."""


class FineTuner(L.LightningModule):
    """Fine-tuning of a backbone by an objective; `val/rank1` on the validation images picks the best epoch."""

    def __init__(
        self, backbone: Backbone, objective: Objective, optimization: Optimization, val_rows: Sequence[dict] = (),
        heads: Sequence[torch.nn.Parameter] = (), signature: Mapping[str, Any] | None = None,
        freeze: FreezePolicy | None = None, encode: Callable | None = None, compute: Compute | None = None,
        selection: Selection | None = None,
    ):  # fmt: skip
        super().__init__()
        # what a resumed run must share with the run that wrote the checkpoint
        self.signature = dict(signature or {})
        # from_pretrained returns a model in eval mode, and Lightning keeps the mode it finds
        self.backbone = backbone.train()
        self.objective = objective
        self.optimization = optimization
        self.val_rows = list(val_rows)
        self.val_images = images_needed(self.val_rows, include_test=False) if self.val_rows else []
        self.heads = list(heads)
        self._heads = {id(p) for p in heads}
        self.freeze = freeze
        self.encode = encode or ImageEncoder()  # the validation feature (eval.feature); default: projected
        self.compute = compute or Compute()
        self.selection = selection or Selection()  # the validation score that picks the best checkpoint
        self._val_features: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []
        self._val_predicted: list[torch.Tensor] = []
        # the identity head's answers on the held-out images of the training identities (`val/id_accuracy`): each
        # validation image's class (its identity's place among the training identities, as the heads number them),
        # -1 for the training images validation ranks against
        self.identity_head = objective.identity_head()
        order = identity_index([r for r in self.val_rows if r["split"] == "train"])
        self._val_classes = torch.tensor([order.get(r["identity"], -1) if r["split"] == "val" else -1
                                          for r in self.val_images], dtype=torch.long)  # fmt: skip
        # every batch's way through the model; handclip.train.caches sets its stored prefix and text cache
        self.forward_path = Forward(self.backbone)
        # training time carried across resumes (wall time of one process would restart at 0)
        self.seconds_before = 0.0
        self._fit_started = time.time()

    def on_fit_start(self) -> None:
        self._fit_started = time.time()
        if self.compute.accumulate > 1 and self.trainer.world_size > 1:
            raise HandClipError(
                f"compute.accumulate={self.compute.accumulate} runs on one device only (this run has "
                f"{self.trainer.world_size} processes): use compute.accumulate=1 with several devices"
            )

    def train_seconds(self) -> float:
        """Seconds spent in fit, over this process and the runs it resumed."""
        return self.seconds_before + time.time() - self._fit_started

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["handclip"] = {
            "signature": self.signature, "train_seconds": self.train_seconds(), "max_epochs": self.trainer.max_epochs,
            "selection": list(self.selection.history),
        }  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("handclip") or {}
        self.seconds_before = float(saved.get("train_seconds", 0.0))
        self.selection.history = list(saved.get("selection", []))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(pixel_values)

    def _gather(self, tensor: torch.Tensor | None, grads: bool = True) -> torch.Tensor | None:
        # negatives from the global batch: features (with gradients) from every process
        if tensor is None or self.trainer.world_size <= 1:
            return tensor
        return self.all_gather(tensor, sync_grads=grads).flatten(0, 1)

    def image_features(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(pre-projection feature or None, projected embedding) of a batch, what the objective reads."""
        return self.forward_path.image(batch, self.objective.needs_pre_projection)

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        if self.compute.accumulate > 1:
            return self._accumulated_step(batch)
        features = self.forward_path.features(batch, self.objective.needs_text, self.objective.needs_pre_projection)
        inputs = LossInputs(
            image=self._gather(features["image"]), text=self._gather(features["text"]),
            logit_scale=self.backbone.logit_scale, logit_bias=self.backbone.logit_bias,
            identities=self._gather(batch["identities"], grads=False),
            image_pre_projection=self._gather(features["pre_projection"]),
            backbone=self.backbone if self.objective.needs_backbone else None,
            labels=self._gather(batch.get("labels"), grads=False), index=self._gather(batch.get("index"), grads=False),
        )  # fmt: skip
        loss, parts = self.objective(inputs)
        self._check_and_log(loss, parts, len(batch["identities"]))
        return loss

    def _check_and_log(self, loss: torch.Tensor, parts: Mapping[str, torch.Tensor], size: int) -> None:
        if not torch.isfinite(loss):
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                f"last lr {lr:.3g}, logit_scale {self.backbone.logit_scale.item():.3f}. The last good "
                "checkpoint is kept: lower optim.lr or raise trainer.gradient_clip_val and resume"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if len(parts) > 1:
            for name, value in parts.items():
                self.log(f"train/loss_{name}", value, batch_size=size)
        self.log("train/temperature", 1.0 / self.backbone.logit_scale.exp(), batch_size=size)

    def _accumulated_step(self, batch: dict) -> torch.Tensor:
        # contrastive accumulation (handclip.train.accumulate): micro-batches, every negative kept
        self.zero_grad(set_to_none=True)  # Lightning's zero_grad is held back: the gradient is built here
        loss, parts, surrogate = contrastive_step(
            self.forward_path, self.objective, batch, self.compute.accumulate, self.device
        )
        self._check_and_log(loss, parts, len(batch["identities"]))
        return surrogate

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        # with contrastive accumulation the gradient is partly built inside training_step, which runs first
        if self.compute.accumulate == 1:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        clamp_logit_scale(self.backbone.logit_scale, self.backbone.logit_scale_max)  # after every step, as CLIP does
        self._check_weights()

    def _check_weights(self) -> None:
        """Stop at the step that made a weight non-finite (a finite loss can hide it until the next step), before
        any validation or checkpoint sees the damaged model: the last good checkpoint stays the last one."""
        trained = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        if not trained or bool(torch.stack([p.detach().isfinite().all() for _, p in trained]).all()):
            return
        name = next(name for name, p in trained if not p.detach().isfinite().all())
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        raise NonFiniteLossError(
            f"weights became non-finite at step {self.global_step} (epoch {self.current_epoch}): {name}; last lr "
            f"{lr:.3g}. The last good checkpoint is kept: lower optim.lr, raise trainer.gradient_clip_val or lower a "
            "loss weight, and resume"
        )

    def on_validation_epoch_start(self) -> None:
        self._val_features, self._val_index, self._val_predicted = [], [], []

    def validation_outputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(evaluation feature, the identity head's answer for each image or None without a head) of a validation
        batch (pixels or stored hidden states), from one forward pass."""
        batch = {k: v.to(self.device) for k, v in batch.items() if k != "index"}
        if self.identity_head is None:
            return self.encode(self.forward_path, batch), None
        pre, projected = self.forward_path.image(batch, pre_projection=True)
        answers = self.identity_head.identity_probabilities({"projected": projected, "pre_projection": pre})
        return self.encode.from_outputs(pre, projected), answers.argmax(-1)

    def validation_feature(self, batch: dict) -> torch.Tensor:
        """The evaluation feature of a validation batch (pixels or stored hidden states)."""
        return self.validation_outputs(batch)[0]

    def validation_step(self, batch: dict, batch_index: int) -> None:
        feature, predicted = self.validation_outputs(batch)
        self._val_features.append(feature.float())
        self._val_index.append(batch["index"])
        if predicted is not None:
            self._val_predicted.append(predicted)

    def on_validation_epoch_end(self) -> None:
        if not self._val_features:
            return
        try:
            metrics = self.validation_metrics(self._val_features, self._val_index, self._val_predicted)
        except NonFiniteError as error:
            where = f"validation after epoch {self.current_epoch} (step {self.global_step})"
            raise NonFiniteError(f"{where}: {error}") from None
        for name in ("val/rank1", "val/rank5", "val/mAP", ID_ACCURACY):
            if name in metrics:
                self.log(name, metrics[name], prog_bar=name == "val/rank1", sync_dist=False, rank_zero_only=False)
        if not self.trainer.sanity_checking:
            self.log(MONITOR, self.selection.update(metrics), sync_dist=False, rank_zero_only=False)

    def validation_metrics(self, features: list[torch.Tensor], index: list[torch.Tensor],
                           predicted: list[torch.Tensor] = ()) -> dict[str, float]:  # fmt: skip
        """The validation protocol's metrics for the features of this process's validation batches; with the identity
        head's answers (`predicted`), `val/id_accuracy` too."""
        features, index = torch.cat(features), torch.cat(index)
        answers = torch.cat(list(predicted)) if len(predicted) else None
        if self.trainer.world_size > 1:
            # each process saw a shard (padded with repeats): gather and put back in order
            features = self.all_gather(features).flatten(0, 1)
            answers = self.all_gather(answers).flatten(0, 1) if answers is not None else None
            index = self.all_gather(index).flatten(0, 1)
        ordered = torch.zeros(len(self.val_images), features.shape[1], device=features.device)
        ordered[index] = features
        metrics = score_protocol(ordered.cpu(), self.val_images, self.val_rows, include_test=False,
                                 texts=self.forward_path.captions)["metrics"]  # fmt: skip
        held_out = self._val_classes >= 0
        if answers is not None and held_out.any():
            named = torch.full_like(self._val_classes, -1)
            named[index.cpu()] = answers.cpu()
            metrics[ID_ACCURACY] = (named[held_out] == self._val_classes[held_out]).float().mean().item()
        return metrics

    def optimised_parameters(self, steps_per_epoch: int = 0, epochs: int = 0) -> list[ParameterInfo]:
        """Every parameter of the backbone and the objective, trainable now or later."""
        group_of = self.backbone.group_of()
        names = {id(p): n for g in self.backbone.all_groups() for n, p in g.parameters.items()}
        infos = []
        embeddings = self.objective.embedding_names()  # learned words and texts: embeddings, never decayed
        for module_name, module in (("backbone", self.backbone), ("objective", self.objective)):
            for name, parameter in module.named_parameters():
                group = group_of.get(id(parameter))
                # no decay: biases and norms (1-D), embeddings, logit_scale (in no group)
                decay = parameter.ndim >= 2 and group is not None and group.kind != "embeddings"
                if module_name == "objective":
                    decay = parameter.ndim >= 2 and name not in embeddings
                head = module_name == "objective" or id(parameter) in self._heads
                place = {"tower": group.tower, "depth": group.depth} if group is not None else {}
                if self.freeze is not None and group is not None and id(parameter) not in self._heads:
                    first = self.freeze.first_epoch(group, names[id(parameter)], epochs)
                    place["starts_at"] = (first or 0) * steps_per_epoch
                infos.append(ParameterInfo(f"{module_name}.{name}", parameter, decay, head, **place))
        return infos

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        warmup = self.freeze.warmup_steps if self.freeze is not None else 0
        steps = total // epochs
        start_step = None if self.freeze is None else functools.partial(self.freeze.start_step, steps_per_epoch=steps)
        optimizer, scheduler = self.optimization.build(self.optimised_parameters(steps, epochs), total, warmup,
                                                       start_step)  # fmt: skip
        if scheduler is None:
            return optimizer
        # stepped once per optimiser step, with its length counted in optimiser steps
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
