"""Runs that survive: resume equivalence, SIGKILL, damaged checkpoints, refusals, Ctrl-C, wandb."""

import csv
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from handclip.io import load_checkpoint_file
from handclip.train.rundir import RunLock
from tests.test_train import QUICK, train, train_command

pytestmark = pytest.mark.slow
EPOCHS = ["trainer.max_epochs=6", "eval.baseline=false", "run_name=r"]


def start(tmp_path, *overrides, script="train.py"):
    command, env = train_command(tmp_path, *overrides, script=script)
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_once_written(tmp_path, path, *overrides) -> None:
    """Start a run and SIGKILL it as soon as `path` (a checkpoint) exists."""
    process = start(tmp_path, *overrides)
    deadline = time.time() + 300
    while not path.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def metrics_of(path):
    return json.loads((path / "runs" / "r" / "metrics.json").read_text())["metrics"]


def weights_of(path):
    return load_checkpoint_file(path / "runs" / "r" / "checkpoints" / "last.ckpt")["state_dict"]


# the strong baseline's objective: BN-neck identity heads (with running statistics) and triplet, P x K batches
HEADS = [
    "loss=strong", "loss.terms.identity.feature=both", "data.sampler=identity_balanced", "data.identities_per_batch=4",
    "data.images_per_identity=2", "eval.feature=bnneck",
]  # fmt: skip


@pytest.mark.parametrize("objective", [[], HEADS], ids=["clip", "identity_heads"])
def test_killed_run_resumes_from_a_new_process_and_equals_an_uninterrupted_one(tmp_path, objective):
    overrides = [*EPOCHS, *objective]
    train(tmp_path / "whole", *overrides)
    # the same run, killed with SIGKILL once its first checkpoint exists
    last = tmp_path / "split" / "runs" / "r" / "checkpoints" / "last.ckpt"
    kill_once_written(tmp_path / "split", last, *overrides)
    assert not (tmp_path / "split" / "runs" / "r" / "metrics.json").exists()
    epoch_at_kill, step_at_kill = load_checkpoint_file(last)["epoch"], load_checkpoint_file(last)["global_step"]
    assert epoch_at_kill < 5
    # a new process continues the same run directory
    result = train(tmp_path / "split", *overrides, "ckpt_path=last")
    assert f"resuming {last}: epoch {epoch_at_kill}, step {step_at_kill}" in result.stdout
    whole, split = metrics_of(tmp_path / "whole"), metrics_of(tmp_path / "split")
    for key in ("val/rank1", "test/rank1", "test/mAP", "test_all/mAP"):
        assert split[key] == pytest.approx(whole[key], abs=1e-6), key
    a, b = weights_of(tmp_path / "whole"), weights_of(tmp_path / "split")
    if objective:  # the heads and the necks' statistics are saved and resumed too
        assert {"objective.terms.identity.necks.pre_projection.classifier.weight",
                "objective.terms.identity.necks.projected.norm.running_mean"} <= set(a)  # fmt: skip
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-5), name


def test_a_resumed_run_that_began_from_init_from_reads_activations_of_the_weights_it_began_with(tmp_path):
    # a first run trains everything, so its frozen prefix (stored once in the second run) is not the backbone's
    train(tmp_path / "first", "freeze=full", "trainer.max_epochs=1", "eval.baseline=false", "run_name=a")
    overrides = [*EPOCHS, f"init_from={tmp_path / 'first' / 'runs' / 'a' / 'checkpoints' / 'last.ckpt'}"]
    train(tmp_path / "whole", *overrides)
    last = tmp_path / "split" / "runs" / "r" / "checkpoints" / "last.ckpt"
    kill_once_written(tmp_path / "split", last, *overrides)
    result = train(tmp_path / "split", *EPOCHS, "ckpt_path=last")  # a resume takes no init_from
    assert "activation cache: first 2 image groups frozen" in result.stdout
    whole, split = metrics_of(tmp_path / "whole"), metrics_of(tmp_path / "split")
    for key in ("val/rank1", "test/rank1", "test/mAP"):
        assert split[key] == pytest.approx(whole[key], abs=1e-6), key
    a, b = weights_of(tmp_path / "whole"), weights_of(tmp_path / "split")
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-5), name


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


def test_resume_with_another_objective_is_refused(tmp_path):
    train(tmp_path, "trainer.max_epochs=1", "eval.baseline=false", "run_name=r")
    result = train(tmp_path, "trainer.max_epochs=2", "run_name=r", "ckpt_path=last", "loss=siglip", check=False)
    assert result.returncode == 2
    assert "cannot resume" in result.stderr and "loss differs" in result.stderr
    # another protocol: the checkpoints were chosen, and the baseline scored, by the first one's validation
    result = train(tmp_path, "trainer.max_epochs=2", "run_name=r", "ckpt_path=last", "eval.protocol=published",
                   check=False)  # fmt: skip
    assert result.returncode == 2
    assert "cannot resume" in result.stderr and "evaluation differs" in result.stderr and "published" in result.stderr


def test_existing_checkpoints_are_not_overwritten_silently(tmp_path):
    train(tmp_path, "trainer.max_epochs=1", "eval.baseline=false", "run_name=r")
    run = tmp_path / "runs" / "r"
    before, config = (run / "checkpoints" / "last.ckpt").read_bytes(), (run / "config.yaml").read_text()
    (run / "failed.json").write_text("{}")  # whatever the run holds stays as it is
    # refused with another setting: the run's config.yaml must still describe its checkpoints
    result = train(tmp_path, "trainer.max_epochs=1", "run_name=r", "projection=replace", check=False)
    assert result.returncode == 2
    assert "already holds checkpoints" in result.stderr and "ckpt_path=last" in result.stderr
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert (run / "config.yaml").read_text() == config and (run / "failed.json").is_file()
    # refused because another process holds the run: nothing written either
    with RunLock(run):
        locked = train(tmp_path, "trainer.max_epochs=2", "run_name=r", "ckpt_path=last", check=False)
    assert locked.returncode == 2 and "in use by another process" in locked.stderr
    assert (run / "config.yaml").read_text() == config and (run / "failed.json").is_file()
    train(tmp_path, "trainer.max_epochs=1", "eval.baseline=false", "run_name=r", "overwrite=true")


INTERRUPTS = [
    # (what the child prints when the signal is sent, signal, exit status)
    ("handclip-test-step 8", signal.SIGINT, 1),  # mid-step, mid-epoch (epoch 1 has steps 6..11)
    ("handclip-test-stepped 8", signal.SIGINT, 1),  # just after the optimiser step
    ("handclip-test-validation 1", signal.SIGINT, 1),  # during validation: the epoch's training is done
    ("handclip-test-step 8", signal.SIGTERM, 143),  # pre-emption (SLURM, docker stop, Kubernetes)
]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to."""
    root = tmp_path_factory.mktemp("whole")
    train(root, *STOPPED)
    return root


STOPPED = ["trainer.max_epochs=4", "eval.baseline=false", "run_name=r", "data.batch_size=4"]


@pytest.mark.parametrize(("when", "signum", "status"), INTERRUPTS, ids=["mid-step", "after-step", "validation", "term"])
def test_a_signal_at_any_moment_saves_a_checkpoint_that_resumes_exactly(tmp_path, whole_run, when, signum, status):
    process = start(tmp_path, *STOPPED, script="tests/step_printer.py")
    for line in process.stdout:
        if line.strip() == when:
            process.send_signal(signum)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode == status, output[-2000:]
    assert f"{signum.name}: stopping after this batch" in output and f"{signum.name}: saved" in output
    last = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    saved = load_checkpoint_file(last)
    progress = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    # weights, optimiser and progress all after the same batch: the batch in flight finished, nothing after it
    whole_last = load_checkpoint_file(whole_run / "runs" / "r" / "checkpoints" / "last.ckpt")
    per_epoch = whole_last["global_step"] // 4
    assert saved["global_step"] >= 9 and saved["global_step"] == saved["epoch"] * per_epoch + progress["completed"]
    assert not (tmp_path / "runs" / "r" / "metrics.json").exists()
    train(tmp_path, *STOPPED, "ckpt_path=last")
    whole, split = metrics_of(whole_run), metrics_of(tmp_path)
    for key in ("val/rank1", "test/rank1", "test/mAP"):
        assert split[key] == pytest.approx(whole[key], abs=1e-6), key
    a, b = weights_of(whole_run), weights_of(tmp_path)
    assert (
        load_checkpoint_file(last)["global_step"]
        == load_checkpoint_file(whole_run / "runs" / "r" / "checkpoints" / "last.ckpt")["global_step"]
    )  # no epoch skipped, no batch applied twice
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def caption_run(root):
    """Settings of a run on a caption CSV (24 images of 8 identities, each with a split of its own)."""
    from tests.test_prepare import caption_folder

    folder = caption_folder(root / "data" / "captions", split=lambda n: "test" if n >= 18 else "train")
    return [*STOPPED, "data=captions", f"data.source.root={folder}", "data.runs=2", "data.augment.rotation=10"]


@pytest.mark.parametrize("data", ["11k_format", "captions"])
def test_with_loader_workers_a_ctrl_c_to_the_whole_process_group_resumes_exactly(tmp_path, whole_run, data):
    """A terminal's Ctrl-C reaches the loader workers too; the run must still stop between batches, and the resume
    must train the rest of the epoch in the order and with the augmentation of the uninterrupted run."""
    overrides, base, whole, split = STOPPED, QUICK, whole_run, tmp_path / "split"
    if data == "captions":  # the uninterrupted run, with no workers: workers change nothing
        overrides, whole = caption_run(tmp_path / "whole"), tmp_path / "whole"
        base = [q for q in QUICK if not q.startswith("data.source")]
        train(whole, *overrides, "data.num_workers=0", base=base)
        caption_run(split)
    command, env = train_command(split, *overrides, "data.num_workers=2", base=base, script="tests/step_printer.py")
    process = subprocess.Popen(command, cwd=split, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
    for line in process.stdout:
        if line.strip() == "handclip-test-step 8":  # mid-epoch: steps 6..11 are epoch 1 (11k), 6..8 epoch 2 (captions)
            os.killpg(process.pid, signal.SIGINT)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 1 and "SIGINT: saved" in output, output[-2000:]
    assert "exited unexpectedly" not in output
    train(split, *overrides, "data.num_workers=2", "ckpt_path=last", base=base)
    assert metrics_of(split)["test/mAP"] == pytest.approx(metrics_of(whole)["test/mAP"], abs=1e-6)
    a, b = weights_of(whole), weights_of(split)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_a_resumed_run_keeps_its_whole_csv_history(tmp_path):
    train(tmp_path, "trainer.max_epochs=2", "eval.baseline=false", "run_name=r")
    history = tmp_path / "runs" / "r" / "logs" / "metrics.csv"
    epochs = [row["epoch"] for row in csv.DictReader(history.open()) if row.get("val/rank1")]
    assert epochs == ["0", "1"]
    result = train(tmp_path, "trainer.max_epochs=3", "eval.baseline=false", "run_name=r", "ckpt_path=last")
    epochs = [row["epoch"] for row in csv.DictReader(history.open()) if row.get("val/rank1")]
    assert epochs == ["0", "1", "2"]  # the first process's epochs are still there, none twice
    assert "trainer.max_epochs was 2, now 3" in result.stdout


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


@pytest.mark.parametrize("accumulate", ["compute.accumulate=1", "compute.accumulate=3"])
def test_a_run_interrupted_before_an_unfreeze_point_resumes_across_it_exactly(tmp_path, accumulate):
    # with contrastive accumulation too: its gradients are built inside the step, across the unfreeze
    stages = (
        "freeze.stages={0:{_target_:handclip.model.freeze.Frozen},"
        "2:{_target_:handclip.model.freeze.LastN,vision_blocks:1,text_blocks:0}}"
    )
    staged = [*STOPPED, "freeze=staged", stages, "freeze.warmup_steps=3", accumulate]
    train(tmp_path / "whole", *staged)
    table = (tmp_path / "whole" / "runs" / "r" / "freeze.txt").read_text()
    assert "epoch 2: freeze policy: last_n (vision_blocks=1, text_blocks=0)" in table
    process = start(tmp_path / "split", *staged, script="tests/step_printer.py")
    for line in process.stdout:
        if line.strip() == "handclip-test-step 8":  # epoch 1: before the unfreeze at epoch 2
            process.send_signal(signal.SIGINT)
            break
    assert process.communicate(timeout=120)[0] and process.returncode == 1
    result = train(tmp_path / "split", *staged, "ckpt_path=last")
    assert "epoch 2: freeze policy: last_n" in result.stdout
    a, b = weights_of(tmp_path / "whole"), weights_of(tmp_path / "split")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert metrics_of(tmp_path / "split")["test/mAP"] == pytest.approx(metrics_of(tmp_path / "whole")["test/mAP"])


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 1), (signal.SIGTERM, 143)])
def test_a_signal_during_the_final_evaluation_never_reports_success_and_the_run_completes_later(
    tmp_path, signum, status
):
    process = start(tmp_path, *EPOCHS[:1], "trainer.max_epochs=2", "eval.baseline=false", "run_name=r",
                    script="tests/step_printer.py")  # fmt: skip
    for line in process.stdout:
        if line.strip() == "handclip-test-evaluate":  # baseline off: the first evaluation is the final one
            process.send_signal(signum)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode == status and "during the final evaluation" in output, output[-2000:]
    assert not (tmp_path / "runs" / "r" / "metrics.json").exists()
    train(tmp_path, "trainer.max_epochs=2", "eval.baseline=false", "run_name=r", "ckpt_path=last")
    assert 0.0 <= metrics_of(tmp_path)["test/rank1"] <= 1.0
