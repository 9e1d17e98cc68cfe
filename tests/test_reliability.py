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


def test_a_backbone_cache_folder_missing_its_weights_is_built_again(tmp_path):
    from handclip.model import load_backbone
    from tests.conftest import TINY

    first = load_backbone(TINY, tmp_path)
    folder = next((tmp_path / "backbones").glob("tiny-*"))
    (folder / "model.safetensors").unlink()  # a cache folder someone damaged
    again = load_backbone(TINY, tmp_path)  # before: every run rebuilt it, then "OSError: Directory not empty"
    assert (folder / "model.safetensors").is_file() and not list((tmp_path / "backbones").glob("*.tmp*"))
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same seeded weights


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", "a/../../b"])
def test_a_name_that_leaves_the_runs_folder_is_refused_and_writes_nothing(tmp_path, name):
    from tests.test_train import train

    result = train(tmp_path / "work", f"name={name}", check=False)
    assert result.returncode == 2 and f"error: name={name!r} must be a relative name inside paths.runs" in result.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "work" / "runs").exists()
    swept = train(tmp_path / "work", f"name={name}", "seed=0,1", multirun=True, check=False)
    assert swept.returncode != 0 and not (tmp_path / "escaped").exists() and not (tmp_path / "b").exists()


def test_a_checkpoint_that_the_disk_cannot_take_is_one_line_and_the_data_made_before_is_kept(tmp_path):
    import resource
    import subprocess

    from tests.test_train import train, train_command

    train(tmp_path / "warm", "trainer.max_epochs=1", "eval.baseline=false")  # the tiny backbone is in the cache now
    command, env = train_command(tmp_path / "run", "trainer.max_epochs=1", "eval.baseline=false", "run_name=r")

    def small_files():  # files up to 2 MB: images, JSON and the starting weights fit, a checkpoint (15 MB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    result = subprocess.run(command, cwd=tmp_path / "run", env=env, capture_output=True, text=True, timeout=600,
                            preexec_fn=small_files)  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and "is the disk full?" in errors[0]
    run = tmp_path / "run" / "runs" / "r"
    assert not list(run.rglob("*.tmp*"))  # no half-written checkpoint left behind


def test_make_bench_checks_its_output_before_measuring(tmp_path):
    import subprocess
    import sys

    for args, message in ((["--json", str(tmp_path)], "is a folder"),
                          (["--json", str(tmp_path / "no" / "x.json")], "does not exist"),
                          (["--skip-data", "--skip-model"], "leave nothing to measure")):  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "handclip.benchmark", *args], capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_scalar_layer_decay_applies_to_both_towers_and_all_zero_loss_weights_are_refused():
    import functools

    from handclip.errors import ConfigError
    from handclip.losses import ContrastiveLoss, Objective
    from handclip.train.optim import Optimization

    optimization = Optimization(lr=1e-3, weight_decay=0.0, head_lr_multiplier=1.0, layer_decay=0.7,
                                optimizer=functools.partial(torch.optim.AdamW))  # fmt: skip
    assert optimization.layer_decay == {"vision": 0.7, "text": 0.7}
    with pytest.raises(ConfigError, match="optim.layer_decay='x' must be a number"):
        Optimization(lr=1e-3, weight_decay=0.0, head_lr_multiplier=1.0, layer_decay="x",
                     optimizer=functools.partial(torch.optim.AdamW))  # fmt: skip
    with pytest.raises(ConfigError, match="every term has weight 0"):
        Objective({"a": ContrastiveLoss(weight=0.0), "b": ContrastiveLoss(weight=0)})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"ContrastiveLoss.weight=.* must be a number >= 0"):
            ContrastiveLoss(weight=bad)


# --- the second hostile pass -----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["cut short", "a list", "no metrics"])
def test_a_damaged_record_of_a_finished_run_is_said_and_the_run_done_again_never_read_in_part(tmp_path, damage, capsys):
    import json
    from types import SimpleNamespace

    from handclip.errors import HandClipError
    from handclip.train.callbacks import TestCurve
    from handclip.train.run import Resume, _baseline
    from handclip.train.rundir import finished_run
    from handclip.train.sweep import collect_runs, main
    from handclip.train.sweep_point import prepare_point
    from tests.test_replication import write_run

    sweep = tmp_path / "sweep"
    write_run(sweep / "a", 2, 0, 0, 0.5, 0.3)
    write_run(sweep / "b", 2, 1, 0, 0.6, 0.3)
    metrics = sweep / "b" / "metrics.json"
    text = {"cut short": metrics.read_text()[:30], "a list": "[1, 2]", "no metrics": '{"manifest": "x"}'}[damage]
    metrics.write_text(text)
    # the summary names it and goes on (was: a traceback from json)
    _, rows = collect_runs(sweep)
    row = next(r for r in rows if r["run"] == "b")
    assert row["status"] == "damaged" and "metrics.json is damaged" in row["error"]
    main([str(sweep)])
    assert "b (all runs) damaged: left out" in capsys.readouterr().out
    # a sweep run again does the point again, from its checkpoint (was: a traceback, or its old numbers)
    (sweep / "b" / "checkpoints").mkdir()
    (sweep / "b" / "checkpoints" / "last.ckpt").write_bytes(b"")
    plain = {"seed": 1, "freeze": {"vision_blocks": 2}, "data": {"draw": 0}, "trainer": {"max_epochs": 2},
             "logger": {}, "overwrite": False, "ckpt_path": None}  # fmt: skip
    prepared = prepare_point(plain, sweep / "b", SimpleNamespace(sweep=SimpleNamespace(dir=str(sweep))))
    assert isinstance(prepared, tuple) and prepared[0]["ckpt_path"] == "last"
    assert "metrics.json is damaged" in capsys.readouterr().out and finished_run(sweep / "b") is None  # a stage too
    # a resumed run scores a damaged baseline again, and refuses a damaged curve before anything is written
    (tmp_path / "baseline.json").write_text(text)
    scored = {"metrics": {"val/rank1": 0.25}, "runs": {}, "cmc": {}}
    assert _baseline(lambda backbone: scored, None, tmp_path, Resume("last.ckpt", 5)) == scored
    assert json.loads((tmp_path / "baseline.json").read_text())["metrics"] == {"val/rank1": 0.25}
    (tmp_path / "curve.json").write_text(text.replace("[1, 2]", "{}"))
    with pytest.raises(HandClipError, match=r"curve.json is damaged.*move it away to resume without them"):
        TestCurve.check(tmp_path / "curve.json")


def test_a_backbone_cache_whose_weights_changed_in_place_is_built_again_and_an_older_one_recorded(tmp_path, capsys):
    import json

    from safetensors.torch import load_file, save_file

    from handclip.model import load_backbone
    from handclip.model.hf.spec import BUILT
    from tests.conftest import TINY

    first = load_backbone(TINY, tmp_path)
    folder = next((tmp_path / "backbones").glob("tiny-*"))
    recorded = json.loads((folder / BUILT).read_text())
    assert set(recorded) >= {"config.json", "model.safetensors", "tokenizer.json"}
    weights = load_file(folder / "model.safetensors")
    weights["visual_projection.weight"] = 2 * weights["visual_projection.weight"]  # other weights, the same size
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    again = load_backbone(TINY, tmp_path)  # was: started from the changed weights without a word
    assert "model.safetensors changed or went missing since it was built; built again" in capsys.readouterr().out
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    (folder / BUILT).unlink()  # built by a HandCLIP that kept no record: recorded as it is, not built again
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    load_backbone(TINY, tmp_path)
    assert json.loads((folder / BUILT).read_text()) == recorded
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp and "built again" not in capsys.readouterr().out
