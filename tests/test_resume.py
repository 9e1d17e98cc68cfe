"""Runs that survive: resume equivalence, SIGKILL, damaged checkpoints, refusals, Ctrl-C, wandb."""

import json
import signal
import subprocess
import time

import pytest
import torch

from handclip.io import load_checkpoint_file
from tests.test_train import train, train_command

pytestmark = pytest.mark.slow
EPOCHS = ["trainer.max_epochs=6", "eval.baseline=false", "run_name=r"]


def start(tmp_path, *overrides, script="train.py"):
    command, env = train_command(tmp_path, *overrides, script=script)
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics_of(path):
    return json.loads((path / "runs" / "r" / "metrics.json").read_text())["metrics"]


def weights_of(path):
    return load_checkpoint_file(path / "runs" / "r" / "checkpoints" / "last.ckpt")["state_dict"]


def test_killed_run_resumes_from_a_new_process_and_equals_an_uninterrupted_one(tmp_path):
    train(tmp_path / "whole", *EPOCHS)
    # the same run, killed with SIGKILL once its first checkpoint exists
    process = start(tmp_path / "split", *EPOCHS)
    last = tmp_path / "split" / "runs" / "r" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "split" / "runs" / "r" / "metrics.json").exists()
    epoch_at_kill, step_at_kill = load_checkpoint_file(last)["epoch"], load_checkpoint_file(last)["global_step"]
    assert epoch_at_kill < 5
    # a new process continues the same run directory
    result = train(tmp_path / "split", *EPOCHS, "ckpt_path=last")
    assert f"resuming {last}: epoch {epoch_at_kill}, step {step_at_kill}" in result.stdout
    whole, split = metrics_of(tmp_path / "whole"), metrics_of(tmp_path / "split")
    for key in ("val/rank1", "test/rank1", "test/mAP", "test_all/mAP"):
        assert split[key] == pytest.approx(whole[key], abs=1e-6), key
    a, b = weights_of(tmp_path / "whole"), weights_of(tmp_path / "split")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_damaged_last_checkpoint_falls_back_to_best(tmp_path):
    train(tmp_path, "trainer.max_epochs=2", "eval.baseline=false", "run_name=r")
    last = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    result = train(tmp_path, "trainer.max_epochs=3", "eval.baseline=false", "run_name=r", "ckpt_path=last")
    assert "is damaged or not a checkpoint" in result.stderr and "resuming from" in result.stderr
    assert (tmp_path / "runs" / "r" / "metrics.json").is_file()


def test_resume_with_a_changed_freeze_policy_is_refused(tmp_path):
    train(tmp_path, "trainer.max_epochs=1", "eval.baseline=false", "run_name=r")
    result = train(
        tmp_path, "trainer.max_epochs=2", "run_name=r", "ckpt_path=last", "freeze.vision_blocks=2", check=False
    )
    assert result.returncode == 2
    assert "cannot resume" in result.stderr and "freeze differs" in result.stderr and "init_from=" in result.stderr
    # and starting a new run from those weights works
    checkpoint = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    train(tmp_path, "trainer.max_epochs=1", "eval.baseline=false", "run_name=r2", f"init_from={checkpoint}")


def test_existing_checkpoints_are_not_overwritten_silently(tmp_path):
    train(tmp_path, "trainer.max_epochs=1", "eval.baseline=false", "run_name=r")
    before = (tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt").read_bytes()
    result = train(tmp_path, "trainer.max_epochs=1", "run_name=r", check=False)
    assert result.returncode == 2
    assert "already holds checkpoints" in result.stderr and "ckpt_path=last" in result.stderr
    assert (tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt").read_bytes() == before
    train(tmp_path, "trainer.max_epochs=1", "eval.baseline=false", "run_name=r", "overwrite=true")


def test_ctrl_c_mid_epoch_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    overrides = ["trainer.max_epochs=6", "eval.baseline=false", "run_name=r", "data.batch_size=4"]
    train(tmp_path / "whole", *overrides)
    # interrupt right after step 8 starts: epoch 1 has 6 steps, so this is mid-epoch
    process = start(tmp_path / "split", *overrides, script="tests/step_printer.py")
    for line in process.stdout:
        if line.strip() == "handclip-test-step 8":
            process.send_signal(signal.SIGINT)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0 and "interrupted: saved" in output
    last = tmp_path / "split" / "runs" / "r" / "checkpoints" / "last.ckpt"
    saved = load_checkpoint_file(last)
    assert (
        saved["global_step"] == 8
        and saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 2
    )
    assert not (tmp_path / "split" / "runs" / "r" / "metrics.json").exists()
    train(tmp_path / "split", *overrides, "ckpt_path=last")
    whole, split = metrics_of(tmp_path / "whole"), metrics_of(tmp_path / "split")
    for key in ("val/rank1", "test/rank1", "test/mAP"):
        assert split[key] == pytest.approx(whole[key], abs=1e-6), key
    a, b = weights_of(tmp_path / "whole"), weights_of(tmp_path / "split")
    assert (
        load_checkpoint_file(tmp_path / "split" / "runs" / "r" / "checkpoints" / "last.ckpt")["global_step"]
        == (load_checkpoint_file(tmp_path / "whole" / "runs" / "r" / "checkpoints" / "last.ckpt")["global_step"])
    )
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_wandb_offline_writes_its_files_and_a_resumed_run_keeps_its_id(tmp_path):
    overrides = ["eval.baseline=false", "run_name=r", "logger=wandb", "logger.mode=offline"]
    train(tmp_path, "trainer.max_epochs=1", *overrides)
    run = tmp_path / "runs" / "r"
    run_id = (run / "wandb_id.txt").read_text().strip()
    first = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert first and any(first[0].glob("*.wandb"))
    train(tmp_path, "trainer.max_epochs=2", *overrides, "ckpt_path=last")
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) >= 2 and all(p.name.endswith(run_id) for p in runs)
