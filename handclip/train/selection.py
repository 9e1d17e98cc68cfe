"""Which validation score picks the checkpoint a run keeps (`eval.select`, `eval.smooth`).

After every validation the module logs `val/select`: the chosen validation metric (`val/rank1`,
`val/mAP`, ..., or `val/id_accuracy`: the share of the held-out images of the training identities that the
objective's identity head names right, CLIP-HandID's choice) averaged over the last `smooth` validations (a
trailing mean, so a checkpoint is chosen by what it and the epochs just before it scored, not by one lucky
validation); the best
checkpoint is the one with the highest `val/select` (`ema/val/select` with an EMA). The history
travels in checkpoints, so a resumed run smooths over the same values.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from handclip.checks import integer

MONITOR = "val/select"


class Selection:
    """The selecting score: `metric`'s trailing mean over the last `smooth` validations."""

    def __init__(self, metric: str = "val/rank1", smooth: int = 1, history: Sequence[float] = ()):
        from handclip.eval.evaluator import check_validation_metric

        self.metric = check_validation_metric("eval.select", metric, "a checkpoint is never chosen on test",
                                              identity_accuracy=True)
        self.smooth = integer("eval.smooth", smooth, 1, 1000)
        self.history = list(history)

    def update(self, metrics: dict) -> float:
        """Record this validation's metric; the selecting score now."""
        self.history.append(float(metrics[self.metric]))
        return statistics.fmean(self.history[-self.smooth :])
