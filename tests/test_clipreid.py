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
    with pytest.raises(ConfigError, match=r"holds texts of shape \(5, 8\), this run needs \(6, 8\)"):
        IdentityTextLoss(6, 8, learn_texts=False, texts_from=str(tmp_path))
    with pytest.raises(ConfigError, match="holds texts of width 8, this run's embedding width is 16"):
        IdentityTextLoss(5, 16, learn_texts=False, texts_from=str(tmp_path))
    with pytest.raises(ConfigError, match="no file .*nothing/identity_texts.safetensors.*experiment=demo_clipreid"):
        IdentityTextLoss(5, 8, learn_texts=False, texts_from=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="learn_texts=false reads fixed identity texts, and texts_from is null"):
        IdentityTextLoss(5, 8, learn_texts=False)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot be read"):
        IdentityTextLoss(5, 8, learn_texts=False, texts_from=str(tmp_path / "bad.safetensors"))


def test_texts_made_for_other_identities_or_another_text_tower_are_refused_naming_what_differs(tmp_path):
    made_for = {"identities": json.dumps(["0000010", "0000011", "0000012"]), "text_tower": "abc"}
    save_file({"identity_texts": torch.randn(3, 8)}, str(tmp_path / "identity_texts.safetensors"), metadata=made_for)
    same = IdentityTextLoss(3, 8, learn_texts=False, texts_from=str(tmp_path),
                            identity_keys=["0000010", "0000011", "0000012"], text_tower="abc")  # fmt: skip
    assert same.texts.shape == (3, 8)
    # another split with as many identities: the count matches, the identities do not
    with pytest.raises(
        ConfigError, match="learned for other training identities .text 1 is identity 0000011, here 0000020"
    ):
        IdentityTextLoss(3, 8, learn_texts=False, texts_from=str(tmp_path),
                         identity_keys=["0000010", "0000020", "0000030"], text_tower="abc")  # fmt: skip
    with pytest.raises(ConfigError, match="texts of 3 identities, this run trains 2"):
        IdentityTextLoss(2, 8, learn_texts=False, texts_from=str(tmp_path), identity_keys=["0000010", "0000011"])
    with pytest.raises(ConfigError, match="encoded by another text tower .weights abc, this run's xyz"):
        IdentityTextLoss(3, 8, learn_texts=False, texts_from=str(tmp_path),
                         identity_keys=["0000010", "0000011", "0000012"], text_tower="xyz")  # fmt: skip


def test_a_finished_first_stage_writes_what_its_texts_were_made_for(tmp_path, backbone):
    from safetensors import safe_open

    from handclip.model.caching import tower_digest
    from handclip.train.run import _write_artifacts

    prompts = IdentityPrompts(num_identities=2, text_width=backbone.facts.text.width)
    _write_artifacts(Objective({"prompts": prompts}), backbone, tmp_path, ["0000007", "0000009"])
    with safe_open(str(tmp_path / "identity_texts.safetensors"), "pt") as handle:
        facts = handle.metadata()
    assert json.loads(facts["identities"]) == ["0000007", "0000009"]
    assert facts["text_tower"] == tower_digest(backbone, "text")
    # and the second stage reads it back against the same identities and text tower
    IdentityTextLoss(2, backbone.projection_dim, learn_texts=False, texts_from=str(tmp_path),
                     identity_keys=["0000007", "0000009"], text_tower=tower_digest(backbone, "text"))  # fmt: skip


def test_learned_words_and_texts_are_never_weight_decayed():
    objective = Objective({"prompts": IdentityPrompts(num_identities=2, text_width=8),
                           "texts": IdentityTextLoss(2, 8)})  # fmt: skip
    assert objective.embedding_names() == {"terms.prompts.words", "terms.texts.texts"}


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ({}, "must map stage names"),
        ({"one two": {}}, "letters, digits and _"),
        ({"a": ["loss=clip"]}, "must be a mapping of settings"),
        ({"a": {"stage": {"previous": "x"}}}, "stages.a.stage cannot be set by a stage"),
        ({"a": {"ckpt_path": "last"}}, "stages.a.ckpt_path cannot be set by one stage: it applies to the whole run"),
        ({"a": {"overwrite": True}}, "stages.a.overwrite cannot be set by one stage"),
        ({"a": {"dry_run": True}}, "stages.a.dry_run cannot be set by one stage"),
        ({"a": {"overrides": "loss.x=1"}}, "stages.a.overrides='loss.x=1' must be a list of Hydra overrides"),
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


def test_raw_overrides_of_a_stage_come_after_its_settings():
    spec = {"loss": "clipreid_prompts", "overrides": ["loss.terms.prompts.context_tokens=8"]}
    assert stage_overrides(spec, {"loss"}) == ["loss=clipreid_prompts", "loss.terms.prompts.context_tokens=8"]


def _finished_stage(folder, cfg: dict) -> None:
    import yaml

    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "metrics.json").write_text(json.dumps({"metrics": {}}))


def test_a_stage_plan_keeps_what_finished_resumes_what_stopped_and_reruns_what_follows_a_rerun(tmp_path):
    from handclip.errors import HandClipError
    from handclip.train.stages import plan_stages, stage_dirs

    run = tmp_path / "run"
    names = ["prompts", "image"]
    first, second = stage_dirs(run, names)
    configs = [
        {"optim": {"lr": 1.0}, "stage": {"previous": None}},
        {"optim": {"lr": 2.0}, "loss": {"texts_from": str(first)}, "stage": {"previous": str(first)}},
    ]
    assert plan_stages(names, [first, second], configs, None) == ["start", "start"]
    _finished_stage(first, configs[0])
    (second / "checkpoints").mkdir(parents=True)
    (second / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert plan_stages(names, [first, second], configs, "last") == ["keep", "resume"]
    with pytest.raises(HandClipError, match="stage prompts .* finished earlier: continue the run with ckpt_path=last"):
        plan_stages(names, [first, second], configs, None)
    changed = [{**configs[0], "optim": {"lr": 3.0}}, configs[1]]
    with pytest.raises(HandClipError, match=r"stage prompts .* other settings \(optim.lr: 1.0 -> 3.0\)"):
        plan_stages(names, [first, second], changed, "last")
    # stage 1 started over: stage 2, finished against the old texts, runs again
    (second / "checkpoints" / "last.ckpt").unlink()
    (second / "checkpoints").rmdir()
    _finished_stage(second, configs[1])
    assert plan_stages(names, [first, second], configs, "last") == ["keep", "keep"]
    again = [{**configs[0], "overwrite": True}, configs[1]]
    assert plan_stages(names, [first, second], again, "last") == ["start", "start"]
    # the run folder moved: its own paths compare equal, both stages are kept
    moved = tmp_path / "moved"
    run.rename(moved)
    a, b = stage_dirs(moved, names)
    configs_moved = [configs[0], {**configs[1], "loss": {"texts_from": str(a)}, "stage": {"previous": str(a)}}]
    assert plan_stages(names, [a, b], configs_moved, "last") == ["keep", "keep"]


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
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))  # refused: nothing written
    assert not (tmp_path / "data").exists()  # before any data is made


def test_a_dry_run_shows_each_stage_and_writes_nothing(tmp_path):
    result = train(tmp_path, *STAGED, "dry_run=true")
    out = result.stdout
    assert "stage prompts:" in out and "stage image:" in out and out.index("stage prompts:") < out.index("stage image:")
    assert "locked" in out.split("stage image:")[0]  # stage 1's freeze plan
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))
