"""`python -m handclip.advise`: short runs of each unfreeze depth from stored activations, ranked by validation
gain with the full run's cost; refusals are one line with nothing written."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from tests.test_train import QUICK, QUICK_POLICY, ROOT

BASE = [o for o in QUICK if o not in QUICK_POLICY and not o.startswith("trainer.max_epochs")]


def advise(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, "-m", "handclip.advise", *BASE, f"paths.root={tmp_path}", *map(str, args)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip


@pytest.mark.slow
def test_advice_ranks_every_depth_by_validation_gain_with_its_cost(tmp_path):
    result = advise(tmp_path, "--depths", "0,2", "--epochs", "1", "seed=0")  # a setting after the options too
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (tmp_path / "runs" / "advise").iterdir()
    rows = list(csv.DictReader((folder / "advice.csv").open()))
    assert sorted(int(r["vision_blocks"]) for r in rows) == [0, 2]
    gains = [float(r["val_mAP_gain"]) for r in rows]
    assert gains == sorted(gains, reverse=True) and [r["rank"] for r in rows] == ["1", "2"]
    trainable = {int(r["vision_blocks"]): int(r["trainable"]) for r in rows}
    assert trainable[2] > trainable[0]  # two more blocks train
    assert all(float(r["full_run_seconds"]) > 0 for r in rows)
    for depth in (0, 2):  # each short run is a run folder, scored on validation only
        metrics = (folder / f"depth_{depth}" / "metrics.json").read_text()
        assert "val/mAP" in metrics and "test/rank1" not in metrics
    said = " ".join(result.stdout.split())
    # the text tower as the experiment trains it (the demo: every block, 2 in this tiny model), named in the advice
    assert all(r["text_blocks"] == "2" for r in rows)
    assert "how deep to unfreeze" in said
    assert f"freeze.vision_blocks={rows[0]['vision_blocks']} freeze.text_blocks=2` first" in said


@pytest.mark.slow
def test_what_advise_cannot_do_is_refused_before_anything_is_written(tmp_path):
    for args, message in (
        (["--depths", "0,9"], "--depths: 9 is not a number of the image tower's blocks (0 to 2)"),
        (["--epochs", "0"], "--epochs 0: a short run needs at least 1 epoch"),
        (["--depths", ","], "--depths names no depth"),
        (["data.batch_size=1"], "data.batch_size=1 is too small"),
    ):
        result = advise(tmp_path, *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "runs").exists()
