import csv
import json
import re
import time

import pytest
import yaml
from hydra import compose, initialize_config_dir

from handclip.train.sweep import collect_runs
from tests.test_config import CONF
from tests.test_train import train

pytestmark = pytest.mark.slow


def sweeps_of(tmp_path, name="demo") -> list:
    """The folders of the sweeps of experiment `name`, one per sweep (runs/sweeps/<name>/<sweep>), in name order."""
    return sorted(p for p in (tmp_path / "runs" / "sweeps" / name).iterdir() if p.is_dir())


def test_three_point_sweep_with_a_failing_point_writes_summary_and_resumes(tmp_path):
    # vision_blocks=9 exceeds the tiny model's depth: that point fails, the others go on
    first = train(tmp_path, "freeze.vision_blocks=0,1,9", "eval.baseline=false", "sweep_name=depth", multirun=True)
    sweep = tmp_path / "runs" / "sweeps" / "demo" / "depth"
    assert f"sweep folder: {sweep}" in first.stdout
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    status = {row["freeze.vision_blocks"]: row["status"] for row in rows}
    assert status == {"0": "finished", "1": "finished", "9": "failed"}
    failed = next(r for r in rows if r["status"] == "failed")
    assert "vision_blocks=9 is out of range" in failed["error"]
    assert all(0 <= float(r["test/rank1"]) <= 1 for r in rows if r["status"] == "finished")
    assert (sweep / "summary.png").stat().st_size > 1000
    assert "sweep summary" in first.stdout
    # running the same sweep again does not repeat the finished points
    again = train(tmp_path, "freeze.vision_blocks=0,1,9", "eval.baseline=false", "sweep_name=depth", multirun=True)
    assert again.stdout.count("finished earlier, skipping") == 2
    swept, runs = collect_runs(sweep)
    assert swept == ["freeze.vision_blocks"] and len(runs) == 3
    # the same points with a setting left out of their folder names: not reused, and said so
    third = train(tmp_path, "freeze.vision_blocks=0,1", "eval.baseline=false", "trainer.max_epochs=3",
                  "sweep_name=depth", multirun=True, check=False)  # fmt: skip
    assert third.returncode == 2  # now every point of the sweep has failed
    assert third.stderr.count("finished earlier with other settings (trainer.max_epochs: 2 -> 3") == 2
    assert "overwrite=true" in third.stderr and "finished earlier, skipping" not in third.stdout
    assert [p.name for p in sweeps_of(tmp_path)] == ["depth"]  # a named sweep keeps to its one folder
    status = {r["freeze.vision_blocks"]: r["status"] for r in csv.DictReader(open(sweep / "summary.csv"))}
    assert status["0"] == status["1"] == "failed"


def test_a_sweep_whose_every_point_fails_exits_with_an_error(tmp_path):
    result = train(tmp_path, "freeze.vision_blocks=8,9", "eval.baseline=false", multirun=True, check=False)
    assert result.returncode == 2 and "every point of the sweep failed" in result.stderr
    (sweep,) = sweeps_of(tmp_path)
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert {r["freeze.vision_blocks"] for r in rows} == {"8", "9"} and {r["status"] for r in rows} == {"failed"}


def test_a_sweep_whose_every_point_is_refused_by_config_validation_exits_2(tmp_path):
    result = train(tmp_path, "ema.decay=1.5,2", "trainer.max_epochs=1", multirun=True, check=False)
    assert result.returncode == 2 and "every point of the sweep failed" in result.stderr
    assert "ema.decay=1.5 must be a number in (0, 1)" in result.stderr


def test_a_named_sweep_rerun_whose_every_new_point_fails_exits_2_and_keeps_the_earlier_points(tmp_path):
    # the folder holds an earlier command's finished point; this command's points all fail: that is a failed sweep
    # (it exited 0: the folder's summary was not all failures)
    quick = ["eval.baseline=false", "eval.test=false", "trainer.max_epochs=1", "sweep_name=s"]
    train(tmp_path, *quick, "freeze.vision_blocks=0", multirun=True)
    result = train(tmp_path, *quick, "freeze.vision_blocks=8,9", multirun=True, check=False)
    assert result.returncode == 2 and "every point of the sweep failed" in result.stderr
    rows = csv.DictReader(open(sweeps_of(tmp_path)[0] / "summary.csv"))
    status = {r["freeze.vision_blocks"]: r["status"] for r in rows}
    assert status == {"0": "finished", "8": "failed", "9": "failed"}


def test_two_sweeps_of_one_experiment_keep_to_folders_of_their_own(tmp_path):
    # they shared runs/sweeps/demo: the second's summary covered both sweeps' points, and the second (another
    # trainer.max_epochs) marked the first's finished point as failed
    quick = ["eval.baseline=false", "eval.test=false", "freeze.vision_blocks=0,1"]
    first = train(tmp_path, *quick, "trainer.max_epochs=1", multirun=True)
    time.sleep(1.1)  # a sweep's folder is named by the second it started
    second = train(tmp_path, *quick, "trainer.max_epochs=2", multirun=True)
    sweeps = sweeps_of(tmp_path)
    assert len(sweeps) == 2 and all(re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", p.name) for p in sweeps)
    for result, sweep, epochs in zip((first, second), sweeps, (1, 2), strict=True):
        assert result.stdout.count(f"sweep folder: {sweep}") == 1
        rows = list(csv.DictReader(open(sweep / "summary.csv")))
        assert [r["status"] for r in rows] == ["finished", "finished"] and all(r["error"] == "" for r in rows)
        configs = [yaml.safe_load((p / "config.yaml").read_text()) for p in sweep.iterdir() if p.is_dir()]
        assert [c["trainer"]["max_epochs"] for c in configs] == [epochs, epochs]
        assert {c["sweep"]["name"] for c in configs} == {f"demo/{sweep.name}"}  # wandb's group: the one sweep
    assert "finished earlier" not in second.stdout + second.stderr
    assert not list((tmp_path / "runs").rglob("failed.json"))


def test_a_sweep_folder_given_with_hydra_sweep_dir_is_used_as_it_is(tmp_path):
    mine = tmp_path / "elsewhere" / "mine"
    result = train(tmp_path, "eval.baseline=false", "eval.test=false", "trainer.max_epochs=1", "seed=0,1",
                   f"hydra.sweep.dir={mine}", multirun=True)  # fmt: skip
    assert f"sweep folder: {mine}" in result.stdout and (mine / "runs.csv").is_file()
    assert len(list(mine.glob("*/metrics.json"))) == 2 and not (tmp_path / "runs" / "sweeps").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sweep_name=../x", "seed=0,1"], "sweep_name='../x' must be a relative name inside paths.runs"),
        (["sweep_name=a,b"], "sweep_name names the one folder of a sweep: give one name, not several"),
        (["sweep_name=a", "hydra.sweep.dir=elsewhere", "seed=0,1"], "sweep_name=a and hydra.sweep.dir both name"),
    ],
    ids=["leaves runs", "swept", "and hydra.sweep.dir"],
)
def test_a_sweep_name_that_cannot_name_the_folder_is_refused_before_anything_is_written(tmp_path, overrides, message):
    result = train(tmp_path, *overrides, multirun=True, check=False)
    assert result.returncode == 2 and f"error: {message}" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "elsewhere").exists()


def test_sweep_name_in_a_single_run_is_refused_not_ignored(tmp_path):
    result = train(tmp_path, "sweep_name=mine", check=False)
    assert result.returncode == 2
    assert "error: sweep_name=mine names a sweep's folder, and this is one run" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_optuna_search_runs_and_maximises_validation(tmp_path):
    train(
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "eval.baseline=false",
        "eval.test=false",
        "trainer.max_epochs=1",
        multirun=True,
    )
    (sweep,) = sweeps_of(tmp_path, "demo_optuna")
    assert len(list(sweep.glob("*/metrics.json"))) == 2
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # the sweeper was told to maximise validation Rank-1, and reports the best trial's value of it
    scores = [json.loads(p.read_text())["metrics"]["val/rank1"] for p in sweep.glob("*/metrics.json")]
    assert results["best_value"] == pytest.approx(max(scores))
    assert "test/rank1" not in json.loads(next(sweep.glob("*/metrics.json")).read_text())["metrics"]
    assert (sweep / "summary.csv").is_file()


def test_slurm_launcher_config_composes(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=dorsal_hand", "launcher=slurm", f"paths.root={tmp_path}"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1


def test_a_sweep_over_experiments_gives_each_its_own_point(tmp_path):
    # the experiment is left out of folder names (a run's name says it); swept, it must be in each point's folder,
    # or every experiment after the first found "its" folder finished with other settings and was refused
    from tests.test_train import QUICK

    base = ["data=synthetic", *(q for q in QUICK if q != "experiment=demo")]  # Hydra checks these without the sweep
    train(tmp_path, "experiment=demo,demo_siglip_loss", "eval.baseline=false", "trainer.max_epochs=1", multirun=True,
          base=base)  # fmt: skip
    (summary,) = (tmp_path / "runs" / "sweeps").rglob("summary.csv")
    points = sorted(p.name for p in summary.parent.iterdir() if p.is_dir())
    assert [p.split(",")[0] for p in points] == ["experiment=demo", "experiment=demo_siglip_loss"]
    assert [p.name for p in (tmp_path / "runs" / "sweeps").iterdir()] == [summary.parent.parent.name]  # one sweep
    rows = list(csv.DictReader(open(summary)))
    assert [r["status"] for r in rows] == ["finished", "finished"]
    names = {yaml.safe_load((summary.parent / p / "config.yaml").read_text())["name"] for p in points}
    assert names == {"demo", "demo_siglip_loss"}


CAPTION_METRICS = {  # what a run on caption data (data=captions) holds in metrics.json: no aspects, no zero-shot
    "trainable_parameters": 108417, "val/rank1": 0.67, "test/rank1": 0.875, "test/rank1_std": 0.18, "test/mAP": 0.94,
    "test/mAP_std": 0.09, "train_time_s": 4.7, "baseline/test/rank1": 0.8, "retrieval/text_to_image_R@10": 1.0,
    "retrieval/image_to_text_R@1": 0.17, "retrieval/image_to_text_R@10": 1.0, "retrieval/image_to_text_R@5": 0.83,
    "retrieval/text_to_image_R@1": 0.25, "retrieval/text_to_image_R@5": 0.8,
    "baseline/retrieval/image_to_text_R@1": 0.1,
}  # fmt: skip


def _finished(folder, lr, metrics):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": lr}, "data": {"draw": 0}}))
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics}))


def test_a_caption_sweeps_summary_shows_its_retrieval_recalls_and_no_hand_columns(tmp_path, capsys, monkeypatch):
    # its columns were the hand data's: zero-shot and merged-gallery columns all "-", no retrieval, "same-aspect"
    from handclip.train.sweep import markdown_table, write_summary

    monkeypatch.setenv("COLUMNS", "200")  # the printed table's headings whole
    _finished(tmp_path / "lr=1e-4", 1e-4, CAPTION_METRICS)
    _finished(tmp_path / "lr=2e-4", 2e-4, {**CAPTION_METRICS, "retrieval/image_to_text_R@1": 0.33})
    csv_path, _ = write_summary(tmp_path)
    fields = next(csv.reader(open(csv_path)))
    recalls = [f"retrieval/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    assert fields == ["run", "optim.lr", "status", "trainable_parameters", "val/rank1", "test/rank1", "test/rank1_std",
                      "test/mAP", "test/mAP_std", "train_time_s", "baseline/test/rank1", *recalls, "error"]  # fmt: skip
    rows = list(csv.DictReader(open(csv_path)))
    assert [float(r["retrieval/image_to_text_R@1"]) for r in rows] == [0.17, 0.33]
    out = capsys.readouterr().out
    assert "same-aspect" not in out and "zero-shot" not in out
    assert "sweep summary (test: queries against each run's gallery, mean ± std over runs)" in out
    _, runs = collect_runs(tmp_path)
    head = markdown_table(["optim.lr"], runs).splitlines()[0]
    assert head == "| run | optim.lr | trainable | train s | test R1 | test mAP | image→text R@1 | text→image R@1 |"


def test_a_hand_sweeps_summary_keeps_its_columns_in_their_order(tmp_path, capsys, monkeypatch):
    from handclip.train.sweep import COLUMNS, write_summary

    monkeypatch.setenv("COLUMNS", "200")
    hand = {key: 0.5 for key in COLUMNS if key != "status"}
    _finished(tmp_path / "lr=1e-4", 1e-4, hand)
    _finished(tmp_path / "lr=2e-4", 2e-4, {k: v for k, v in hand.items() if not k.startswith("zeroshot/")})
    fields = next(csv.reader(open(write_summary(tmp_path)[0])))
    assert fields == ["run", "optim.lr", *COLUMNS, "error"]
    out = capsys.readouterr().out
    assert "sweep summary (test: same-aspect gallery, mean ± std over runs)" in out and "zero-shot" in out
