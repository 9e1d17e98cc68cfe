"""Nothing silently wrong: non-finite models, stale results, damaged stores, and outputs that cannot be written."""

import lightning as L
import pytest
import torch

from handclip.errors import NonFiniteError
from handclip.eval.reid import evaluate
from handclip.io import load_checkpoint_file


def test_non_finite_features_are_refused_never_scored():
    good = torch.eye(3)
    for bad in (torch.full((3, 3), float("nan")), torch.tensor([[1.0, 0, 0], [0, float("inf"), 0], [0, 0, 1]])):
        with pytest.raises(NonFiniteError, match="features are not finite"):
            evaluate(bad, torch.arange(3), good, torch.arange(3))
        with pytest.raises(NonFiniteError, match="gallery features are not finite"):
            evaluate(good, torch.arange(3), bad, torch.arange(3))


def test_weights_that_turn_non_finite_on_an_epochs_last_step_stop_the_run_before_any_checkpoint(
    tmp_path, synthetic_hands
):
    from handclip.model import Full, apply_freeze, load_backbone
    from handclip.train.callbacks import AtomicCheckpointIO
    from handclip.train.module import NonFiniteLossError
    from tests.conftest import TINY
    from tests.test_module import datamodule_for, fine_tuner

    backbone = load_backbone(TINY, tmp_path)
    apply_freeze(backbone, Full())
    datamodule = datamodule_for(synthetic_hands, backbone)
    module = fine_tuner(backbone, datamodule, lr=1e-3)
    losses = []

    class Poison(L.Callback):  # an infinite gradient on epoch 1's last step: a finite loss, then NaN weights
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.current_epoch == 1 and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                pl_module.backbone.model.visual_projection.weight.grad.fill_(float("inf"))

    folder = tmp_path / "ckpt"
    best = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, filename="best", monitor="val/rank1", mode="max")
    last = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, filename="last")
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[best, last, Poison()], plugins=[AtomicCheckpointIO()])  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"weights became non-finite at step \d+ \(epoch 1\): "
                                                 r"backbone.model.visual_projection.weight"):  # fmt: skip
        trainer.fit(module, datamodule=datamodule)
    assert all(torch.isfinite(torch.tensor(losses)))  # the loss never showed it
    for name in ("best.ckpt", "last.ckpt"):
        saved = load_checkpoint_file(folder / name)
        assert saved["epoch"] == 0 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_a_rerun_that_stops_in_a_later_stage_leaves_no_stale_results(tmp_path):
    from tests.test_clipreid import STAGED
    from tests.test_train import train

    train(tmp_path, *STAGED)
    run = tmp_path / "runs" / "r"
    assert (run / "metrics.json").is_file()
    # the same run again from scratch; its second stage stops at run time (its starting checkpoint is missing)
    broken = "+stages.image.init_from=${stage.previous}/checkpoints/missing.ckpt"
    result = train(tmp_path, *STAGED, "overwrite=true", broken, check=False)
    assert result.returncode == 2 and "missing.ckpt: no such checkpoint file" in result.stderr, result.stderr[-2000:]
    assert (run / "1-prompts" / "metrics.json").is_file()  # the first stage ran again and finished
    assert not (run / "metrics.json").exists() and not (run / "2-image" / "metrics.json").exists()
    # so a sweep over this run would not report the earlier results as this configuration's
    from handclip.train.sweep import collect_runs

    _, rows = collect_runs(tmp_path / "runs")
    assert [r["status"] for r in rows if r["run"] == "r"] == ["unfinished"]


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated", "no description", "leftover of a killed fill"])
def test_a_damaged_activation_store_is_computed_again_never_reused(tmp_path, capsys, damage):
    import numpy as np

    from handclip.data.activations import ActivationStore

    calls = []

    def compute(view, indices):
        calls.append((view, tuple(indices)))
        return torch.arange(len(indices) * 6, dtype=torch.float32).reshape(len(indices), 2, 3) + 100 * view

    store = ActivationStore(tmp_path, {"weights": "w"}, views=2, count=5).ensure(compute, batch_size=2)
    first = np.array(store.array)
    assert store.filled_now and len(calls) == 6
    path = store.path
    if damage == "flipped bytes":
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "no description":
        path.with_suffix(".json").unlink()
    else:  # a fill killed half-way by a process that no longer exists
        path.with_name(path.name + ".tmp999999999").write_bytes(b"half")
    calls.clear()
    again = ActivationStore(tmp_path, {"weights": "w"}, views=2, count=5).ensure(compute, batch_size=2)
    if damage == "leftover of a killed fill":
        assert not again.filled_now and not calls  # an intact store is read, and the leftover is gone
        assert not list(tmp_path.glob("*.tmp*"))
    else:
        assert again.filled_now and len(calls) == 6
        assert "are damaged" in capsys.readouterr().out
    assert np.array_equal(np.array(again.array), first) and again.damage() is None
