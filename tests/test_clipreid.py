"""CLIP-ReID's two stages: learned identity prompts, fixed identity texts, and runs in stages."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from handclip.errors import ConfigError
from handclip.export import export
from handclip.io import load_checkpoint_file
from handclip.losses import IdentityPrompts, IdentityTextLoss, LossInputs, Objective, contrastive_loss
from handclip.model import Locked, apply_freeze, load_backbone
from handclip.train.stages import stage_names, stage_overrides
from tests.conftest import TINY
from tests.test_resume import kill_once_written
from tests.test_train import train


@pytest.fixture
def backbone(tmp_path):
    return load_backbone(TINY, tmp_path / "cache")


def test_prompts_with_no_learned_offset_encode_exactly_the_template_caption(backbone):
    prompts = IdentityPrompts(num_identities=3, text_width=backbone.facts.text.width, init_std=0.0)
    tokens = backbone.tokenize(["a photo of a x x x x hand."])
    with torch.no_grad():
        caption = backbone.encode_text(tokens["input_ids"], tokens["attention_mask"])
        texts = prompts.identity_texts(backbone, torch.tensor([0, 2]))
    assert torch.allclose(texts, caption.expand(2, -1), atol=1e-5)


def test_each_identity_has_its_own_words_and_only_they_receive_gradients(backbone):
    torch.manual_seed(0)
    prompts = IdentityPrompts(num_identities=4, text_width=backbone.facts.text.width, context_tokens=2)
    apply_freeze(backbone, Locked())
    assert not any(p.requires_grad for p in backbone.parameters())
    image = torch.randn(4, backbone.projection_dim)
    identities = torch.tensor([1, 3, 1, 3])
    loss = prompts(LossInputs(image=image, text=None, logit_scale=backbone.logit_scale, identities=identities,
                              backbone=backbone))  # fmt: skip
    # the independent formula: the symmetric multi-positive loss against each row's identity text
    with torch.no_grad():
        texts = prompts.identity_texts(backbone, identities)
    assert loss.item() == pytest.approx(contrastive_loss(image, texts, backbone.logit_scale, identities).item(), 1e-5)
    loss.backward()
    moved = prompts.words.grad.abs().sum(dim=(1, 2))
    assert moved[1] > 0 and moved[3] > 0 and moved[0] == 0 and moved[2] == 0
    different = prompts.identity_texts(backbone, torch.tensor([1, 3]))
    assert not torch.allclose(different[0], different[1])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"template": "a photo of a hand."}, 'one "{}"'),
        ({"template": "an x-ray of a {} hand."}, 'a caption in which "x" appears only where the learned words go'),
        ({"context_tokens": 0}, "context_tokens=0"),
    ],
)
def test_bad_prompt_settings_name_the_setting(backbone, settings, message):
    with pytest.raises(ConfigError, match=message):
        prompts = IdentityPrompts(num_identities=2, text_width=backbone.facts.text.width, **settings)
        prompts.identity_texts(backbone, torch.tensor([0]))


def test_fixed_identity_texts_are_read_from_the_first_stage_and_never_optimised(tmp_path):
    texts = torch.randn(5, 8)
    save_file({"identity_texts": texts}, str(tmp_path / "identity_texts.safetensors"))

    def fixed(num_identities, embed_dim):
        return IdentityTextLoss(num_identities, embed_dim, learn_texts=False, texts_from=str(tmp_path))

    objective = Objective({"t": fixed}, num_identities=5, embed_dim=8)
    assert torch.equal(objective.terms["t"].texts, texts)
    assert list(objective.parameters()) == [] and "terms.t.texts" in objective.state_dict()
    with pytest.raises(ConfigError, match=r"holds shape \(5, 8\), this run needs \(6, 8\)"):
        IdentityTextLoss(6, 8, learn_texts=False, texts_from=str(tmp_path))
    with pytest.raises(ConfigError, match="no file .*nothing/identity_texts.safetensors.*experiment=demo_clipreid"):
        IdentityTextLoss(5, 8, learn_texts=False, texts_from=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="learn_texts=false reads fixed identity texts, and texts_from is null"):
        IdentityTextLoss(5, 8, learn_texts=False)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot be read"):
        IdentityTextLoss(5, 8, learn_texts=False, texts_from=str(tmp_path / "bad.safetensors"))


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ({}, "must map stage names"),
        ({"one two": {}}, "letters, digits and _"),
        ({"a": ["loss=clip"]}, "must be a mapping of settings"),
        ({"a": {"stage": {"previous": "x"}}}, "stages.a.stage cannot be set by a stage"),
    ],
)
def test_stage_settings_are_checked(stages, message):
    with pytest.raises(ConfigError, match=message):
        stage_names(stages)


def test_a_stage_s_settings_become_overrides_after_the_command_line_s():
    spec = {"loss": "clipreid_prompts", "optim": {"lr": 3.5e-3, "betas": [0.9, 0.98]},
            "init_from": "${stage.previous}/x", "eval": {"feature": "projected", "flip_tta": False},
            "data": {"augment": None}}  # fmt: skip
    assert stage_overrides(spec, {"loss", "optim", "eval", "data"}) == [
        "loss=clipreid_prompts", "optim.lr=0.0035", "optim.betas=[0.9,0.98]", 'init_from="${stage.previous}/x"',
        'eval.feature="projected"', "eval.flip_tta=false", "data.augment=null",
    ]  # fmt: skip


PROMPTS = "stages.prompts.trainer.max_epochs=2"
STAGED = ["experiment=demo_clipreid", "data.identities_per_batch=4", "data.images_per_identity=2", PROMPTS,
          "run_name=r", "eval.baseline=false", "trainer.max_epochs=3"]  # fmt: skip


@pytest.mark.slow
def test_the_two_stages_run_by_one_command_and_resume_where_they_stopped(tmp_path):
    whole = tmp_path / "whole"
    result = train(whole, *STAGED)
    run = whole / "runs" / "r"
    assert "stage prompts (1-prompts): starting" in result.stdout and "stage image (2-image): starting" in result.stdout
    first, second = run / "1-prompts", run / "2-image"
    texts = load_file(str(first / "identity_texts.safetensors"))["identity_texts"]
    # stage 1 trained only the words: the backbone is the same in its first and last checkpoints
    state = load_checkpoint_file(first / "checkpoints" / "last.ckpt")["state_dict"]
    early = load_checkpoint_file(first / "checkpoints" / "best.ckpt")["state_dict"]
    assert all(torch.equal(state[k], early[k]) for k in state if k.startswith("backbone."))
    # one text per training identity, held fixed in stage 2, whose identity classifier has as many rows
    stage2 = load_checkpoint_file(second / "checkpoints" / "last.ckpt")["state_dict"]
    classifier = stage2["objective.terms.identity.necks.projected.classifier.weight"]
    assert state["objective.terms.prompts.words"].shape[0] == texts.shape[0] == classifier.shape[0]
    assert torch.equal(stage2["objective.terms.identity_text.texts"], texts)
    metrics = json.loads((run / "metrics.json").read_text())
    stages = metrics["stages"]
    assert set(stages) == {"prompts", "image"}
    last_stage = json.loads((second / "metrics.json").read_text())["metrics"]
    assert metrics["metrics"]["test/rank1"] == last_stage["test/rank1"]
    assert metrics["metrics"]["train_time_s"] == pytest.approx(sum(s["train_time_s"] for s in stages.values()))

    # the run folder exports as its last stage
    out = export(run, tmp_path / "exported")
    card = (out / "README.md").read_text()
    assert (out / "model.safetensors").is_file() and "stage `image` of a run in stages" in card and "1-prompts" in card

    # the same command again keeps both finished stages
    again = train(whole, *STAGED, "ckpt_path=last")
    assert "stage prompts: finished earlier, kept" in again.stdout and "stage image: finished earlier" in again.stdout

    # killed in stage 2, then resumed: stage 1 is kept, stage 2 continues, the result equals the uninterrupted run
    split = tmp_path / "split"
    kill_once_written(split, split / "runs" / "r" / "2-image" / "checkpoints" / "last.ckpt", *STAGED)
    assert not (split / "runs" / "r" / "metrics.json").exists()
    resumed = train(split, *STAGED, "ckpt_path=last")
    assert "stage prompts: finished earlier, kept" in resumed.stdout
    assert "stage image (2-image): resuming" in resumed.stdout
    for key in ("test/rank1", "test/mAP", "val/rank1"):
        resumed_value = json.loads((split / "runs" / "r" / "metrics.json").read_text())["metrics"][key]
        assert resumed_value == pytest.approx(metrics["metrics"][key], abs=1e-6), key


def test_the_second_stage_alone_says_where_its_texts_come_from(tmp_path):
    result = train(tmp_path, "experiment=demo_clipreid", "stages=null", "data.identities_per_batch=4",
                   "data.images_per_identity=2", check=False)  # fmt: skip
    assert result.returncode == 2
    assert "texts_from is null" in result.stderr and "experiment=demo_clipreid" in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))


def test_a_dry_run_shows_each_stage_and_writes_nothing(tmp_path):
    result = train(tmp_path, *STAGED, "dry_run=true")
    out = result.stdout
    assert "stage prompts:" in out and "stage image:" in out and out.index("stage prompts:") < out.index("stage image:")
    assert "locked" in out.split("stage image:")[0]  # stage 1's freeze plan
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))
