"""An exponential moving average (EMA) of the trained weights, kept, validated and saved beside them.

`ema.decay=0.998` turns it on. After every optimiser step each backbone parameter that trains (or
will train under an unfreeze schedule) moves its average by `average += (1 - decay) * (weight -
average)` (`torch.optim.swa_utils.get_ema_multi_avg_fn`); frozen parameters get no copy. Every
validation scores the raw weights (`val/rank1`) and the average (`ema/val/rank1`); the average's
score picks `best.ckpt`. Checkpoints hold the average under `checkpoint["ema"]`, so a resume
(mid-epoch too) continues it exactly and `handclip.export` can write either set of weights.

Lightning's own `WeightAveraging` callback was weighed: it deep-copies the whole module (frozen
towers included) and swaps the average in for validation, so only one of the two is ever scored.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import lightning as L
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from handclip.errors import HandClipError
from handclip.eval.protocol import ID_ACCURACY
from handclip.model.averaging import PREFIX
from handclip.model.caching import trained_names
from handclip.train.config import check_decay
from handclip.train.selection import MONITOR, Selection


def check_resume(path: str, checkpoint: Mapping, decay: float | None) -> None:
    """Refuse a resume that would lose the average, or start it half-way, or change its decay."""
    saved = (checkpoint.get("ema") or {}).get("decay")
    if saved == decay:
        return
    if saved is None:
        raise HandClipError(
            f"cannot resume {path} with ema.decay={decay}: it was trained without an EMA (ema.decay=null). "
            "Resume with ema.decay=null, or start a new run from its weights with init_from=..."
        )
    raise HandClipError(
        f"cannot resume {path} with ema.decay={decay}: it kept its EMA with ema.decay={saved}; resume with that"
    )


@contextmanager
def weights_swapped(backbone: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """`weights` (a subset of the backbone's parameters, by name) in place of its own, restored on exit."""
    parameters = dict(backbone.named_parameters())
    kept = {}
    with torch.no_grad():
        for name, tensor in weights.items():
            kept[name] = parameters[name].detach().clone()
            parameters[name].copy_(tensor)
        try:
            yield
        finally:
            for name, tensor in kept.items():
                parameters[name].copy_(tensor)


class WeightEMA(L.Callback):
    """Keeps the EMA of the trainable backbone parameters; validates it; saves it in checkpoints."""

    def __init__(self, decay: float, schedule=None, selection: Selection | None = None):
        self.decay = check_decay(decay)
        self.selection = selection or Selection()  # the EMA's own selecting score (its history)
        self.schedule = schedule  # the freeze policy (a schedule): what trains later needs an average too
        self._update = get_ema_multi_avg_fn(self.decay)
        self.names: list[str] = []
        self.average: list[torch.Tensor] = []
        self.updates = 0
        self._restored: Mapping | None = None
        self._last_step = -1

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._restored = checkpoint.get("ema")  # checked by check_resume; put on the device at fit start

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        backbone = pl_module.backbone
        parameters = dict(backbone.named_parameters())
        self.names = trained_names(backbone, self.schedule, max(int(trainer.max_epochs or 1), 1))
        if self._restored is not None:
            state = self._restored["state"]
            missing = [n for n in self.names if PREFIX + n not in state]
            if missing:
                raise HandClipError(f"the checkpoint's EMA weights lack {missing[0]}: it was written by another model")
            self.average = [state[PREFIX + n].to(parameters[n].device, parameters[n].dtype) for n in self.names]
            self.updates = int(self._restored["updates"])
            self.selection.history = list(self._restored.get("selection", []))
            self._restored = None
        else:
            self.average = [parameters[n].detach().clone() for n in self.names]
            self.updates = 0
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # gradient accumulation: no optimiser step yet
            return
        self._last_step = trainer.global_step
        parameters = dict(pl_module.backbone.named_parameters())
        with torch.no_grad():
            self._update(self.average, [parameters[n].detach() for n in self.names], self.updates)
        self.updates += 1

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights by backbone parameter name."""
        return dict(zip(self.names, self.average, strict=True))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.names:
            return
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        features, index, predicted = [], [], []
        with weights_swapped(pl_module.backbone, self.weights()):
            for loader in loaders:
                for batch in loader:
                    with trainer.precision_plugin.forward_context():  # what validation_step scores
                        feature, answers = pl_module.validation_outputs(batch)
                    features.append(feature.float())
                    predicted += [answers] if answers is not None else []
                    index.append(batch["index"].to(pl_module.device))
        if not features:
            return
        metrics = pl_module.validation_metrics(features, index, predicted)
        for name in ("val/rank1", "val/rank5", "val/mAP", ID_ACCURACY):
            if name in metrics:
                pl_module.log(f"ema/{name}", metrics[name], prog_bar=name == "val/rank1", rank_zero_only=False)
        pl_module.log(f"ema/{MONITOR}", self.selection.update(metrics), rank_zero_only=False)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["ema"] = {
            "decay": self.decay,
            "updates": self.updates,
            "selection": list(self.selection.history),
            "state": {PREFIX + n: t.detach().cpu().clone() for n, t in zip(self.names, self.average, strict=True)},
        }


class TrainedWeights:
    """Which weights a run selects, tests and exports: the raw trained weights, or their EMA when `ema.decay` is
    set. The three choices live here: the callback that keeps the average, the validation score that picks
    `best.ckpt`, and the weights the final evaluation loads."""

    def __init__(self, decay: float | None, freeze=None, selection: tuple[str, int] = ("val/rank1", 1)):
        self.ema = WeightEMA(decay, freeze, Selection(*selection)) if decay is not None else None
        self.raw_result: dict | None = None  # with an EMA: the raw weights' scores of the same checkpoint

    @property
    def callbacks(self) -> list:
        return [self.ema] if self.ema is not None else []

    @property
    def monitor(self) -> str:
        """The validation score that picks the best checkpoint."""
        return f"ema/{MONITOR}" if self.ema is not None else MONITOR

    def restore_best(self, module, backbone, best_path: str, evaluate) -> str:
        """Load the best checkpoint (if one was saved) into `module` and put the weights to test into `backbone`;
        return which they are, `ema` or `raw`. With an EMA, `evaluate` scores the raw weights first."""
        from handclip.io import load_checkpoint_file
        from handclip.model.averaging import ema_weights

        averaged = None
        if best_path:
            saved = load_checkpoint_file(best_path)
            module.load_state_dict(saved["state_dict"])
            averaged = ema_weights(saved) if self.ema is not None else None
            del saved
        elif self.ema is not None:
            averaged = self.ema.weights()
        if averaged is None:
            return "raw"
        self.raw_result = evaluate(backbone)
        backbone.load_state_dict({**backbone.state_dict(), **averaged})
        return "ema"
