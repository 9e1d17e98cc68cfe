"""The pretrained tiny backbone: its corpus, its captions, and its build (small settings here; the real one is slow)."""

import json

import numpy as np
import pytest
import torch

from handclip.errors import ConfigError
from handclip.model import HuggingFaceCLIP, load_backbone
from handclip.model.pretrain import FIRST_ID, Pretraining, caption
from tests.conftest import TINY

SMALL = {"identities": 6, "images_per_aspect": 1, "image_size": [96, 72], "epochs": 2, "batch_size": 8, "workers": 1}


def spec(**pretrain) -> HuggingFaceCLIP:
    return HuggingFaceCLIP(**TINY, pretrain={**SMALL, **pretrain})


def test_corpus_people_are_outside_every_demo_and_dataset_id_range():
    from handclip.data.hands import HD_FOLDERS
    from handclip.data.synthetic import _MAX_ID, identity_ids

    drawn = identity_ids(400, np.random.default_rng(0))  # what any demo or test dataset can contain
    assert max(drawn) < _MAX_ID < FIRST_ID and int(HD_FOLDERS[-1].split("-")[1]) < FIRST_ID


def test_captions_name_attributes_and_never_an_identity():
    attributes = {"aspect": "palmar left", "gender": "female", "skin": "very fair", "age_band": "older",
                  "nail_polish": "1", "ring": "0"}  # fmt: skip
    rng = np.random.default_rng(0)
    captions = {caption(attributes, rng) for _ in range(400)}
    assert len(captions) > 30  # varied sentences, not one template
    assert not any(ch.isdigit() for text in captions for ch in text)
    # the zero-shot prompts' own words appear, alone and in company
    assert "a photo of the palmar left hand" in captions and "a photo of a woman's hand" in captions
    assert any("very fair skin" in t and "painted nails" in t and "no ring" in t for t in captions)
    assert not any("man" in t.replace("woman", "") or "dorsal" in t or "bare nails" in t for t in captions)


def test_pretraining_builds_once_the_same_weights_and_loads_through_from_pretrained(tmp_path):
    from transformers import CLIPModel

    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    first = spec().tiny_dir(tmp_path / "a")
    assert torch.equal(torch.rand(2), expected)  # the run's random numbers are left alone
    second = spec(workers=2).tiny_dir(tmp_path / "b")  # processes that draw are not part of the result
    assert first.name == second.name and first.name.startswith("tiny-pretrained-")
    report = json.loads((first / "pretraining.json").read_text())
    assert report["images"] == 6 * 4 and report["first_id"] == FIRST_ID and len(report["epoch_loss"]) == 2
    a, b = CLIPModel.from_pretrained(first).state_dict(), CLIPModel.from_pretrained(second).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    random = load_backbone(TINY, tmp_path / "a").model.state_dict()
    assert not torch.equal(random["visual_projection.weight"], a["visual_projection.weight"])
    # another setting is another model in another directory; the same one is found, not rebuilt
    assert spec(epochs=1).tiny_dir(tmp_path / "a") != first
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert spec().tiny_dir(tmp_path / "a") == first and (first / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epoch": 3}, "backbone.pretrain.epoch is unknown"),
        ({"identities": 1}, "backbone.pretrain.identities=1 must be an integer >= 2"),
        ({"lr": 0}, "backbone.pretrain.lr=0 must be above 0"),
        ({"image_size": [320]}, r"backbone.pretrain.image_size=\[320\] must be \[width, height\]"),
    ],
)
def test_bad_pretraining_settings_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        spec(**changes)


def test_pretraining_is_only_for_the_tiny_model():
    with pytest.raises(ConfigError, match="backbone.pretrain is only for source=tiny"):
        HuggingFaceCLIP(source="openai/clip-vit-base-patch32", pretrain={"epochs": 1})
    assert Pretraining().key()["version"] >= 1
