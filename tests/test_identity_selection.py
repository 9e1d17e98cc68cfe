"""Selecting the checkpoint by validation identity accuracy (`eval.select=val/id_accuracy`), as CLIP-HandID does: the
share of the held-out images of the training identities that the objective's identity head names right."""

from __future__ import annotations

import csv

import pytest
import torch

from handclip.errors import ConfigError
from handclip.train.config import build_components
from tests.test_config import compose_plain

PK = ["data.sampler=identity_balanced", "data.identities_per_batch=4", "data.images_per_identity=2",
      "data.batch_size=8"]  # fmt: skip


@pytest.mark.parametrize("setting, message", [
    ("eval.select=val/id_accuracy", r"eval.select=val/id_accuracy needs an identity classifier that trains: the "
                                    r"objective \(clip, keep_prompts\) has none; add an identity term"),
    ("eval.wise_ft.metric=val/id_accuracy", r"eval.wise_ft.metric='val/id_accuracy' must be a validation metric"),
    ("eval.select=val/accuracy", r"eval.select='val/accuracy' must be a validation metric, one of val/rank1, .*"
                                 r"val/id_accuracy"),
])  # fmt: skip
def test_selection_by_identity_accuracy_needs_a_head_and_is_refused_before_anything_loads(tmp_path, setting, message):
    cfg = compose_plain(tmp_path, "experiment=demo", setting)
    with pytest.raises(ConfigError, match=message):
        build_components(cfg)
    assert not (tmp_path / "runs").exists()
    # with an identity head it is a choice like any other
    spec = build_components(compose_plain(tmp_path, "experiment=demo_strong", "eval.select=val/id_accuracy"))
    assert spec.eval.select == "val/id_accuracy"


def _independent_accuracy(run, backbone_name: str) -> float:
    """val/id_accuracy of the run's best checkpoint, recomputed here: the BN-neck classifiers' softmax, averaged over
    the necks, on the held-out (split val) images of the manifest, against their identities' places among the
    sorted training identities."""
    import json

    from torch.nn import functional as F

    from handclip.build import build
    from handclip.data.images import load_rgb
    from handclip.data.transforms import eval_transform
    from handclip.io import load_checkpoint_file

    metrics = json.loads((run / "metrics.json").read_text())
    rows = list(csv.DictReader(open(metrics["manifest"])))
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    backbone = build(config["backbone"], "backbone").load(config["paths"]["cache"])
    state = load_checkpoint_file(metrics["best_checkpoint"])["state_dict"]
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    backbone.eval()
    classes = {key: n for n, key in enumerate(sorted({r["identity"] for r in rows if r["split"] == "train"}))}
    held_out = [r for r in rows if r["split"] == "val"]
    transform = eval_transform(backbone.image_size, backbone.resize_size, backbone.image_mean, backbone.image_std)
    from pathlib import Path

    found = next(Path(config["data"]["source"]["root"]).rglob(held_out[0]["image"]))  # the generated folder
    root = Path(found.as_posix()[: -len(held_out[0]["image"])])
    pixels = torch.stack([transform(load_rgb(root / r["image"])) for r in held_out])
    with torch.no_grad():
        pre, projected = backbone.encode_image(pixels, pre_projection=True)
        probabilities = []
        for name, feature in (("projected", projected), ("pre_projection", pre)):
            prefix = f"objective.terms.identity.necks.{name}."
            if prefix + "classifier.weight" not in state:  # a neck on one feature only
                continue
            mean, var = state[prefix + "norm.running_mean"], state[prefix + "norm.running_var"]
            normed = (feature - mean) / torch.sqrt(var + 1e-5) * state[prefix + "norm.weight"]
            probabilities.append(F.softmax(normed @ state[prefix + "classifier.weight"].T, dim=-1))
    assert probabilities
    answers = (sum(probabilities) / len(probabilities)).argmax(-1)
    truth = torch.tensor([classes[r["identity"]] for r in held_out])
    return (answers == truth).float().mean().item()


@pytest.mark.slow
def test_a_run_keeps_the_epoch_whose_identity_accuracy_is_best_and_reports_it(tmp_path):
    from tests.test_train import train

    train(tmp_path, "loss=strong", "eval.feature=bnneck", "eval.select=val/id_accuracy", "eval.smooth=1",
          "trainer.max_epochs=4", "eval.wise_ft=null", "run_name=by_accuracy", *PK)  # fmt: skip
    run = next(tmp_path.rglob("by_accuracy/metrics.json")).parent
    logged = [r for r in csv.DictReader(open(next(run.rglob("metrics.csv")))) if r.get("val/id_accuracy")]
    accuracy = [float(r["val/id_accuracy"]) for r in logged]
    assert len(accuracy) == 4 and all(0 <= a <= 1 for a in accuracy)
    import json

    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    best = max(accuracy)
    assert metrics["selection/val_score"] == pytest.approx(best)
    assert metrics["selection/epoch"] == accuracy.index(best)  # the first epoch that scored it, as Lightning keeps
    assert _independent_accuracy(run, "tiny") == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("settings, message", [
    (["loss.terms.identity.weight=0"], r"has one whose weight is 0, so it never learns"),
    (["ema.decay=0.9"], r"with ema.decay=0.9: the EMA averages the backbone only"),
])  # fmt: skip
def test_a_head_that_never_learns_or_an_ema_is_refused(tmp_path, settings, message):
    cfg = compose_plain(tmp_path, "experiment=demo_strong", "eval.select=val/id_accuracy", *settings)
    with pytest.raises(ConfigError, match=message):
        build_components(cfg)
