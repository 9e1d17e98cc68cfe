"""k-reciprocal re-ranking and verification: against references written here on small cases, and end to end
through `python -m handclip.evaluate` (what a user reads: the tables, metrics.json, roc.png)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from handclip.eval.reid import evaluate
from handclip.eval.reranking import k_reciprocal_distances
from handclip.eval.verification import threshold_at, verification_metrics


def reference_rerank(query, gallery, k1, k2, lam):
    """The paper's steps with Python sets, one pair at a time: slow, and written apart from the package's."""
    x = torch.nn.functional.normalize(torch.cat([query, gallery]).double(), dim=-1).numpy()
    n, q = len(x), len(query)
    d = np.array([[float(((a - b) ** 2).sum()) for b in x] for a in x])
    d = d / d.max(axis=1, keepdims=True)

    def nearest(p, k):
        return list(np.argsort(d[p], kind="stable")[: k + 1])

    def reciprocal(p, k):
        return {c for c in nearest(p, k) if p in nearest(c, k)}

    v = np.zeros((n, n))
    for p in range(n):
        r = reciprocal(p, k1)
        chosen = set(r)
        for c in r:
            half = reciprocal(c, int(round(k1 / 2)))
            if len(half & r) > 2 / 3 * len(half):
                chosen |= half
        for c in chosen:
            v[p, c] = np.exp(-d[p, c])
        v[p] /= v[p].sum()
    if k2 > 1:
        v = np.array([np.mean([v[c] for c in nearest(p, k2 - 1)], axis=0) for p in range(n)])
    out = np.zeros((q, n - q))
    for i in range(q):
        for j in range(q, n):
            jaccard = 1 - np.minimum(v[i], v[j]).sum() / np.maximum(v[i], v[j]).sum()
            out[i, j - q] = (1 - lam) * jaccard + lam * d[i, j]
    return out


def clustered(seed: int, people: int = 12, per_person: int = 4, spread: float = 0.8):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.arange(people).repeat_interleave(per_person)
    features = torch.randn(people, 8, generator=generator)[ids] + spread * torch.randn(len(ids), 8, generator=generator)
    query = torch.zeros(len(ids), dtype=torch.bool)
    query[::per_person] = True
    return features[query], ids[query], features[~query], ids[~query]


@pytest.mark.parametrize(("seed", "k1", "k2", "lam"), [(0, 20, 6, 0.3), (1, 5, 3, 0.3), (2, 7, 1, 0.5), (3, 3, 2, 0.0)])
def test_reranked_distances_are_the_reference_steps(seed, k1, k2, lam):
    query, _, gallery, _ = clustered(seed)
    ours = k_reciprocal_distances(query, gallery, k1, k2, lam).double().numpy()
    assert ours == pytest.approx(reference_rerank(query, gallery, k1, k2, lam), abs=1e-6)


def test_reranking_helps_on_clustered_identities_and_lambda_1_is_the_plain_ranking():
    gains = []
    for seed in range(5):
        query, query_ids, gallery, gallery_ids = clustered(seed, people=30, per_person=6)
        plain = evaluate(query, query_ids, gallery, gallery_ids)
        reranked = evaluate(query, query_ids, gallery, gallery_ids,
                            rank_by=-k_reciprocal_distances(query, gallery, 20, 6, 0.3))  # fmt: skip
        gains.append(reranked["mAP"] - plain["mAP"])
        only_original = evaluate(query, query_ids, gallery, gallery_ids,
                                 rank_by=-k_reciprocal_distances(query, gallery, 20, 6, 1.0))  # fmt: skip
        assert only_original["rank1"] == plain["rank1"] and only_original["mAP"] == pytest.approx(plain["mAP"])
    # several images per identity in the gallery, what re-ranking is for: it helps on average (measured: +1.9 mAP
    # points, in 4 of 5 draws), though not on every draw
    assert np.mean(gains) > 0.005 and sum(g > 0 for g in gains) >= 4, gains


def test_verification_figures_on_a_hand_made_case():
    # validation: 4 genuine pairs scored 0.9, 0.8, 0.7, 0.6; 100 impostors from 0.0 to 0.495 and one at 0.65
    val_scores = np.array([0.9, 0.8, 0.7, 0.6, *np.arange(100) * 0.005, 0.65])
    val_genuine = np.array([True] * 4 + [False] * 101)
    # FAR 1%: one impostor of 101 may be accepted -> accept above the second-highest impostor (0.495)
    assert threshold_at(val_scores, val_genuine, 0.01) == pytest.approx(0.495)
    assert threshold_at(val_scores, val_genuine, 0.001) == pytest.approx(0.65)  # none may be: above the highest
    # test: 3 genuine (0.95, 0.66, 0.3), 5 impostors (0.7, 0.5, 0.2, 0.1, 0.0)
    scores = np.array([0.95, 0.66, 0.3, 0.7, 0.5, 0.2, 0.1, 0.0])
    genuine = np.array([True, True, True, False, False, False, False, False])
    metrics, roc = verification_metrics([(scores, genuine)], (val_scores, val_genuine))
    # AUC: of 15 genuine-impostor pairs, the genuine scores higher in 5 + 4 + 3 = 12
    assert metrics["verify/test/auc"] == pytest.approx(12 / 15)
    # at FAR 0 (< 1%: no impostor accepted) only the 0.95 pair is accepted
    assert metrics["verify/test/tar@far=0.01"] == pytest.approx(1 / 3)
    # the validation threshold 0.495 accepts 0.95, 0.66 and the impostors 0.7 and 0.5: TAR 2/3, FAR 2/5
    assert metrics["verify/test/tar@val_threshold=0.01"] == pytest.approx(2 / 3)
    assert metrics["verify/test/far@val_threshold=0.01"] == pytest.approx(2 / 5)
    # above 0.65: 0.95 and 0.66 genuine, 0.7 impostor
    assert metrics["verify/test/tar@val_threshold=0.001"] == pytest.approx(2 / 3)
    assert metrics["verify/test/far@val_threshold=0.001"] == pytest.approx(1 / 5)
    # EER: the miss rate equals the false accept rate between thresholds 0.66 and 0.5 (1/3 against 1/5 ... 2/5)
    assert 0.2 <= metrics["verify/test/eer"] <= 0.4
    assert metrics["verify/calibration_slope"] > 0  # a higher score is more likely the same person
    assert 0 <= metrics["verify/test/brier"] <= 1 and roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    with pytest.raises(ValueError, match="validation pairs are all impostor"):
        verification_metrics([(scores, genuine)], (val_scores[4:], val_genuine[4:]))


@pytest.mark.slow
def test_evaluate_with_reranking_and_verification_reports_them_and_draws_the_roc(tmp_path, synthetic_hands):
    from tests.fake_runs import model_folder
    from tests.test_evaluate import evaluate as evaluate_command
    from tests.test_evaluate import ok

    folder = model_folder(tmp_path / "tiny-clip")
    out = tmp_path / "scored"
    result = ok(evaluate_command(
        folder, "data=hands11k", f"data.source.root={synthetic_hands}", "data.runs=2", "eval.text=false",
        "eval.ranked=0", "eval.rerank={k1: 6, k2: 3}", "eval.verify=true", "--out", out, f"paths.root={tmp_path}",
    ))  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for prefix in ("test_reranked", "test_all_reranked"):
        assert 0 <= metrics[f"{prefix}/rank1"] <= 1 and 0 <= metrics[f"{prefix}/mAP"] <= 1
    for name in ("auc", "eer", "tar@far=0.01", "far@val_threshold=0.01", "brier"):
        assert 0 <= metrics[f"verify/test/{name}"] <= 1, name
    printed = " ".join(result.stdout.split())
    assert "same-aspect gallery, k-reciprocal re-ranked" in printed and "verification: the headline test" in printed
    assert (out / "roc.png").stat().st_size > 1000


def test_bad_rerank_settings_name_the_key():
    from handclip.errors import ConfigError
    from handclip.eval.evaluator import EvalSettings

    base = {"baseline": True, "test": True, "flip_tta": None, "text": True, "batch_size": 8}
    with pytest.raises(ConfigError, match="eval.rerank.k3 is not a setting; settings are k1, k2, lambda_value"):
        EvalSettings(**base, rerank={"k3": 1})
    with pytest.raises(ConfigError, match="eval.rerank.k1=0 must be"):
        EvalSettings(**base, rerank={"k1": 0})
    with pytest.raises(ConfigError, match="eval.verify='yes' must be true or false"):
        EvalSettings(**base, verify="yes")
    assert EvalSettings(**base, rerank=True).rerank.k1 == 20  # eval.rerank=true: the published defaults
