"""Weight averaging: the EMA a run keeps, model soups from a sweep, and the model card of every export."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from handclip.errors import HandClipError
from handclip.export import export, load_run_model
from handclip.io import load_checkpoint_file
from handclip.model.averaging import average_states
from handclip.tools.soup import soup
from tests.test_train import train

EMA = ["eval.baseline=false", "run_name=r", "trainer.max_epochs=3", "ema.decay=0.8"]


def test_average_of_one_state_is_that_state_and_of_two_their_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "ids": torch.tensor([0, 1])}
    b = {"w": torch.tensor([3.0, 6.0]), "ids": torch.tensor([5, 5])}
    assert torch.equal(average_states([a])["w"], a["w"])
    mean = average_states([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and torch.equal(mean["ids"], a["ids"])


def _point(sweep, name, **changes):
    """A finished sweep point on disk (config, metrics, a best checkpoint file) without training; `changes` name
    settings by their path with `__` (`data__source__identities=12`)."""
    config = {"backbone": {"_target_": "handclip.model.HuggingFaceCLIP", "name": "tiny", "source": "tiny"},
              "projection": {"_target_": "handclip.model.projection.Keep"},
              "freeze": {"_target_": "handclip.model.freeze.LastN", "vision_blocks": 2},
              "data": {"draw": 0,
                       "source": {"_target_": "handclip.data.sources.SyntheticHands", "identities": 10}}}  # fmt: skip
    for key, value in changes.items():
        *sections, setting = key.split("__")
        tree = config
        for section in sections:
            tree = tree[section]
        tree[setting] = value
    (sweep / name / "checkpoints").mkdir(parents=True)
    (sweep / name / "checkpoints" / "best.ckpt").write_bytes(b"")
    (sweep / name / "config.yaml").write_text(yaml.safe_dump(config))
    (sweep / name / "metrics.json").write_text(json.dumps({"metrics": {"val/rank1": 0.5}}))


def test_a_soup_of_points_with_different_backbones_is_refused_naming_point_and_setting(tmp_path):
    # (points whose adapters differ: tests/test_tool_safety.py)
    _point(tmp_path / "s", "a")
    _point(tmp_path / "s", "b", backbone__source="openai/clip-vit-base-patch32")
    with pytest.raises(HandClipError, match=r"b cannot go in a soup with a: backbone\.source differs"):
        soup(tmp_path / "s", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data__draw": 1}, "data.draw differs (1 vs 0)"),
        ({"data__source__identities": 12}, "data.source.identities differs (12 vs 10)"),
        ({"data__source___target_": "handclip.data.sources.CaptionCSV"},
         "data.source._target_ differs ('handclip.data.sources.CaptionCSV' vs 'handclip.data.sources.SyntheticHands')"),
    ],
    ids=["draw", "source setting", "source"],
)  # fmt: skip
def test_a_soup_of_points_trained_on_other_data_is_refused_in_one_line_writing_nothing(tmp_path, capsys, change,
                                                                                        message):  # fmt: skip
    # such soups were averaged without a word
    from handclip.tools.export import main

    _point(tmp_path / "s", "a")
    _point(tmp_path / "s", "b", **change)
    with pytest.raises(SystemExit) as stop:
        main(["--soup", str(tmp_path / "s"), str(tmp_path / "out")])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"error: b cannot go in a soup with a: {message}; a soup averages models trained on the same data"
    assert not (tmp_path / "out").exists()


def test_a_soup_of_an_experiments_folder_of_sweeps_is_refused_naming_one_sweep(tmp_path):
    _point(tmp_path / "demo" / "2025-01-01_10-00-00", "a")
    _point(tmp_path / "demo" / "2025-01-02_10-00-00", "a", data__draw=1)
    with pytest.raises(HandClipError, match=r"holds sweeps \(2\), not a sweep's points: give one of them, e\.g\. .*"
                                            r"demo/2025-01-02_10-00-00$"):  # fmt: skip
        soup(tmp_path / "demo", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ema_decay_out_of_range_is_refused_with_the_key_and_allowed_values():
    from handclip.train.config import check_decay

    assert check_decay(None) is None and check_decay(0.998) == 0.998
    for bad in (1.5, 0, True, "0.9"):
        with pytest.raises(HandClipError, match=r"ema.decay=.* must be a number in \(0, 1\) \(e.g. 0.998\), or null"):
            check_decay(bad)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    train(root, *EMA)
    return root / "runs" / "r"


@pytest.mark.slow
def test_ema_is_validated_saved_and_tested_beside_the_raw_weights(ema_run):
    payload = json.loads((ema_run / "metrics.json").read_text())
    metrics = payload["metrics"]
    assert payload["weights"] == "ema"
    for key in ("test/rank1", "raw/test/rank1", "raw/val/rank1", "test_all/mAP", "raw/test_all/mAP"):
        assert 0.0 <= metrics[key] <= 1.0, key
    history = (ema_run / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "ema/val/rank1" in history and "val/rank1" in history
    best = load_checkpoint_file(ema_run / "checkpoints" / "best.ckpt")
    averaged, raw = best["ema"]["state"], best["state_dict"]
    # only what trains has an average: the frozen embeddings have none, the top block has one
    assert not any("embeddings" in name for name in averaged)
    assert any("encoder.layers.1." in name for name in averaged)
    assert any(not torch.equal(averaged[n], raw[n]) for n in averaged)
    ema, _ = load_run_model(ema_run)
    plain, _ = load_run_model(ema_run, weights="raw")
    name = next(n for n in averaged if not torch.equal(averaged[n], raw[n]))
    short = name.removeprefix("backbone.")
    assert torch.equal(ema.state_dict()[short], averaged[name]) and torch.equal(plain.state_dict()[short], raw[name])


@pytest.mark.slow
def test_export_carries_a_model_card_naming_policy_objective_and_test_numbers(ema_run, tmp_path):
    out = export(ema_run, tmp_path / "model")
    card = (out / "README.md").read_text()
    metrics = json.loads((ema_run / "metrics.json").read_text())["metrics"]
    loaded = ModelCard.load(out / "README.md")  # the hub's own reader
    assert loaded.data.library_name == "transformers" and "hand-re-identification" in loaded.data.tags
    assert loaded.data.datasets == ["synthetic_hands"] and "base_model" not in loaded.data.to_dict()  # built here
    reported = {r.metric_type: r for r in loaded.data.eval_results}
    assert reported["test/rank1"].metric_value == round(metrics["test/rank1"], 4)
    assert "same-aspect gallery" in reported["test/rank1"].metric_config
    assert "gallery merged over aspects" in reported["test_all/mAP"].metric_config
    assert not any(key.startswith("retrieval/") for key in reported)  # hands lead with re-identification
    assert "fine-tuned with HandCLIP for hand-based person re-identification on `synthetic_hands`" in card
    sizes = json.loads(Path(json.loads((ema_run / "metrics.json").read_text())["manifest"]).with_suffix(".json")
                       .read_text())["sizes"]  # fmt: skip
    assert f"- training: {sizes['train']['identities']} identities, {sizes['train']['images']} images" in card
    assert "freeze policy: last_n (vision_blocks=1, text_blocks=1)" in card
    assert "`clip`: ContrastiveLoss (weight=1.0" in card
    assert "same-aspect gallery" in card and "gallery merged over aspects" in card
    assert f"{100 * metrics['test/rank1']:.1f} ± {100 * metrics['test/rank1_std']:.1f}" in card
    assert "exponential moving average of the trained weights (decay 0.8)" in card
    assert "CLIPModel.from_pretrained" in card
    raw = export(ema_run, tmp_path / "raw", weights="raw")
    assert "the raw trained weights" in (raw / "README.md").read_text()
    a, b = load_file(out / "model.safetensors"), load_file(raw / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the default export is the EMA, not the raw weights


@pytest.mark.slow
def test_a_soup_of_a_one_point_sweep_equals_that_points_export(ema_run, tmp_path):
    sweep = tmp_path / "sweeps" / "one"
    sweep.mkdir(parents=True)
    (sweep / "r").symlink_to(ema_run, target_is_directory=True)
    # a soup averages the points' selected weights, unmixed: the export of those (the run reported a WiSE-FT mix)
    alone, souped = export(ema_run, tmp_path / "alone", alpha=1.0), soup(sweep, tmp_path / "soup")
    a, b = load_file(alone / "model.safetensors"), load_file(souped / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = (souped / "README.md").read_text()
    assert "a model soup: the average of these runs' weights" in card and "| r |" in card


@pytest.mark.slow
def test_a_run_with_an_ema_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    from tests.test_resume import kill_once_written

    train(tmp_path / "whole", *EMA)
    last = tmp_path / "split" / "runs" / "r" / "checkpoints" / "last.ckpt"
    kill_once_written(tmp_path / "split", last, *EMA)
    assert load_checkpoint_file(last)["epoch"] < 2
    refused = train(tmp_path / "split", *EMA[:-1], "ema.decay=0.9", "ckpt_path=last", check=False)
    assert refused.returncode != 0 and "it kept its EMA with ema.decay=0.8" in refused.stderr
    train(tmp_path / "split", *EMA, "ckpt_path=last")
    whole, split = (load_checkpoint_file(p / "runs" / "r" / "checkpoints" / "last.ckpt")["ema"] for p in
                    (tmp_path / "whole", tmp_path / "split"))  # fmt: skip
    assert whole["updates"] == split["updates"]
    for name, tensor in whole["state"].items():
        assert torch.allclose(tensor, split["state"][name], atol=1e-6), name
    scores = [json.loads((p / "runs" / "r" / "metrics.json").read_text())["metrics"] for p in
              (tmp_path / "whole", tmp_path / "split")]  # fmt: skip
    for key in ("test/rank1", "raw/test/rank1"):
        assert scores[1][key] == pytest.approx(scores[0][key], abs=1e-6), key


@pytest.mark.slow
def test_a_soup_of_two_seeds_scores_on_validation_at_least_as_well_as_the_worse(tmp_path):
    from transformers import CLIPModel

    from handclip.model.hf import HFBackbone
    from handclip.tools.soup import _validation

    train(tmp_path, "seed=0,1", "eval.baseline=false", "eval.test=false", "trainer.max_epochs=3", multirun=True)
    (sweep,) = (tmp_path / "runs" / "sweeps" / "demo").iterdir()
    points = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(points) == 2
    uniform, greedy = soup(sweep, tmp_path / "uniform"), soup(sweep, tmp_path / "greedy", greedy=True)
    config = yaml.safe_load((points[0] / "config.yaml").read_text())
    score = _validation(config)
    backbone, _ = load_run_model(points[0])
    own = []
    for point in points:
        own.append(score(load_run_model(point)[0]))
    results = {}
    for name, folder in (("uniform", uniform), ("greedy", greedy)):
        results[name] = score(HFBackbone(CLIPModel.from_pretrained(folder), None, backbone.image_processor))
    assert results["uniform"] >= min(own), (results, own)
    assert results["greedy"] >= max(own), (results, own)
