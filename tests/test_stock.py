"""Model Stock (`python -m handclip.export --stock RUN_A RUN_B OUT`): each layer group of the export is the two
runs' average pulled towards the starting weights by t = 2 cos / (1 + cos), computed here on its own; the export
loads in plain transformers; what cannot be merged is refused in one line with nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fake_runs import HF_TINY, command, fake_run, one_error_line


def _flat(state, names):
    return torch.cat([state[n].float().reshape(-1) for n in names])


def _checkpoint(run):
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    return {name.removeprefix("backbone."): value for name, value in state.items()}


@pytest.mark.slow
def test_each_layer_group_is_pulled_towards_the_start_by_the_runs_agreement(tmp_path, capsys):
    from transformers import CLIPModel

    from handclip.build import build

    # run b moves one group (the vision projection) exactly as run a does: cos 1 there, so t = 1
    a = fake_run(tmp_path / "a", seed=1)
    projection = {n for n, _ in a.named_parameters() if "visual_projection" in n}

    def like_a(state):
        for name in projection:
            state[name].copy_(a.state_dict()[name])

    fake_run(tmp_path / "b", seed=2, change=like_a)
    start = build(HF_TINY, "backbone").load(tmp_path / "cache")
    from handclip.tools.stock import model_stock

    model_stock(tmp_path / "a", tmp_path / "b", tmp_path / "stocked")
    assert "Model Stock of a and b: t per layer group" in capsys.readouterr().out
    marker = json.loads((tmp_path / "stocked" / "handclip_export.json").read_text())
    rows = {row["group"]: row for row in marker["stock"]}
    merged = CLIPModel.from_pretrained(tmp_path / "stocked").state_dict()
    names = {id(p): n for n, p in a.named_parameters()}
    sa, sb = (_checkpoint(tmp_path / run) for run in ("a", "b"))  # what the runs saved (b with its change)
    s0 = start.state_dict()
    for group in a.all_groups():
        members = [names[id(p)] for p in group.parameters.values()]
        da, db = _flat(sa, members) - _flat(s0, members), _flat(sb, members) - _flat(s0, members)
        cos = float(da @ db / (da.norm() * db.norm()))
        t = min(1.0, max(0.0, 2 * cos / (1 + cos)))
        assert rows[group.name]["t"] == pytest.approx(t, abs=1e-4), group.name
        expected = t * (_flat(sa, members) + _flat(sb, members)) / 2 + (1 - t) * _flat(s0, members)
        got = _flat({n: merged[n.removeprefix("model.")] for n in members}, members)
        assert torch.allclose(got, expected, atol=1e-5), group.name
    assert rows["vision.projection"]["t"] == pytest.approx(1.0)
    # independent random changes are nearly orthogonal: those groups stay close to the start
    assert rows["vision.blocks.0"]["t"] < 0.3
    card = (tmp_path / "stocked" / "README.md").read_text()
    assert "Model Stock: two runs merged group by group" in card and "| a |" in card and "| b |" in card


def test_what_model_stock_cannot_merge_is_refused_in_one_line(tmp_path):
    fake_run(tmp_path / "a", seed=1)
    other = {**HF_TINY, "config": {**HF_TINY["config"], "projection_dim": 8}}
    fake_run(tmp_path / "other", backbone=other, seed=2)
    out = tmp_path / "out"
    for args, message in (
        (["--stock", tmp_path / "a", tmp_path / "a", out], "the same run twice"),
        (["--stock", tmp_path / "a", tmp_path / "other", out], "other cannot go in a soup with a: backbone"),
        (["--stock", tmp_path / "a", out], "--stock takes two runs and a destination"),
        ([tmp_path / "a", out, tmp_path / "third"], "a third path is for --stock RUN_A RUN_B OUT_DIR"),
        (["--stock", "--soup", tmp_path / "a", tmp_path / "a", out], "it takes neither --soup nor --wise-ft"),
    ):
        result = command(*args)
        assert message in one_error_line(result), (args, result.stderr[-1500:])
        assert not out.exists() and not (tmp_path / "third").exists()
