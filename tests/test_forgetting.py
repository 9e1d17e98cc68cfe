"""Retention and WiSE-FT's choice of mixing ratio: the numbers a user reads after every run."""

import pytest
import torch

from handclip.errors import ConfigError
from handclip.eval.forgetting import WiseFT, choose_alpha, interpolate, retention
from handclip.train.final import choice_line


def _zeroshot(aspect, skin, gender):
    return {"zeroshot/aspect_accuracy": aspect, "zeroshot/aspect_chance": 0.25,
            "zeroshot/skin_accuracy": skin, "zeroshot/skin_chance": 0.25,
            "zeroshot/gender_accuracy": gender, "zeroshot/gender_chance": 0.5}  # fmt: skip


def test_retention_is_the_mean_share_of_skill_above_chance_kept_over_tasks_the_baseline_could_do():
    baseline = _zeroshot(aspect=0.45, skin=0.65, gender=0.52)  # gender: 2 points above chance, nothing to retain
    final = _zeroshot(aspect=0.35, skin=0.65, gender=0.30)
    # aspect keeps (0.35 - 0.25) / (0.45 - 0.25) = 0.5, skin 1.0; gender is left out
    assert retention(baseline, final) == pytest.approx(0.75)
    assert retention(baseline, baseline) == pytest.approx(1.0)
    assert retention(_zeroshot(0.26, 0.27, 0.5), final) is None  # no task above chance: no figure, not 0 or NaN


def test_wise_ft_keeps_the_smallest_ratio_with_enough_of_the_validation_gain():
    scores = {0.0: 0.40, 0.25: 0.44, 0.5: 0.47, 0.75: 0.49, 1.0: 0.50}
    assert choose_alpha(scores, keep=0.8) == 0.75  # 0.09 of 0.10
    assert choose_alpha(scores, keep=0.65) == 0.5
    assert choose_alpha(scores, keep=1.0) == 1.0


def test_wise_ft_without_a_validation_gain_reports_the_ratio_that_validates_best():
    # fine-tuning lost on validation: the initial model is reported, not the weights that lost
    assert choose_alpha({0.0: 0.40, 0.5: 0.39, 1.0: 0.35}, keep=0.8) == 0.0
    # ... unless a mix beats it
    assert choose_alpha({0.0: 0.40, 0.5: 0.43, 1.0: 0.38}, keep=0.8) == 0.5


def test_wise_ft_counts_only_the_gains_validation_tells_from_noise():
    scores = {0.0: 0.40, 0.25: 0.44, 0.5: 0.47, 0.75: 0.49, 1.0: 0.50}
    assert choose_alpha(scores, keep=0.8, beyond_noise={0.75, 1.0}) == 0.75
    assert choose_alpha(scores, keep=0.8, beyond_noise={1.0}) == 1.0  # 0.75 gains enough, but within noise
    # alpha 1 within noise, a mix beyond it: the best of those beyond noise
    assert choose_alpha(scores, keep=0.8, beyond_noise={0.25, 0.5}) == 0.5
    # no gain beyond noise: the initial model, however large the gain looks
    assert choose_alpha(scores, keep=0.8, beyond_noise=set()) == 0.0


def test_paired_gain_is_scipys_bootstrap_interval_of_the_mean_difference_over_queries():
    import numpy as np
    from scipy.stats import bootstrap

    from handclip.eval.significance import RESAMPLES, SEED, paired_gain

    rng = np.random.default_rng(0)
    initial = rng.uniform(0, 1, 32)
    clear = paired_gain(initial + 0.2 + rng.normal(0, 0.05, 32), initial)  # every query better
    noise = paired_gain(initial + rng.normal(0, 0.3, 32), initial)  # as many better as worse
    assert clear.beyond_noise and clear.low > 0.15 and clear.queries == 32
    assert not noise.beyond_noise and noise.low < 0 < noise.high
    difference = (initial + rng.normal(0.05, 0.2, 32)) - initial
    expected = bootstrap((difference,), np.mean, n_resamples=RESAMPLES, method="percentile", random_state=SEED)
    found = paired_gain(initial + difference, initial)
    assert (found.low, found.high) == pytest.approx(tuple(expected.confidence_interval))
    assert found.mean == pytest.approx(difference.mean())
    assert paired_gain([0.5, 0.7], [0.5, 0.7]).low == 0.0  # no difference at all: no gain, not a NaN interval
    with pytest.raises(ValueError, match="same queries"):
        paired_gain([0.5, 0.7], [0.5])


def test_validation_gain_reads_the_per_query_scores_an_evaluation_keeps():
    from handclip.eval.significance import validation_gain

    tuned = {"per_query": {"val": {"mAP": [1.0, 1.0, 0.5, 1.0], "rank1": [1, 1, 0, 1]}}}
    initial = {"per_query": {"val": {"mAP": [0.5, 0.5, 0.5, 0.5], "rank1": [0, 1, 0, 0]}}}
    assert validation_gain(tuned, initial, "val/mAP").mean == pytest.approx(0.375)
    assert validation_gain(tuned, initial, "val/rank1").mean == pytest.approx(0.5)
    assert validation_gain(tuned, {"metrics": {}}, "val/mAP") is None  # a baseline.json from before: no figure


def test_interpolation_ends_at_the_two_models_and_leaves_integer_tensors_alone():
    initial = {"w": torch.zeros(3), "ids": torch.tensor([1, 2])}
    tuned = {"w": torch.full((3,), 2.0), "ids": torch.tensor([1, 2])}
    assert torch.equal(interpolate(initial, tuned, 0.0)["w"], initial["w"])
    assert torch.equal(interpolate(initial, tuned, 1.0)["w"], tuned["w"])
    assert torch.allclose(interpolate(initial, tuned, 0.25)["w"], torch.full((3,), 0.5))
    assert torch.equal(interpolate(initial, tuned, 0.5)["ids"], tuned["ids"])


@pytest.mark.parametrize(
    "alphas, message",
    [([0.5], "must hold 1.0"), ([1.0], "must hold 1.0"), ([0.5, 1.2], "from 0 to 1"), ([0.5, 1.0], "must hold 0.0")],
)
def test_bad_ratios_are_refused_by_name(alphas, message):
    with pytest.raises(ConfigError, match=message):
        WiseFT(alphas=alphas)


def test_the_choice_line_says_epoch_gain_last_epoch_mix_and_retention():
    line = choice_line({"selection/epoch": 53, "selection/val_gain": 0.028, "last/test/rank1": 0.353,
                        "wise_ft/alpha": 0.75, "zeroshot/retention": 0.72}, "val/mAP", 5)  # fmt: skip
    assert line == (
        "selected epoch 53 by val/mAP (mean of 5), +2.8 over the untrained model; the last epoch would score test "
        "Rank-1 35.3%; WiSE-FT mix 0.75 of the fine-tuned weights; zero-shot retention 0.72"
    )
    assert choice_line({}, "val/mAP", 5) is None


def test_the_choice_line_says_when_the_gain_is_within_noise_and_when_the_untrained_model_is_reported():
    gain = {"selection/epoch": 9, "reported/val_gain": 0.021, "reported/val_gain_low": -0.012,
            "reported/val_gain_high": 0.055}  # fmt: skip
    line = choice_line({**gain, "wise_ft/alpha": 1.0}, "val/mAP", 1)
    assert "validation gain of the reported model +2.1, 95% CI [-1.2, +5.5]: within noise" in line
    untrained = {**gain, "wise_ft/alpha": 0.0, "reported/val_gain": 0.0, "reported/val_gain_low": 0.0,
                 "reported/val_gain_high": 0.0}  # fmt: skip
    line = choice_line(untrained, "val/mAP", 1)
    assert "WiSE-FT reports the untrained model: no mix beat it on validation beyond the noise" in line
    assert "within noise" not in line


@pytest.mark.parametrize("confidence", [0, 1, 1.5, "high"])
def test_a_confidence_outside_0_to_1_is_refused_by_name(confidence):
    with pytest.raises(ConfigError, match="eval.wise_ft.confidence"):
        WiseFT(confidence=confidence)


def test_flyp_and_lwf_train_on_the_prompt_tasks_the_data_names_and_lwf_keeps_its_targets_in_the_checkpoint(tmp_path):
    import csv

    from handclip.data.dataset import PromptLabels
    from handclip.train.config import check_config
    from tests.test_config import compose_plain
    from tests.test_train import QUICK, train

    # one run with both terms: FLYP's class prompts (loss=flyp) and LwF's distillation (loss=lwf's term)
    keep = "+loss.terms.keep_prompts={_target_: handclip.losses.PromptDistillation, _partial_: true, weight: 1.0}"
    train(tmp_path, "loss=flyp", keep, "run_name=keep", "eval.wise_ft=null", "eval.text=false")
    run = tmp_path / "runs" / "keep"
    (log,) = (run / "logs").rglob("metrics.csv")
    for term in ("class_prompts", "keep_prompts"):
        values = [float(r[f"train/loss_{term}"]) for r in csv.DictReader(log.open()) if r[f"train/loss_{term}"]]
        assert values and all(0 <= v < 20 for v in values), term  # logged, finite
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    targets = state["objective.terms.keep_prompts.targets"]
    assert targets.shape[1] == 4 + 2 + 4 + 2 + 2  # LwF keeps every class named: aspect, gender, skin, nails, rings
    assert torch.allclose(targets[:, :4].exp().sum(dim=1), torch.ones(len(targets)))  # a distribution per image
    # a new run from these weights on other people makes its own targets (they are the run's record, not weights)
    train(tmp_path, "loss=lwf", f"init_from={run / 'checkpoints' / 'last.ckpt'}", "data.source.identities=12",
          "trainer.max_epochs=1", "run_name=again", "eval.wise_ft=null", "eval.text=false", "eval.baseline=false")
    # what FLYP trained on: the tasks the training images hold two classes of or more
    spec = check_config(compose_plain(tmp_path, *QUICK, "loss=flyp", f"paths.root={tmp_path}"))
    spec.data.prepare(32)
    tasks = spec.data.prompt_tasks()
    assert len(targets) == len(spec.data.train_rows)  # one distribution per training image
    # the aspect is left out: every training image is dorsal right, and one class would teach "always dorsal right"
    assert "aspect" not in tasks and "accessories" not in tasks  # (the split keeps images without accessories)
    assert tasks["gender"][1] == ["female", "male"] and "a photo of a man's hand" in tasks["gender"][2]
    labels = PromptLabels(tasks)
    row = spec.data.train_rows[0]
    assert labels(row)[list(tasks).index("gender")] == ["female", "male"].index(row["gender"])
    assert labels({"gender": "other"}).tolist() == [-1] * len(tasks)  # no class of any task: left out
