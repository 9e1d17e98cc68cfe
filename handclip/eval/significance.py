"""Whether one model beats another on validation by more than the noise of its few queries.

A validation set of 32 queries moves by several points between two checkpoints that are equally
good on people never seen: a gain measured there can be luck. `paired_gain` compares two models
scored on the same queries (per-query AP or Rank-k hits, `score_protocol`'s `per_query`) with a
paired bootstrap over the queries (scipy.stats.bootstrap) and returns the mean gain with its
interval; a gain is *beyond noise* when the whole interval lies above zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 9999
SEED = 0  # the same numbers give the same interval, run after run


@dataclass(frozen=True)
class Gain:
    """The mean per-query gain of one model over another, with its bootstrap interval."""

    mean: float
    low: float
    high: float
    queries: int
    confidence: float

    @property
    def beyond_noise(self) -> bool:
        return self.low > 0


def paired_gain(tuned: Sequence[float], initial: Sequence[float], confidence: float = 0.95) -> Gain:
    """The gain of `tuned` over `initial`, query by query, with a percentile bootstrap interval over the queries."""
    from scipy.stats import bootstrap

    tuned, initial = np.asarray(tuned, dtype=float), np.asarray(initial, dtype=float)
    if tuned.shape != initial.shape or tuned.ndim != 1 or len(tuned) == 0:
        raise ValueError(f"paired scores need the same queries: got {tuned.shape} and {initial.shape}")
    difference = tuned - initial
    mean = float(difference.mean())
    if len(difference) < 2 or np.ptp(difference) == 0:  # no spread to resample: the interval is the value
        return Gain(mean, mean, mean, len(difference), confidence)
    interval = bootstrap((difference,), np.mean, confidence_level=confidence, n_resamples=RESAMPLES,
                         method="percentile", random_state=SEED).confidence_interval  # fmt: skip
    return Gain(mean, float(interval.low), float(interval.high), len(difference), confidence)


def validation_gain(tuned: dict, initial: dict, metric: str, confidence: float = 0.95) -> Gain | None:
    """The paired gain on `metric` (val/mAP, val/rank1, ...) of two evaluation results that kept their validation
    queries' scores (None when either did not: an older baseline.json, or a manifest without validation)."""
    name = metric.removeprefix("val/")
    scores = [(result.get("per_query") or {}).get("val", {}).get(name) for result in (tuned, initial)]
    if any(s is None for s in scores) or len(scores[0]) != len(scores[1]):
        return None
    return paired_gain(scores[0], scores[1], confidence)
