"""The weight anchor (L2-SP): its value is the depth-weighted squared distance from the starting weights, its
gradient pulls back to them, and a run with loss=anchored keeps them on disk (where a resume reads them)."""

from __future__ import annotations

import json

import pytest
import torch

from handclip.losses import LossInputs, WeightAnchor


def test_the_anchor_is_the_depth_weighted_squared_distance_from_the_start(tiny_model):
    start = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    term = WeightAnchor(weight=0.5, depth_scale=2.0)
    term.anchor_to(tiny_model, start)
    inputs = LossInputs(image=torch.zeros(1, 16), text=None, logit_scale=tiny_model.logit_scale)
    assert term(inputs).item() == 0.0
    top = tiny_model.layer_groups("vision")[-1]  # the projection: depth 0
    embeddings = tiny_model.layer_groups("vision")[0]  # the embeddings: depth = blocks + 1 = 4
    assert (top.depth, embeddings.depth) == (0, 4)
    with torch.no_grad():
        next(iter(top.parameters.values())).add_(0.1)  # moved by 0.1 everywhere
        moved = next(iter(embeddings.parameters.values()))
        moved.add_(0.1)
    top_count = next(iter(top.parameters.values())).numel()
    expected = top_count * 0.01 + 2.0**4 * moved.numel() * 0.01
    assert term(inputs).item() == pytest.approx(expected, rel=1e-4)
    term(inputs).backward()  # the gradient points away from the start: a step against it moves back
    grad = next(iter(top.parameters.values())).grad
    assert torch.allclose(grad, torch.full_like(grad, 2 * 0.1), atol=1e-5)
    # a parameter that does not train now is not counted
    moved.requires_grad_(False)
    assert term(inputs).item() == pytest.approx(top_count * 0.01, rel=1e-4)


def test_an_anchor_never_anchored_says_so():
    term = WeightAnchor()
    with pytest.raises(RuntimeError, match="never anchored"):
        term(LossInputs(image=torch.zeros(1, 4), text=None, logit_scale=torch.ones(())))


@pytest.mark.slow
def test_a_run_with_the_anchor_logs_it_and_keeps_the_start_on_disk(tmp_path):
    from tests.test_train import train

    train(tmp_path, "loss=anchored", "loss.terms.anchor.weight=1.0", "eval.wise_ft=null", "run_name=a")
    run = tmp_path / "runs" / "a"
    assert (run / "initial_weights.safetensors").is_file()  # kept for the anchor though WiSE-FT is off
    log = (run / "logs" / "metrics.csv").read_text()
    assert "train/loss_anchor" in log.splitlines()[0]
    values = [float(v) for v in _column(log, "train/loss_anchor")]
    assert values and values[-1] > 0  # the weights moved and the anchor measured it
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["test/rank1"] <= 1


def _column(text: str, name: str) -> list[str]:
    import csv
    import io

    return [row[name] for row in csv.DictReader(io.StringIO(text)) if row.get(name)]
