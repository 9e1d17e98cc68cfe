"""The open_clip backbone on tiny models built from a model config: offline, no weights downloaded."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from handclip.errors import BackboneError, ConfigError
from handclip.model import LastN, apply_freeze
from handclip.model.openclip import CONFIG, WEIGHTS, OpenCLIP, OpenCLIPBackbone
from tests.fake_runs import fake_run

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
VIT = {
    "name": "tiny-vit",
    "seed": 0,
    "config": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 3,
                                               "head_width": 16}, "text_cfg": TEXT},
}  # fmt: skip
RN = {
    "name": "tiny-rn",
    "seed": 0,
    "config": {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
               "text_cfg": TEXT},
}  # fmt: skip
OPENCLIP = "handclip.model.openclip.OpenCLIP"
CAPTIONS = ["the dorsal right hand of person 3, a 21 year old male!", "a palm"]


def load(spec: dict, tmp_path: Path) -> OpenCLIPBackbone:
    return OpenCLIP(**spec).load(tmp_path / "cache")


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad} - {"logit_scale", "logit_bias"}


def open_clip_locked(model: torch.nn.Module, vision_groups: int | None, text_layers: int) -> set[str]:
    """What open_clip's own lock_image_tower / lock_text_tower leave trainable (vision_groups None: the image
    tower stays as it is)."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if vision_groups is not None:
        model.lock_image_tower(unlocked_groups=vision_groups)
    model.lock_text_tower(unlocked_layers=text_layers)
    return trainable(model)


# --- (a) LastN trains exactly what open_clip's lock methods leave trainable -------------------


@pytest.mark.parametrize("vision_blocks, text_blocks", [(0, 0), (1, 2), (2, 1), (3, 0), (0, 2)])
def test_last_n_on_a_vit_matches_open_clips_lock_towers(tmp_path, vision_blocks, text_blocks):
    backbone, reference = load(VIT, tmp_path), load(VIT, tmp_path).model
    apply_freeze(backbone, LastN(vision_blocks=vision_blocks, text_blocks=text_blocks, train_logit_scale=False))
    # the mapping: LastN's n top blocks (with final norm and projection) = open_clip's k = n + 1 groups
    expected = open_clip_locked(reference, vision_blocks + 1, text_blocks + 1)
    assert trainable(backbone.model) == expected
    assert "visual.proj" in expected and "text_projection" in expected
    assert ("visual.ln_post.weight" in expected) == (vision_blocks > 0)


def test_open_clip_cannot_partly_lock_a_modified_resnet(tmp_path):
    model = load(RN, tmp_path).model
    with pytest.raises(AssertionError, match="partial locking not currently supported"):
        model.lock_image_tower(unlocked_groups=1)
    model.lock_image_tower(unlocked_groups=0)
    assert not any(p.requires_grad for p in model.visual.parameters())


@pytest.mark.parametrize("vision_blocks, text_blocks", [(0, 0), (1, 1), (2, 2), (4, 0)])
def test_last_n_on_a_resnet_matches_open_clip(tmp_path, vision_blocks, text_blocks):
    backbone, reference = load(RN, tmp_path), load(RN, tmp_path).model
    apply_freeze(backbone, LastN(vision_blocks=vision_blocks, text_blocks=text_blocks, train_logit_scale=False))
    # the text tower: open_clip's lock_text_tower itself
    expected = open_clip_locked(reference, 0, text_blocks + 1)
    # the image tower: open_clip locks a ModifiedResNet only whole (unlocked_groups=0, above), so the reference
    # unlocks, from there, its stages as forward_intermediates lists them ([stem, layer1..layer4]) from the top
    # with the attention pool, as the ViT's lock pairs the top block with ln_post; the projection is c_proj
    visual = reference.visual
    unlock = [visual.attnpool.c_proj]
    if vision_blocks:
        unlock += [visual.attnpool, *[visual.layer1, visual.layer2, visual.layer3, visual.layer4][4 - vision_blocks :]]
    for module in unlock:
        module.requires_grad_(True)
    expected = trainable(reference)
    assert trainable(backbone.model) == expected
    assert "visual.attnpool.c_proj.weight" in expected and "visual.conv1.weight" not in expected


# --- (b) the ResNet's own groups (the partition and the forward: tests/test_backbone_contract.py) ------------


def test_the_resnets_attention_pool_is_labelled_as_such_and_policies_see_a_final_norm(tmp_path):
    groups = load(RN, tmp_path).layer_groups("vision")
    pool = groups[-2]
    assert (pool.name, pool.kind, pool.depth) == ("vision.attention_pool", "final_norm", 1)
    assert {"visual.attnpool.positional_embedding", "visual.attnpool.q_proj.weight", "visual.attnpool.k_proj.weight",
            "visual.attnpool.v_proj.weight"} <= set(pool.parameters)  # fmt: skip
    assert not any("c_proj" in name for name in pool.parameters)
    assert [g.name for g in groups[:5]] == ["vision.stem", "vision.layer1", "vision.layer2", "vision.layer3",
                                            "vision.layer4"]  # fmt: skip
    assert "visual.bn1.weight" in groups[0].norms and "visual.layer1.0.bn1.weight" in groups[1].norms


# --- (c) export: open_clip's own format, loadable without HandCLIP -------------------------

LOADER = """
import sys
sys.modules["handclip"] = None  # HandCLIP cannot be imported here
import torch, open_clip
pixels = torch.load(sys.argv[1])
out = {}
for directory, name in zip(sys.argv[3::2], sys.argv[4::2]):
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + directory)
    open_clip.add_model_config(directory + "/" + name + ".json")
    registered = open_clip.create_model(name, pretrained=directory + "/open_clip_model.safetensors")
    tokens = open_clip.get_tokenizer("local-dir:" + directory)(["a hand"])
    with torch.no_grad():
        out[name] = [m.eval().encode_image(pixels[name]) for m in (model, registered)]
    out[name + "/text"] = model.encode_text(tokens).shape
torch.save(out, sys.argv[2])
"""


def test_export_writes_open_clip_format_that_loads_without_handclip(tmp_path):
    from handclip.tools.export import MARKER, export

    keep = {"_target_": "handclip.model.projection.Keep"}
    replace = {"_target_": "handclip.model.projection.Replace", "dim": 8, "towers": ["vision", "text"], "seed": 0}
    pixels = {"tiny-vit": torch.randn(2, 3, 32, 32), "tiny-rn": torch.randn(2, 3, 64, 64)}
    expected, args = {}, []
    for spec, projection in ((VIT, keep), (RN, replace)):
        run = tmp_path / f"run-{spec['name']}"
        backbone = fake_run(run, {"_target_": OPENCLIP, **spec, "pretrained": None}, projection)
        with torch.no_grad():
            expected[spec["name"]] = backbone.encode_image(pixels[spec["name"]])
        out = export(run, tmp_path / "exported" / spec["name"])
        assert {p.name for p in out.iterdir()} == {WEIGHTS, CONFIG, f"{spec['name']}.json", MARKER, "README.md"}
        marker = json.loads((out / MARKER).read_text())
        assert marker["format"] == "open_clip" and "local-dir:" in marker["load"]
        args += [str(out), spec["name"]]
    rn_dir = tmp_path / "exported" / "tiny-rn"
    assert json.loads((rn_dir / CONFIG).read_text())["model_cfg"]["embed_dim"] == 8
    # and back into HandCLIP: an export is a backbone too (backbone.name=local-dir:DIR)
    again = OpenCLIP(name=f"local-dir:{rn_dir}").load().eval()
    with torch.no_grad():
        assert torch.allclose(again.encode_image(pixels["tiny-rn"]), expected["tiny-rn"], atol=1e-5)
    torch.save(pixels, tmp_path / "pixels.pt")
    done = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = torch.load(tmp_path / "out.pt")
    for name, embeddings in expected.items():
        for again in loaded[name]:
            assert torch.allclose(again, embeddings, atol=1e-5), name
    assert tuple(loaded["tiny-rn/text"]) == (1, 8)
    # the folder-embedding command reads an open_clip export too
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for number in range(3):
        Image.new("RGB", (80, 60), (40 * number, 120, 90)).save(images / f"{number}.jpg")
    features = subprocess.run([sys.executable, "-m", "handclip.features", str(rn_dir), str(images), "--out",
                               str(tmp_path / "f.npz")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert features.returncode == 0, features.stderr[-2000:]
    import numpy as np

    assert np.load(tmp_path / "f.npz")["features"].shape == (3, 8)


# --- (d) errors ----------------------------------------------------------------------------


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "weights" / "open_clip_model.safetensors"
    for spec in ({"name": "RN50", "pretrained": str(missing)}, {**VIT, "pretrained": str(missing)}):
        with pytest.raises(BackboneError, match=rf"backbone.pretrained={missing}: no such file") as error:
            OpenCLIP(**spec).load(tmp_path / "cache")
        assert "\n" not in str(error.value)
    with pytest.raises(BackboneError, match="no such file"):
        OpenCLIP(name="RN50", pretrained=str(missing)).facts()  # before any data or weights


def test_a_tag_offline_and_not_cached_says_what_was_tried_and_how_to_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(BackboneError) as error:
        OpenCLIP(name="RN50", pretrained="openai").load(tmp_path / "cache")
    message = str(error.value)
    assert message.startswith("Could not load open_clip backbone 'RN50' with pretrained='openai'")
    assert "hf download timm/resnet50_clip.openai" in message and "HF_HUB_OFFLINE=1" in message
    assert "backbone.pretrained=" in message and "backbone=oc_tiny_vit" in message and "\n" not in message


def test_settings_are_checked_and_named():
    cases = [
        ({"name": None}, "backbone.name=None"),
        ({"name": "RN50", "seed": "0"}, "backbone.seed='0' must be an integer"),
        ({**VIT, "pretrained": "openai"}, "backbone.pretrained=openai: a tag names weights"),
        ({"name": "x", "config": {"embed_dim": 8, "vision_cfg": {}}}, "backbone.config.text_cfg is missing"),
        ({"name": "x", "config": {**VIT["config"], "vision_cfg": {"timm_model_name": "resnet50"}}}, "timm"),
        ({"name": "x", "config": {**VIT["config"], "vision_cfg": {"widht": 8}}}, "backbone.config: .*widht"),
        ({"name": "local-dir:/x", "pretrained": "openai"}, "brings its own weights"),
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            OpenCLIP(**spec)
    with pytest.raises(ConfigError, match="backbone.name=RN5O is not an open_clip model .did you mean RN50"):
        OpenCLIP(name="RN5O").facts()
    with pytest.raises(ConfigError, match="neither a tag of RN50 nor a file .did you mean openai.*yfcc15m"):
        OpenCLIP(name="RN50", pretrained="openia").facts()


# --- the rest of the interface ------------------------------------------------------------


def test_conf_backbones_give_facts_without_weights():
    facts = {}
    for path in sorted(Path("conf/backbone").glob("oc_*.yaml")):
        spec = yaml.safe_load(path.read_text())
        assert spec.pop("_target_") == OPENCLIP
        facts[path.stem] = OpenCLIP(**spec).facts()
    assert set(facts) == {"oc_rn50", "oc_vit_b32_laion2b", "oc_tiny_vit", "oc_tiny_rn"}
    assert facts["oc_rn50"].vision.depth == 4 and facts["oc_rn50"].projection_dim == 1024
    assert facts["oc_vit_b32_laion2b"].vision.depth == 12 and facts["oc_vit_b32_laion2b"].patch_size == 32
    assert facts["oc_tiny_vit"].image_size == facts["oc_tiny_rn"].image_size == 96
    # OpenAI's weights were trained with QuickGELU: the tag's model is built with it
    assert OpenCLIP(name="RN50", pretrained="openai").model_config()["quick_gelu"] is True


def test_tokenizer_is_open_clips_small_and_picklable(tmp_path):
    import open_clip

    backbone = load(VIT, tmp_path)
    tokens = backbone.tokenize(CAPTIONS)
    length = tokens["input_ids"].shape[1]
    assert length < 77 and torch.equal(tokens["input_ids"], open_clip.tokenize(CAPTIONS)[:, :length])
    # the mask covers each text up to its end-of-text token; the padding after it is cut to the longest
    assert tokens["attention_mask"].sum(1).tolist() == [length, 4]
    assert len(pickle.dumps(backbone.text_tokenizer)) < 2000  # the tokenizer itself is built in each process


def test_random_weights_are_seeded_and_leave_the_global_stream_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = load(VIT, tmp_path / "a"), load(VIT, tmp_path / "b")
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(a.model.visual.proj, b.model.visual.proj)
    assert not torch.equal(a.model.visual.proj, load({**VIT, "seed": 1}, tmp_path).model.visual.proj)


def test_frozen_batchnorm_keeps_its_statistics(tmp_path):
    backbone = load(RN, tmp_path)
    apply_freeze(backbone, LastN(vision_blocks=1, text_blocks=0))
    frozen, trained = backbone.model.visual.layer1[0].bn1, backbone.model.visual.layer4[0].bn1
    before = frozen.running_mean.clone(), trained.running_mean.clone()
    backbone.train()
    backbone.encode_image(torch.randn(4, 3, 64, 64))
    assert torch.equal(frozen.running_mean, before[0]) and not torch.equal(trained.running_mean, before[1])


def test_replaced_projection_keeps_open_clips_form(tmp_path):
    from handclip.model.projection import Replace

    backbone = load(VIT, tmp_path)
    heads = Replace(dim=8).apply(backbone)
    assert backbone.model.visual.proj.shape == (32, 8) and backbone.model.text_projection.shape == (32, 8)
    assert {id(p) for p in heads} == {id(backbone.model.visual.proj), id(backbone.model.text_projection)}
    assert backbone.projection_dim == 8 and backbone.model_cfg["embed_dim"] == 8  # what the export's config says


def test_lora_targets_the_mlp_only(tmp_path):
    pytest.importorskip("peft")
    from handclip.model.lora import Lora

    backbone = load(VIT, tmp_path).eval()
    policy = Lora(rank=2, alpha=4, dropout=0.0, targets=["fc1", "fc2"], towers=["vision", "text"], blocks=1)
    apply_freeze(backbone, policy)
    backbone.check_partition()
    names = [n for g in backbone.all_groups() for n, p in g.parameters.items() if p.requires_grad and "lora_" in n]
    assert {n.split(".lora_")[0] for n in names} == {"visual.transformer.resblocks.2.mlp.c_fc",
        "visual.transformer.resblocks.2.mlp.c_proj", "transformer.resblocks.1.mlp.c_fc",
        "transformer.resblocks.1.mlp.c_proj"}  # fmt: skip
    with pytest.raises(ConfigError, match="freeze.targets has q: open_clip's attention"):
        apply_freeze(load(VIT, tmp_path), Lora(rank=2, alpha=4, dropout=0.0, targets=["q"], towers=["text"], blocks=1))
    with pytest.raises(ConfigError, match="ModifiedResNet"):
        apply_freeze(load(RN, tmp_path), Lora(rank=2, alpha=4, dropout=0.0, targets=["fc1"], towers=["vision"],
                                              blocks=1))  # fmt: skip


@pytest.mark.parametrize("spec", [VIT, RN], ids=["vit", "rn"])
def test_the_pre_projection_feature_is_what_the_tower_projects(tmp_path, spec):
    backbone = load(spec, tmp_path).eval()
    pixels = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    with torch.no_grad():
        pre, projected = backbone.encode_image(pixels, pre_projection=True)
        visual = backbone.model.visual
        if spec is RN:  # before the attention pool: the average-pooled last stage
            hidden = backbone.image_prefix(pixels, backbone.facts.depth("vision") + 1)
            assert torch.allclose(pre, hidden.mean(dim=(2, 3)), atol=1e-5)
        else:
            assert torch.allclose(pre @ visual.proj, projected, atol=1e-5)


def test_a_cached_model_config_edited_since_it_was_written_is_written_again(tmp_path, capsys):
    spec = OpenCLIP(**VIT)
    folder = spec.config_dir(tmp_path)
    written = (folder / CONFIG).read_text()
    edited = json.loads(written)
    edited["model_cfg"]["vision_cfg"]["layers"] = 5  # was: the model built with 5 blocks, the run's config says 3
    (folder / CONFIG).write_text(json.dumps(edited))
    assert spec.config_dir(tmp_path) == folder and (folder / CONFIG).read_text() == written
    assert "differs from the config it was written from: written again" in capsys.readouterr().out
    assert spec.load(tmp_path).facts.vision.depth == 3
