from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from handclip.errors import ConfigError
from handclip.train.config import check_config

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_plain(tmp_path, *overrides) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root={tmp_path}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(tmp_path, experiment):
    cfg = compose_plain(tmp_path, f"experiment={experiment}")
    assert cfg["name"] == experiment
    assert cfg["data"]["batch_size"] >= 2 and cfg["freeze"]["name"]
    assert {"backbone", "freeze", "projection", "loss", "optim", "data", "trainer", "logger"} <= set(cfg)


def test_published_experiments_use_the_protocol_settings(tmp_path):
    aspects = {
        e: compose_plain(tmp_path, f"experiment={e}")["data"]["aspect"]
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
    assert cfg["freeze"]["name"] == "text_frozen" and cfg["data"]["no_accessories"] is True


def test_demo_config_passes_the_checks(tmp_path):
    facts = check_config(compose_plain(tmp_path, "experiment=demo"))
    assert facts["vision_depth"] == 4 and facts["text_depth"] == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("freeze.vision_blocks=9", "freeze.vision_blocks=9 is out of range: the backbone's vision tower has 4 blocks"),
        ("freeze.text_blocks=-1", "freeze.text_blocks=-1 is out of range"),
        ("freeze.name=some", "freeze.name='some' is not a policy; choose one of full, frozen"),
        ("loss.name=triplet", "loss.name='triplet' is not a loss; choose one of clip"),
        ("data.batch_size=1", "data.batch_size=1 is too small: a contrastive loss needs at least 2"),
        ("optim.lr=0", "optim.lr=0 is out of range"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 is out of range"),
        ("projection=replace|projection.towers=[vision]|projection.dim=32", "both towers must share one width"),
        ('data.captions=["{person} {colour}"]', "unknown field 'colour'"),
        ("+data.augment.hflip=true", "turns a right hand into a left one"),
        ("data.on_bad_image=ignore", "data.on_bad_image='ignore': choose one of skip, fail"),
    ],
)
def test_bad_settings_are_refused_before_loading(tmp_path, override, message):
    cfg = compose_plain(tmp_path, "experiment=demo", *override.split("|"))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_config(cfg)


def test_missing_real_data_points_to_the_demo(tmp_path):
    cfg = compose_plain(tmp_path, "experiment=dorsal_hand")
    with pytest.raises(ConfigError, match=r"data.root=.*11k does not exist.*experiment=demo"):
        check_config(cfg)
