import csv
import json

import pytest
import yaml
from hydra import compose, initialize_config_dir

from handclip.train.sweep import collect_runs
from tests.test_config import CONF
from tests.test_train import train

pytestmark = pytest.mark.slow


def test_three_point_sweep_with_a_failing_point_writes_summary_and_resumes(tmp_path):
    # vision_blocks=9 exceeds the tiny model's depth: that point fails, the others go on
    first = train(tmp_path, "freeze.vision_blocks=0,1,9", "eval.baseline=false", multirun=True)
    sweep = tmp_path / "runs" / "sweeps" / "demo"
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    status = {row["freeze.vision_blocks"]: row["status"] for row in rows}
    assert status == {"0": "finished", "1": "finished", "9": "failed"}
    failed = next(r for r in rows if r["status"] == "failed")
    assert "vision_blocks=9 is out of range" in failed["error"]
    assert all(0 <= float(r["test/rank1"]) <= 1 for r in rows if r["status"] == "finished")
    assert (sweep / "summary.png").stat().st_size > 1000
    assert "sweep summary" in first.stdout
    # running the same sweep again does not repeat the finished points
    again = train(tmp_path, "freeze.vision_blocks=0,1,9", "eval.baseline=false", multirun=True)
    assert again.stdout.count("finished earlier, skipping") == 2
    swept, runs = collect_runs(sweep)
    assert swept == ["freeze.vision_blocks"] and len(runs) == 3
    # the same points with a setting left out of their folder names: not reused, and said so
    third = train(
        tmp_path, "freeze.vision_blocks=0,1", "eval.baseline=false", "trainer.max_epochs=3", multirun=True, check=False
    )
    assert third.returncode == 2  # now every point of the sweep has failed
    assert third.stderr.count("finished earlier with other settings (trainer.max_epochs: 2 -> 3") == 2
    assert "overwrite=true" in third.stderr and "finished earlier, skipping" not in third.stdout
    status = {r["freeze.vision_blocks"]: r["status"] for r in csv.DictReader(open(sweep / "summary.csv"))}
    assert status["0"] == status["1"] == "failed"


def test_a_sweep_whose_every_point_fails_exits_with_an_error(tmp_path):
    result = train(tmp_path, "freeze.vision_blocks=8,9", "eval.baseline=false", multirun=True, check=False)
    assert result.returncode == 2 and "every point of the sweep failed" in result.stderr
    rows = list(csv.DictReader(open(tmp_path / "runs" / "sweeps" / "demo" / "summary.csv")))
    assert {r["freeze.vision_blocks"] for r in rows} == {"8", "9"} and {r["status"] for r in rows} == {"failed"}


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
    sweep = tmp_path / "runs" / "sweeps" / "demo_optuna"
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
    train(tmp_path, "experiment=demo,demo_siglip", "eval.baseline=false", "trainer.max_epochs=1", multirun=True,
          base=base)  # fmt: skip
    (summary,) = (tmp_path / "runs" / "sweeps").rglob("summary.csv")
    points = sorted(p.name for p in summary.parent.iterdir() if p.is_dir())
    assert [p.split(",")[0] for p in points] == ["experiment=demo", "experiment=demo_siglip"]
    assert [p.name for p in (tmp_path / "runs" / "sweeps").iterdir()] == [summary.parent.name]  # one sweep folder
    rows = list(csv.DictReader(open(summary)))
    assert [r["status"] for r in rows] == ["finished", "finished"]
    names = {yaml.safe_load((summary.parent / p / "config.yaml").read_text())["name"] for p in points}
    assert names == {"demo", "demo_siglip"}
