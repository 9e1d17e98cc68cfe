from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file

from handclip.errors import ConfigError
from handclip.losses import Objective
from handclip.model import FreezePolicy, HuggingFaceCLIP
from handclip.train.config import build_components, check_config
from handclip.train.datamodule import HandDataModule
from handclip.train.resolvers import register_resolvers
from handclip.train.stages import stage_overrides

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_plain(tmp_path, *overrides) -> dict:
    register_resolvers()  # what train.py does at import; no train.py import needed
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root={tmp_path}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def stage_configs(tmp_path, experiment: str) -> list[dict]:
    """The experiment's configuration, or each of its stages' (as train.py composes them), with a stand-in
    first stage's identity texts (10 identities x 64) in the previous stage's folder."""
    cfg = compose_plain(tmp_path, f"experiment={experiment}")
    if not cfg.get("stages"):
        return [cfg]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        specs = OmegaConf.to_container(compose("train", overrides=[f"experiment={experiment}"]).stages)
    previous = tmp_path / "previous"
    previous.mkdir()
    save_file({"identity_texts": torch.zeros(10, 64)}, str(previous / "identity_texts.safetensors"))
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    return [
        compose_plain(
            tmp_path,
            f"experiment={experiment}",
            *stage_overrides(spec, groups),
            "stages=null",
            f"stage.name={name}",
            f"stage.previous={previous}",
        )  # fmt: skip
        for name, spec in specs.items()
    ]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_resolves_and_builds_every_component(tmp_path, experiment):
    for cfg in stage_configs(tmp_path, experiment):
        assert cfg["name"] == experiment
        Path(cfg["data"]["source"]["root"]).mkdir(parents=True, exist_ok=True)  # no real datasets here: folders do
        # a hub backbone's config is not on this machine: everything else is built and checked
        local = cfg["backbone"]["source"] == "tiny"
        parts = build_components(cfg, read_backbone_config=local)
        assert isinstance(parts.backbone, HuggingFaceCLIP) and isinstance(parts.freeze, FreezePolicy)
        assert isinstance(parts.data, HandDataModule) and parts.data.batch_size >= 2
        objective = parts.objective(num_identities=10, embed_dim=64, pre_projection_dim=32, text_width=32)
        assert isinstance(objective, Objective) and len(objective.terms) >= 1
        assert parts.optimization.lr > 0 and parts.eval.batch_size >= 1
        assert callable(parts.logger) and callable(parts.trainer) and parts.callbacks
        assert (parts.facts is not None) == local


def test_published_experiments_use_the_protocol_settings(tmp_path):
    aspects = {
        e: compose_plain(tmp_path, f"experiment={e}")["data"]["source"]["aspect"]
        for e in ("dorsal_hand", "dorsal_left_hand", "palmar_hand", "palmar_left_hand")
    }
    assert aspects == {
        "dorsal_hand": "dorsal right",
        "dorsal_left_hand": "dorsal left",
        "palmar_hand": "palmar right",
        "palmar_left_hand": "palmar left",
    }
    cfg = compose_plain(tmp_path, "experiment=dorsal_hand")
    assert cfg["backbone"]["source"] == "openai/clip-vit-base-patch32"
    assert cfg["freeze"]["_target_"].endswith(".TextFrozen") and cfg["data"]["source"]["no_accessories"] is True


def test_demo_config_passes_the_checks(tmp_path):
    parts = check_config(compose_plain(tmp_path, "experiment=demo"))
    assert parts.facts.vision.depth == 4 and parts.facts.text.depth == 4 and parts.facts.image_size == 96


def test_every_component_default_lives_in_conf(tmp_path):
    # the code's own defaults never decide a run: conf/ gives every constructor setting
    cfg = compose_plain(tmp_path, "experiment=demo")
    assert cfg["optim"]["head_lr_multiplier"] == 10.0 and cfg["data"]["num_workers"] == 0
    parts = check_config(cfg)
    assert parts.optimization.head_lr_multiplier == 10.0 and parts.data.num_workers == 0
    assert parts.eval.batch_size == cfg["eval"]["batch_size"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "freeze=last_n|freeze.vision_blocks=9",
            "freeze.vision_blocks=9 is out of range: the backbone's vision tower has 4 blocks",
        ),
        ("freeze=last_n|freeze.text_blocks=-1", "freeze.text_blocks=-1 must be"),
        # schedules that would never act were accepted silently
        ("freeze=gradual|freeze.every=100", "freeze.every=100 with trainer.max_epochs=80: .* would never act"),
        ("freeze=lp_ft|trainer.max_epochs=5", "freeze.stages.10 starts at epoch 10, but trainer.max_epochs=5"),
        ("freeze._target_=handclip.model.freeze.Nope", "freeze._target_='handclip.model.freeze.Nope' cannot be"),
        ("loss.terms.clip._target_=handclip.losses.Triplet", "loss.terms.clip._target_='handclip.losses.Triplet'"),
        ("loss.terms.clip.weight=-1", "loss: ContrastiveLoss.weight=-1 must be a number >= 0"),
        ("data.batch_size=1", "data.batch_size=1 is too small: a contrastive loss needs at least 2"),
        ("optim.lr=0", "optim.lr=0 must be"),
        ("optim.head_lr_multiplier=-1", "optim.head_lr_multiplier=-1 must be"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be"),
        ("projection=replace|projection.towers=[vision]|projection.dim=32", "both towers must share one width"),
        ('data.captions=["{person} {colour}"]', "unknown field 'colour'"),
        ("+data.augment.hflip=true", "turns a right hand into a left one"),
        ("data.on_bad_image=ignore", "data.on_bad_image='ignore': choose one of skip, fail"),
        (
            "freeze=last_n|+freeze.vision_block=2",
            "freeze.vision_block is not a freeze setting .did you mean freeze.vision_blocks",
        ),
        ("+optim.betas=[0.9,0.9]", "optim.betas is not a setting of handclip.train.optim.Optimization"),
        ("+max_epoch=3", "max_epoch is not a setting .did you mean trainer.max_epochs"),
        ("eval.batch_size=0", "eval.batch_size=0 must be an integer >= 1"),
        ("data.cache_size=abc", "data.cache_size='abc' must be"),
        ("seed=abc", "seed='abc' must be an integer"),
        ("seed=-1", "seed=-1 must be an integer from 0 to 4294967295"),
        ("trainer.gradient_clip_val=abc", "trainer: "),
        ("ckpt_path=last|init_from=x.ckpt", "ckpt_path and init_from together"),
        (
            "loss=strong",
            "loss.terms.identity needs P x K batches: set data.sampler=identity_balanced with "
            "data.images_per_identity>=2 and data.batch_size = data.identities_per_batch x data.images_per_identity "
            "(now data.sampler=random",
        ),
        (
            "experiment=demo_strong|data.images_per_identity=1|data.identities_per_batch=32",
            "now data.sampler=identity_balanced, data.images_per_identity=1",
        ),
        ("loss=strong|~loss.terms.identity", "loss.terms.triplet needs P x K batches"),
        ("eval.feature=bnneck", "eval.feature=bnneck needs a BN-neck: add an identity term to loss.terms"),
        ("eval.feature=cls", "eval.feature='cls': choose one of projected, pre_projection, bnneck, concat"),
        ("loss=strong|loss.terms.identity.feature=cls", "IdentityLoss.feature='cls' must be one of projected"),
        ("loss=strong|loss.terms.triplet.margin=-1", "TripletLoss.margin=-1 must be a number >= 0"),
        ("loss=siglip|loss.terms.siglip.init_bias=abc", "SigLIPLoss.init_bias='abc' must be a number"),
    ],
)
def test_bad_settings_are_refused_before_loading(tmp_path, override, message):
    cfg = compose_plain(tmp_path, "experiment=demo", *override.split("|"))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_config(cfg)


def test_missing_real_data_points_to_the_demo(tmp_path):
    cfg = compose_plain(tmp_path, "experiment=dorsal_hand")
    with pytest.raises(ConfigError, match=r"data.source.root=.*11k does not exist.*experiment=demo"):
        check_config(cfg)
    sources = (Path(__file__).resolve().parents[1] / "handclip").rglob("*.py")
    assert not [p for p in sources if "trust_remote_code=True" in p.read_text()]
