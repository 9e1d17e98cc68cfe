"""Every bad input a user is known to have tried: one `error:` line naming the key or file, exit
status 2, nothing heavy done, and nothing left behind for a refused configuration."""

import subprocess

import pytest
from PIL import Image

from tests.runner import run_in_process
from tests.test_train import QUICK, train_command

pytestmark = pytest.mark.slow

CASES = [
    (["seed=abc"], "seed='abc' must be an integer"),
    (["data.runs=abc"], "data.runs='abc' must be"),
    (["data.cache_size=abc"], "data.cache_size='abc' must be"),
    (["data.augment.crop_scale=[a,b]"], "data.augment.crop_scale=['a', 'b'] must be [low, high]"),
    (["data.augment.rotation=abc"], "data.augment.rotation='abc' must be a number"),
    (["eval.batch_size=0"], "eval.batch_size=0 must be an integer >= 1"),
    (["trainer.precision=abc"], "trainer.precision='abc': choose one of auto"),
    (["optim.optimizer.betas=[1.5,0.9]"], "optim.optimizer: Invalid beta parameter"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 must be"),
    (['data.captions=["{person:05d}"]'], "'{person:05d}' cannot be filled"),
    (["data.captions=[]"], "data.captions is empty"),
    (["optim.head_lr_multiplier=-1"], "optim.head_lr_multiplier=-1 must be"),
    (["optim.schedule.warmup=-1"], "optim.schedule.warmup=-1 must be"),
    (["freeze.vision_blocks=9"], "freeze.vision_blocks=9 is out of range"),
    (["data.batch_size=1"], "data.batch_size=1 is too small"),
    (["+max_epoch=3"], "max_epoch is not a setting (did you mean trainer.max_epochs?)"),
    (["+freze=last_n"], "freze is not a setting (did you mean freeze?)"),
    (["+trainer.max_epoch=3"], "trainer.max_epoch is not a setting of Trainer (did you mean trainer.max_epochs?)"),
    (["+optim.betas=[0.9,0.9]"], "optim.betas is not a setting"),
    # a key without +: HandCLIP's "did you mean" first (was: Hydra's advice to add it with +, exit 1)
    (["optim.lrr=1e-3"], "optim.lrr is not a setting (did you mean optim.lr?); optim has lr, weight_decay"),
    (["trainer.max_epoch=3"], "trainer.max_epoch is not a setting (did you mean trainer.max_epochs?)"),
    (["max_epoch=3"], "max_epoch is not a setting (did you mean trainer.max_epochs?)"),
    (["sweep.dir=x"], "sweep.dir is not a setting (did you mean hydra.sweep.dir?)"),
    (["hydra.sweep.dirr=x"], "hydra.sweep.dirr is not a setting (did you mean hydra.sweep.dir?); hydra.sweep has dir"),
    (["data.source.identites=3"], "data.source.identites is not a setting (did you mean data.source.identities?)"),
    (["~optim.lrr"], "optim.lrr is not a setting (did you mean optim.lr?)"),
    (["trainer.limit_train_batches=2"], "but lightning.Trainer takes it: add it with +trainer.limit_train_batches=2"),
    (["run_name=../../etc"], "run_name='../../etc' must be a relative name inside paths.runs"),
    (["run_name=/abs/path"], "run_name='/abs/path' must be a relative name"),
    (["freeze=pattern", "freeze.include=[nothing_here]"], "freeze.include: 'nothing_here' matches no parameter"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 must be a number >= 0"),
    (
        ["experiment=demo_clipreid", "stages.prompts.loss=nothing"],
        "stages.prompts: In 'train': Could not find 'loss/nothing'",
    ),
    (["experiment=demo_clipreid", "stages.prompts.optim.lr=-1"], "stages.prompts: optim.lr=-1"),
    (["freeze=locked"], "freeze=Locked trains nothing of the backbone and the loss has no learnable parts"),
    (["experiment=demo_clipreid", "+stages.prompts.ckpt_path=last"], "stages.prompts.ckpt_path cannot be set by one"),
    # the second hostile pass: settings read before the components are built, names no folder can have, metrics
    # that validation never gives, a logger's own settings
    (["eval.protocol=paper"], "eval.protocol='paper': choose one of handclip, published"),
    (["eval.protocol=published", "eval.flip_tta=false"], "eval.flip_tta=false contradicts eval.protocol=published"),
    (["overwrite=no"], "overwrite='no' must be true or false"),  # was read as true: checkpoints removed
    (["dry_run=no"], "dry_run='no' must be true or false"),  # was read as true
    (["ckpt_path=true"], "ckpt_path=True must be last or a checkpoint file"),
    (["init_from=5"], "init_from=5 must be a checkpoint file (quote a file name"),
    (["run_name=" + "a" * 300], "a folder name of 300 bytes, longer than the 255"),
    (["run_name=."], "run_name='.' names paths.runs itself"),
    (["eval.select=val/bogus"], "eval.select='val/bogus' must be a validation metric, one of val/rank1"),
    (["eval.wise_ft.metric=val/bogus"], "eval.wise_ft.metric='val/bogus' must be a validation metric"),
    (["logger=wandb", "logger.mode=bogus"], "logger.mode='bogus': choose one of online, offline, disabled"),
    (
        ["experiment=demo_clipreid", "stages.prompts.loss=nothing", "dry_run=true"],
        "stages.prompts: In 'train': Could not find 'loss/nothing'; available options in 'loss': anchored, clip, "
        "clipreid",
    ),
]


def run(tmp_path, *overrides, base=QUICK, process=False):
    """train.py with `overrides`: in this process, or (`process`) as a shell runs it."""
    command, env = train_command(tmp_path, *overrides, base=base)
    if process:
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return run_in_process(command, tmp_path, env)


def check_refused(result, message: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "baseline (untrained)" not in result.stdout and "Epoch" not in result.stdout  # nothing trained


@pytest.mark.parametrize(("overrides", "message"), CASES, ids=[" ".join(o) for o, _ in CASES])
def test_a_bad_setting_is_one_line_exit_2_and_leaves_no_run_behind(tmp_path, overrides, message):
    result = run(tmp_path, *overrides)
    check_refused(result, message)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))
    assert not (tmp_path.parent / "etc").exists()


def test_a_refusal_as_the_shell_sees_it_is_one_line_and_exit_status_2(tmp_path):
    result = run(tmp_path, "data.runs=abc", process=True)
    check_refused(result, "data.runs='abc' must be")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_paths_runs_pointing_at_a_file(tmp_path):
    (tmp_path / "runs.txt").write_text("mine")
    check_refused(run(tmp_path, f"paths.runs={tmp_path / 'runs.txt'}"), "is a file: point it at a folder")
    assert (tmp_path / "runs.txt").read_text() == "mine"


def test_a_file_where_checkpoints_should_be(tmp_path):
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "checkpoints").write_text("mine")
    check_refused(run(tmp_path, "run_name=x"), "checkpoints is a file")
    assert (tmp_path / "runs" / "x" / "checkpoints").read_text() == "mine"
    assert not (tmp_path / "runs" / "x" / "config.yaml").exists()


def caption_dataset(root, captions: list[str], encoding: str = "utf-8", identities: bool = True):
    (root / "captions" / "img").mkdir(parents=True)
    lines = ["image,caption,identity" if identities else "image,caption"]
    for number, caption in enumerate(captions):
        name = f"img/{number}.jpg"
        Image.new("RGB", (48, 48), (number * 9 % 255, 120, 80)).save(root / "captions" / name)
        lines.append(f"{name},{caption},{number // 3}" if identities else f"{name},{caption}")
    (root / "captions" / "captions.csv").write_bytes(("\n".join(lines) + "\n").encode(encoding))


@pytest.mark.parametrize(
    ("captions", "encoding", "message"),
    [
        (["crème brûlée hand"] * 24, "latin-1", "captions.csv is not UTF-8"),
        (["", *["a hand"] * 23], "utf-8", "needs 'caption', which image img/0.jpg does not have"),
        ([*["a hand"] * 23, ""], "utf-8", "needs 'caption', which image img/23.jpg does not have"),
    ],
    ids=["latin-1", "empty first caption", "empty last caption"],
)
def test_a_bad_caption_file_is_named_before_training(tmp_path, captions, encoding, message):
    caption_dataset(tmp_path / "data", captions, encoding)
    base = [q for q in QUICK if not q.startswith("data.source")]
    result = run(tmp_path, "data=captions", "data.batch_size=4", "run_name=c", base=base)
    check_refused(result, message)


def test_a_refused_command_keeps_the_empty_folders_it_did_not_make(tmp_path):
    mine = tmp_path / "mine"
    (mine / "runs").mkdir(parents=True)  # made by the user, empty; Hydra then adds the run directory inside
    command, env = train_command(mine, "freeze.text_blocks=9")
    result = subprocess.run(command, cwd=mine, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "freeze.text_blocks=9 is out of range" in result.stderr, result.stderr[-2000:]
    assert sorted(p.name for p in mine.iterdir()) == ["runs"] and not any((mine / "runs").iterdir())


def test_identity_losses_on_captions_without_identities_are_refused_with_the_fix(tmp_path):
    caption_dataset(tmp_path / "data", ["a hand"] * 24, identities=False)
    base = [q for q in QUICK if not q.startswith("data.source")]
    pk = ["data.sampler=identity_balanced", "data.identities_per_batch=2", "data.images_per_identity=2"]
    result = run(tmp_path, "data=captions", "data.batch_size=4", "loss=strong", *pk, "run_name=c", base=base)
    # named before the sampler (which could not fill K=2 either) and before any weights load
    check_refused(result, "loss.terms.identity learns or compares identities, but this data has no identities")
    assert "loss=clip or loss=siglip, or give the data an identity column" in result.stderr
    result = run(tmp_path, "data=captions", "data.batch_size=4", "eval.feature=pre_projection", "run_name=c",
                 base=base)  # fmt: skip
    check_refused(result, "eval.feature=pre_projection: this data has no identities")
    result = run(tmp_path, "data=captions", "data.batch_size=4", "eval.verify=true", "run_name=c", base=base)
    check_refused(result, "eval.verify=true: this data has no identities")
    assert "no identity to re-rank by or to verify" in result.stderr


def test_init_from_weights_of_another_model_are_refused_in_one_line_before_the_run_is_written(tmp_path):
    from tests.fake_runs import fake_run

    fake_run(tmp_path / "other")  # a finished run of another tiny model (3 vision blocks, width 32)
    checkpoint = tmp_path / "other" / "checkpoints" / "best.ckpt"
    result = run(tmp_path, f"init_from='{checkpoint}'", "run_name=x")
    check_refused(result, "its weights do not fit this model (")
    line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert "16 not in this model, e.g. backbone." in line and "of another shape" in line and len(line) < 600, line
    # (was: every such key, one after another)
    assert not (tmp_path / "runs" / "x").exists()  # was: config.yaml and freeze.txt of a run that never ran


def test_run_name_in_a_sweep_is_refused_not_ignored(tmp_path):
    from tests.test_train import train

    # every point has a folder of its own under runs/sweeps/<name>/<sweep>: run_name was dropped without a word
    result = train(tmp_path, "seed=0,1", "run_name=mine", multirun=True, check=False)
    check_refused(result, "run_name=mine names one run, and a sweep (-m) runs several")
    assert "sweep_name=mine" in result.stderr
    assert not list((tmp_path / "runs").rglob("*.ckpt")) and not (tmp_path / "runs" / "mine").exists()


@pytest.mark.parametrize("key", ["data", "cache"])
def test_a_file_where_the_data_or_cache_folder_goes_is_refused_before_anything_is_written(tmp_path, key):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    result = run(tmp_path, f"paths.{key}={afile}")
    check_refused(result, f"paths.{key}={afile} is a file: point it at a folder")  # was NotADirectoryError
    assert not (tmp_path / "runs").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:  # bound, then closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"WANDB_MODE": "online"}, "logger=wandb is online (WANDB_MODE=online) but no W&B API key was found"),
        ({"WANDB_MODE": "bogus"}, "WANDB_MODE='bogus' (in the environment) is not a mode of wandb"),
        ({"WANDB_MODE": "Offline"}, "WANDB_MODE='Offline' (in the environment) is not a mode of wandb"),
        (  # a key, and a server that refuses at once (nothing leaves this machine)
            {"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:{port}"},
            "logger=wandb is online (WANDB_MODE=online) but http://127.0.0.1:",
        ),
    ],
    ids=["online without a key", "bad mode", "mode in capitals", "server unreachable"],
)
def test_a_wandb_logger_that_cannot_start_is_refused_before_the_data_and_the_baseline(tmp_path, environment, message):
    # was: the data prepared, the backbone loaded and the baseline scored, then wandb's traceback (exit 1), or a
    # message naming logger.mode for a value that came from WANDB_MODE
    command, env = train_command(tmp_path, "logger=wandb", "run_name=w")
    env = {k: v for k, v in env.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update({k: v.format(port=_free_port()) for k, v in environment.items()}, HOME=str(tmp_path / "home"))
    result = run_in_process(command, tmp_path, env)
    check_refused(result, message)
    assert not (tmp_path / "data").exists()  # no synthetic data drawn
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_logger_wandb_without_the_wandb_package_is_refused_with_the_fix(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if it were not installed
    result = run(tmp_path, "logger=wandb", "logger.mode=offline", "run_name=w")
    check_refused(result, "logger=wandb needs the wandb package, which is not installed: pip install wandb")
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_a_mistyped_key_in_a_sweep_is_named_before_any_point_runs(tmp_path):
    from tests.test_train import train

    result = train(tmp_path, "seed=0,1", "optim.lrr=1e-3,1e-4", multirun=True, check=False)
    check_refused(result, "optim.lrr is not a setting (did you mean optim.lr?)")
    assert "To append" not in result.stderr and not (tmp_path / "runs").exists()


def test_keys_added_with_plus_and_hydras_word_on_an_unknown_choice_stay_as_they_were(tmp_path):
    choice = run(tmp_path, "logger=wandbb")  # Hydra lists the choices itself
    assert choice.returncode == 1 and "Available options in 'logger'" in choice.stderr, choice.stderr[-2000:]
    assert "error:" not in choice.stderr
    added = run(tmp_path, "+trainer.limit_train_batches=1", "trainer.max_epochs=1", "eval.baseline=false",
                "data.runs=1", "run_name=plus")  # fmt: skip
    assert added.returncode == 0, added.stderr[-2000:]
