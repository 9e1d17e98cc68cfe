"""End-to-end runs on the CPU with the tiny backbone and synthetic hands."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.runner import run_in_process

ROOT = Path(__file__).resolve().parents[1]
# the demo trains every layer; the quick runs train the top block of each tower (a test choosing its own freeze=
# policy replaces this one)
QUICK_POLICY = ["freeze=last_n", "freeze.vision_blocks=1", "freeze.text_blocks=1"]
QUICK_LOSS = "loss=clip"
# a small, quick demo: few identities, small images, two epochs, two test runs
QUICK = [
    "experiment=demo",
    "backbone=tiny",  # random weights: the demo's pretrained model takes minutes to build the first time
    "data.source.identities=10",
    "data.source.image_size=[96,72]",
    "data.batch_size=8",
    "data.runs=2",
    "trainer.max_epochs=2",
    "backbone.config.vision_config.image_size=32",
    "backbone.config.vision_config.num_hidden_layers=2",
    "backbone.config.text_config.num_hidden_layers=2",
    "eval.ranked=0",  # no pictures of what each model retrieves (1.3 s a run); the tests of them ask for them
    # CLIP's loss alone: the pipeline's tests need no prompt-keeping term (the demo's loss=lwf), which would also
    # refuse compute.accumulate; the demo's own test and the tests of the terms ask for them
    QUICK_LOSS,
    *QUICK_POLICY,
]


def _own_policy(base, overrides):
    """`base` without its freeze policy or loss when `overrides` choose one (a test's freeze=pattern replaces
    last_n, its loss=strong replaces clip)."""
    chosen = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    # an experiment brings its own loss (a staged one its loss per stage)
    dropped = (QUICK_POLICY if "freeze" in chosen else []) + ([QUICK_LOSS] if chosen & {"loss", "experiment"} else [])
    return [b for b in base if b not in dropped]


def train_command(tmp_path, *overrides, multirun=False, base=QUICK, root=True, script="train.py", cache=None):
    """(command, environment) running `script` from `tmp_path`, offline. Built backbones go to `cache`, by default
    the test session's shared cache (each tiny backbone is built once per session), or a folder of the test's own."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cache = Path(cache or os.environ["HANDCLIP_CACHE"])
    env = dict(os.environ, HANDCLIP_CACHE=str(cache), WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT)
    command = [
        sys.executable,
        "-u",
        str(ROOT / script),
        *(["-m"] if multirun else []),
        *_own_policy(base, overrides),
        *([f"paths.root={tmp_path}", f"paths.cache={cache}"] if root else []),
        *overrides,
    ]
    return command, env


def train(tmp_path, *overrides, multirun=False, check=True, base=QUICK, root=True, cache=None, process=False):
    """Run train.py with the quick demo's settings and `overrides`, in this process (or, with `process`, in a new
    one: for signals, kills and several processes); a `subprocess.CompletedProcess` either way."""
    command, env = train_command(tmp_path, *overrides, multirun=multirun, base=base, root=root, cache=cache)
    if process:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    else:
        result = run_in_process(command, tmp_path, env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_demo_run_end_to_end(tmp_path):
    result = train(tmp_path, "eval.ranked=5")
    (run,) = (tmp_path / "runs" / "demo").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    for key in (
        "baseline/val/rank1",
        "baseline/test/rank1",
        "val/rank1",
        "test/rank1",
        "test/mAP",
        "test/rank1_std",
        "test_all/rank1",
        "trainable_parameters",
    ):
        assert key in metrics, key
        if "rank" in key or "mAP" in key:
            assert 0.0 <= metrics[key] <= 1.0
    assert "freeze policy: last_n (vision_blocks=1, text_blocks=1)" in (run / "freeze.txt").read_text()
    assert "baseline (untrained)" in result.stdout and "trainable" in result.stdout
    # how the reported model was chosen, said on the console and kept: the epoch, WiSE-FT's mix and its curve
    assert f"selected epoch {metrics['selection/epoch']} by val/mAP (mean of 5)" in result.stdout
    saved = json.loads((run / "metrics.json").read_text())["wise_ft"]
    assert [row["alpha"] for row in saved["curve"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert metrics["wise_ft/alpha"] == saved["alpha"]
    # the trade-off figure needs a retention, which needs a prompt task the untrained model could do
    assert (run / "wise_ft.png").is_file() == any(row.get("zeroshot/retention") is not None for row in saved["curve"])
    assert (metrics["wise_ft/alpha"] == 1.0) != ("finetuned/test/rank1" in metrics)  # the unmixed scores, when mixed
    # each mix's validation gain with its interval, and the reported model's; the untrained model when none is clear
    assert all("val/mAP_gain_low" in row for row in saved["curve"] if row["alpha"] > 0)
    clear = [row["alpha"] for row in saved["curve"] if row["alpha"] > 0 and row["val/mAP_gain_low"] > 0]
    assert (metrics["wise_ft/alpha"] == 0.0) == (not clear)
    assert metrics["reported/val_gain_low"] <= metrics["reported/val_gain"] <= metrics["reported/val_gain_high"]
    baseline = json.loads((run / "baseline.json").read_text())
    assert len(baseline["per_query"]["val"]["mAP"]) == baseline["runs"]["val"][0]["queries"] > 0  # kept for resumes
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    # what the models retrieve: test queries' top 5 gallery images, and the captions' top 5 test images
    assert (run / "ranked.png").is_file() and (run / "ranked_text.png").is_file()
    assert (tmp_path / "data" / "synthetic_hands" / "10people_96x72_draw0" / "HandInfo.csv").is_file()


@pytest.mark.slow
def test_same_seed_same_numbers(tmp_path):
    train(tmp_path / "a", "eval.baseline=false", "eval.ranked=5")
    train(tmp_path / "b", "eval.baseline=false", "eval.ranked=0")  # no pictures of what it retrieves: the same numbers
    a, b = (json.loads(next((tmp_path / x / "runs").rglob("metrics.json")).read_text())["metrics"] for x in "ab")
    for key in ("val/rank1", "test/rank1", "test/mAP", "test_all/mAP"):
        assert a[key] == b[key], key
    assert [p.name for p in (tmp_path / "a" / "runs").rglob("ranked*.png")] != []
    assert [p.name for p in (tmp_path / "b" / "runs").rglob("ranked*.png")] == []


@pytest.mark.slow
def test_two_point_sweep(tmp_path):
    # as the README writes it: no paths given, everything lands under the starting directory
    train(tmp_path, "freeze.vision_blocks=0,2", "eval.baseline=false", multirun=True, root=False)
    (sweep,) = (tmp_path / "runs" / "sweeps" / "demo").iterdir()  # the sweep's own folder, named by its start
    counts = {}
    for run in [p for p in sweep.iterdir() if (p / "config.yaml").is_file()]:
        blocks = yaml.safe_load((run / "config.yaml").read_text())["freeze"]["vision_blocks"]
        payload = json.loads((run / "metrics.json").read_text())
        counts[blocks] = payload["metrics"]["trainable_parameters"]
        assert 0.0 <= payload["metrics"]["test/rank1"] <= 1.0
    assert set(counts) == {0, 2} and counts[2] > counts[0]


@pytest.mark.slow
def test_missing_real_data_stops_at_once_with_directions(tmp_path):
    result = train(tmp_path, "experiment=dorsal_hand", check=False, base=[])
    assert result.returncode != 0
    assert "11k does not exist" in result.stderr and "experiment=demo" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.pretrained
def test_pretrained_demo_backbone_knows_aspects_and_fine_tuning_clearly_beats_it(tmp_path, pretrained_cache):
    # the demo's own data and model (pretrained on first use) and epochs: a broken loss, text
    # pooling, optimiser or freeze policy shows up here as no gain
    train(tmp_path, "data.runs=3", base=["experiment=demo"], cache=pretrained_cache)
    metrics = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())["metrics"]
    # before any fine-tuning the pretrained model re-identifies better than a random one (Rank-1 about 8%)
    # and attribute prompts work on the test images: skin clearly; the aspect clearly above chance (0.25,
    # four classes; a zero-shot classifier has no prior over them, so chance is the reference, not the
    # majority class, which with 3 runs is the dorsal right queries at 45%), from back against palm
    # (left against right is not learned: see the README); measured here 0.34 and 0.71
    assert metrics["baseline/test/rank1"] > 0.25 and metrics["baseline/test/mAP"] > 0.45
    assert metrics["baseline/zeroshot/skin_accuracy"] > metrics["baseline/zeroshot/skin_majority"] + 0.2
    assert metrics["baseline/zeroshot/aspect_accuracy"] > 0.31
    assert metrics["baseline/zeroshot/dorsal_palmar_accuracy"] > 0.65
    assert metrics["test/rank1"] > metrics["baseline/test/rank1"] + 0.06
    assert metrics["test/mAP"] > metrics["baseline/test/mAP"] + 0.06
    assert metrics["val/rank1"] > metrics["baseline/val/rank1"]


@pytest.mark.slow
def test_hd_format_trains_through_the_same_path_with_tensorboard(tmp_path):
    # an HD-style folder (1-501, 502-712) made from synthetic hand images
    from handclip.data.synthetic import generate_hands

    source = tmp_path / "source"
    generate_hands(source, identities=8, seed=2, image_size=(96, 72), aspects=["dorsal right"])
    rows = (source / "HandInfo.csv").read_text().splitlines()[1:]
    subjects = {}
    for line in rows:
        person, image = line.split(",")[0], line.split(",")[7]
        if person not in subjects:  # 2 training subjects, 4 test subjects, 2 distractors
            subjects[person] = [3, 440, 448, 450, 460, 470, 505, 600][len(subjects)]
        subject = subjects[person]
        folder = tmp_path / "data" / "HD" / ("1-501" if subject <= 501 else "502-712")
        folder.mkdir(parents=True, exist_ok=True)
        count = len(list(folder.glob(f"{subject}_*.jpg")))
        (source / "Hands" / image).rename(folder / f"{subject}_{count}.jpg")
    base = [q for q in QUICK if not q.startswith("data.source")]
    train(tmp_path, "data=hd", "data.batch_size=4", "logger=tensorboard", "eval.baseline=false", base=base)
    (run,) = (tmp_path / "runs" / "demo").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["test/rank1"] <= 1 and "test_all/rank1" not in metrics
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_two_processes_gather_features_for_loss_and_validation(tmp_path):
    # DDP on the CPU (gloo): each process holds 4 pairs, the loss sees all 8; validation gathers every shard, so
    # with weights that do not move (lr 1e-12) it scores exactly what the single-process baseline scored
    probe = tmp_path / "probe.txt"
    command, env = train_command(
        tmp_path, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn", "data.batch_size=4",
        "run_name=ddp", "optim.lr=1e-12", "+loss.terms.probe={_target_: tests.batch_probe.BatchSizeProbe, weight: 0}",
    )  # fmt: skip
    env["HANDCLIP_PROBE"] = str(probe)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = [line.split() for line in probe.read_text().splitlines()]
    assert {rank for rank, _, _ in seen} == {"0", "1"}  # both processes computed the loss ...
    assert all(images == texts == "8" for _, images, texts in seen)  # ... over the global batch of 2 x 4
    metrics = json.loads((tmp_path / "runs" / "ddp" / "metrics.json").read_text())["metrics"]
    log = (tmp_path / "runs" / "ddp" / "logs" / "metrics.csv").read_text()
    assert "train/loss" in log
    logged = [float(v) for v in _column(log, "val/rank1")]
    assert logged and all(abs(v - metrics["baseline/val/rank1"]) < 1e-9 for v in logged), (logged, metrics)
    assert 0 <= metrics["test/rank1"] <= 1


def _column(csv_text: str, name: str) -> list[str]:
    import csv
    import io

    return [row[name] for row in csv.DictReader(io.StringIO(csv_text)) if row.get(name)]
