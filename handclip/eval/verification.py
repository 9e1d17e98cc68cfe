"""Verification: is this pair of images the same person? Figures for forensic use (`eval.verify`).

Every query/gallery pair of the headline test runs is a trial: genuine when both images show the same identity,
impostor otherwise; its score is the cosine similarity of the two features. Reported (pooled over the runs):

- `verify/test/auc`, `verify/test/eer` (equal error rate), `verify/test/tar@far=0.01` and `...=0.001` (the best
  true accept rate whose false accept rate is at most that): what the scores can do, thresholds chosen on test;
- `verify/test/far@val_threshold=0.01` and `verify/test/tar@val_threshold=0.01` (and 0.001): what a threshold
  fixed beforehand gives. It is chosen on the validation pairs (validation queries against the training images of
  the same identities) for that false accept rate, and applied to the test pairs unchanged, as a lab would;
- `verify/calibration_slope` and `verify/calibration_intercept`: a logistic regression fitted on the validation
  pairs, turning a score into P(same identity) = 1 / (1 + exp(-(slope x score + intercept))) at the validation
  pairs' share of genuine pairs; `verify/test/brier` is the Brier score of those probabilities on the test pairs
  (0 is perfect; always answering the test pairs' genuine share scores `verify/test/brier_reference`).

ROC and calibration are scikit-learn's (`roc_curve`, `LogisticRegression`, `brier_score_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from handclip.eval.reid import similarity

FARS = (0.01, 0.001)
ROC_POINTS = 200  # kept for the figure (roc.png), spaced evenly in log FAR


def pair_scores(query: torch.Tensor, query_ids: torch.Tensor, gallery: torch.Tensor,
                gallery_ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(cosine score, genuine) of every query/gallery pair, flattened."""
    scores = similarity(query, gallery).numpy().ravel()
    genuine = (torch.as_tensor(query_ids)[:, None] == torch.as_tensor(gallery_ids)[None, :]).numpy().ravel()
    return scores.astype(np.float64), genuine


def _check(genuine: np.ndarray, where: str) -> None:
    if genuine.all() or not genuine.any():
        raise ValueError(f"verification needs genuine and impostor pairs; the {where} pairs are all "
                         f"{'genuine' if genuine.all() else 'impostor'}")  # fmt: skip


def threshold_at(scores: np.ndarray, genuine: np.ndarray, far: float) -> float:
    """The lowest score threshold (accept: score >= threshold) whose false accept rate is at most `far`."""
    impostors = np.sort(scores[~genuine])[::-1]
    allowed = int(np.floor(far * len(impostors)))  # impostors that may be accepted
    if allowed >= len(impostors):
        return float(impostors[-1])
    # accept strictly above the (allowed + 1)-th highest impostor score
    return float(np.nextafter(impostors[allowed], np.inf))


def verification_metrics(test: Sequence[tuple[np.ndarray, np.ndarray]],
                         validation: tuple[np.ndarray, np.ndarray]) -> tuple[dict[str, float], dict]:  # fmt: skip
    """(metrics, ROC points for the figure) of the test pairs (each run's (scores, genuine)), with the thresholds
    and the calibration fitted on the validation pairs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

    scores = np.concatenate([s for s, _ in test])
    genuine = np.concatenate([g for _, g in test])
    val_scores, val_genuine = validation
    _check(genuine, "test")
    _check(val_genuine, "validation")
    fpr, tpr, _ = roc_curve(genuine, scores, drop_intermediate=False)  # every threshold: TAR@FAR reads them all
    metrics = {"verify/test/auc": float(roc_auc_score(genuine, scores))}
    fnr = 1 - tpr
    crossing = int(np.argmax(fnr <= fpr))  # the first ROC point where the miss rate falls to the false accept rate
    if crossing == 0:
        metrics["verify/test/eer"] = float(fpr[0])
    else:  # linear interpolation between the two points around the crossing
        a, b = crossing - 1, crossing
        gap_a, gap_b = fnr[a] - fpr[a], fnr[b] - fpr[b]
        t = gap_a / (gap_a - gap_b) if gap_a != gap_b else 0.0
        metrics["verify/test/eer"] = float(fpr[a] + t * (fpr[b] - fpr[a]))
    for far in FARS:
        metrics[f"verify/test/tar@far={far:g}"] = float(tpr[fpr <= far].max(initial=0.0))
        threshold = threshold_at(val_scores, val_genuine, far)
        accepted = scores >= threshold
        metrics[f"verify/test/far@val_threshold={far:g}"] = float(accepted[~genuine].mean())
        metrics[f"verify/test/tar@val_threshold={far:g}"] = float(accepted[genuine].mean())
    model = LogisticRegression().fit(val_scores[:, None], val_genuine)
    metrics["verify/calibration_slope"] = float(model.coef_[0, 0])
    metrics["verify/calibration_intercept"] = float(model.intercept_[0])
    probability = model.predict_proba(scores[:, None])[:, 1]
    metrics["verify/test/brier"] = float(brier_score_loss(genuine, probability))
    metrics["verify/test/brier_reference"] = float(brier_score_loss(genuine, np.full(len(genuine), genuine.mean())))
    keep = np.unique(np.concatenate([[0], np.searchsorted(fpr, np.logspace(-5, 0, ROC_POINTS)).clip(0, len(fpr) - 1)]))
    return metrics, {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}
