"""A run that trained but reports (close to) the untrained model says so at its end and in metrics.json."""

import json

import pytest
from huggingface_hub import ModelCard

from handclip.train.final import TrainingFacts, closing_warnings, first_unfreeze
from tests.test_train import QUICK, train

GAINED = {"selection/epoch": 3, "wise_ft/alpha": 0.5}
BASELINE = {"val/mAP": 0.40}


def test_a_run_that_trained_and_gained_has_no_warnings():
    facts = TrainingFacts("val/mAP", [[0.41, 0.45, 0.52, 0.55]], first_unfreeze=2, unfroze_at=2)
    assert closing_warnings(GAINED, BASELINE, facts) == []
    assert closing_warnings({"selection/epoch": 1}, None, TrainingFacts("val/mAP", [[0.5]])) == []


@pytest.mark.parametrize(
    ("metrics", "facts", "expected"),
    [
        ({"selection/epoch": 0}, TrainingFacts("val/mAP", [[0.5, 0.45]]), ["selected checkpoint is from epoch 0"]),
        (GAINED, TrainingFacts("val/mAP", [[0.40, 0.38]]), ["never beat the untrained model on validation"]),
        (GAINED, TrainingFacts("val/mAP", [[0.30], [0.40]]), ["never beat"]),  # neither the raw nor the EMA's
        (GAINED, TrainingFacts("val/mAP", [[0.5]], first_unfreeze=2), ["schedule never unfroze anything"]),
        ({"selection/epoch": 1}, TrainingFacts("val/mAP", [[0.5]], first_unfreeze=2, unfroze_at=2),
         ["(epoch 1) is from before the freeze schedule first unfroze more (epoch 2)"]),
        ({**GAINED, "wise_ft/alpha": 0.0}, TrainingFacts("val/mAP", [[0.5]]), ["WiSE-FT reports the untrained model"]),
    ],
)  # fmt: skip
def test_each_warning_appears_alone_when_its_case_holds(metrics, facts, expected):
    found = closing_warnings(metrics, BASELINE, facts)
    assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found, strict=True)), found


def test_the_first_unfreeze_of_each_schedule():
    from handclip.model.freeze import Frozen, LastN
    from handclip.model.schedule import Gradual, Staged

    assert first_unfreeze(Staged({0: Frozen(), 10: LastN(4, 4)}), 12) == 10
    assert first_unfreeze(Staged({0: Frozen(), 10: LastN(4, 4)}), 5) is None
    assert first_unfreeze(Gradual(Frozen(), every=2), 5) == 2
    assert first_unfreeze(LastN(1, 1), 5) is None  # a policy that never changes


def _payload(tmp_path, name):
    return json.loads((tmp_path / "runs" / name / "metrics.json").read_text())


@pytest.mark.slow
def test_a_caption_run_that_does_not_learn_says_so_and_its_card_repeats_it(tmp_path):
    from handclip.tools.export import export
    from tests.test_prepare import caption_folder

    folder = caption_folder(tmp_path / "data" / "captions", split=lambda n: "test" if n >= 18 else "train")
    base = [q for q in QUICK if not q.startswith("data.source")]
    result = train(tmp_path, "data=captions", f"data.source.root={folder}", "data.batch_size=4", "optim.lr=1e-12",
                   "eval.ranked=0", "run_name=still", base=base)  # fmt: skip
    warned = _payload(tmp_path, "still")["warnings"]
    assert len(warned) == 3, warned
    assert "selected checkpoint is from epoch 0" in warned[0] and "never beat the untrained model" in warned[1]
    assert "WiSE-FT reports the untrained model" in warned[2]
    tail = " ".join(result.stdout.split("done in")[-1].split())  # the closing lines, rewrapped
    assert tail.count("warning:") == 3 and "never beat the untrained model on validation" in tail
    card = ModelCard.load(export(tmp_path / "runs" / "still", tmp_path / "model") / "README.md")
    assert "image-text-retrieval" in card.data.tags and card.data.datasets == ["captions"]
    assert "**Caveats**" in card.text and warned[1] in card.text


@pytest.mark.slow
def test_a_schedule_that_training_never_reaches_is_named(tmp_path):
    # the schedule's unfreeze epoch is within max_epochs (so the config is accepted), but max_steps ends training
    # in the first epoch
    overrides = ["freeze=gradual", "trainer.max_epochs=3", "+trainer.max_steps=1", "eval.wise_ft=null",
                 "eval.ranked=0", "eval.text=false", "run_name=short"]  # fmt: skip
    result = train(tmp_path, *overrides)
    warned = _payload(tmp_path, "short")["warnings"]
    assert any("freeze schedule never unfroze anything: it first trains more at epoch 2" in w for w in warned), warned
    assert not any("WiSE-FT" in w for w in warned)
    assert "schedule never unfroze anything" in " ".join(result.stdout.split())


def test_caption_data_brings_a_recipe_that_trains_and_the_command_line_still_wins(tmp_path):
    from tests.test_config import compose_plain

    captions = compose_plain(tmp_path, "data=captions")
    assert (captions["optim"]["lr"], captions["trainer"]["max_epochs"]) == (1.0e-4, 10)
    mine = compose_plain(tmp_path, "data=captions", "optim.lr=3e-5", "trainer.max_epochs=4")
    assert (mine["optim"]["lr"], mine["trainer"]["max_epochs"]) == (3e-5, 4)
    hands = compose_plain(tmp_path, "data=hands11k")
    assert (hands["optim"]["lr"], hands["trainer"]["max_epochs"]) == (1.0e-5, 5)  # the hand recipe stays
    demo = compose_plain(tmp_path, "experiment=demo")
    assert (demo["optim"]["lr"], demo["trainer"]["max_epochs"]) == (1.0e-3, 80)


@pytest.mark.slow
def test_a_bn_neck_run_that_reports_the_untrained_model_reports_its_scores_exactly(tmp_path):
    # weights that do not move (lr 1e-12): no mix gains, so WiSE-FT reports the untrained model; its mix at 0 holds
    # the starting backbone but the BN-neck whose running statistics training moved, which would score neither
    # model: the baseline's numbers stand
    pk = ["data.sampler=identity_balanced", "data.identities_per_batch=4", "data.images_per_identity=2"]
    train(tmp_path, "loss=strong", "eval.feature=bnneck", *pk, "optim.lr=1e-12", "run_name=n")
    metrics = _payload(tmp_path, "n")["metrics"]
    assert metrics["wise_ft/alpha"] == 0.0
    for key in ("test/rank1", "test/mAP", "test_all/rank1", "val/mAP"):
        assert metrics[key] == metrics[f"baseline/{key}"], key
    assert "finetuned/test/rank1" in metrics  # the unmixed weights' scores stay on record
