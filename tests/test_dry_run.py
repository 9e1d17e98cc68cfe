"""The dry run: the plan of a run from its configuration alone."""

import json
import subprocess

import pytest
from rich.console import Console

from handclip.train.dry_run import dry_run
from tests.test_config import compose_plain
from tests.test_train import train_command


def test_the_demo_plan_matches_what_training_would_freeze(tmp_path):
    from handclip.model import apply_freeze, load_backbone
    from handclip.train.config import build_components

    # the demo's architecture with random weights: loading the pretrained one would build it (minutes)
    cfg = compose_plain(tmp_path, "experiment=demo", "backbone=tiny")
    console = Console(record=True, width=160)
    plan = dry_run(cfg, console)
    text = console.export_text()
    assert "vision.blocks.3" in text and "96px, 6x6 patches" in text and "Nothing was loaded or written" in text
    parts = build_components(cfg)
    real = apply_freeze(load_backbone(cfg["backbone"], tmp_path / "cache"), parts.freeze)
    assert plan["trainable_parameters"] == real.trainable and plan["total_parameters"] == real.total
    assert {g["weight_decay"] for g in plan["optimizer_groups"]} == {0.0, cfg["optim"]["weight_decay"]}
    assert plan["memory_bytes"] > real.total * 4
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()  # no data prepared, nothing written


def test_a_schedule_is_planned_per_epoch(tmp_path):
    cfg = compose_plain(tmp_path, "experiment=demo", "freeze=gradual", "trainer.max_epochs=6")
    console = Console(record=True, width=200)
    dry_run(cfg, console)
    text = console.export_text()
    assert "unfreeze plan over 6 epochs" in text and "from epoch" in text
    assert "vision.blocks.3" in text.split("unfreeze plan")[1]


@pytest.mark.slow
def test_a_hub_backbone_needs_only_its_cached_config_no_data_no_network(tmp_path):
    from transformers import CLIPConfig

    # a Hugging Face cache holding only openai/clip-vit-base-patch32's config.json, as after a first download
    repo = tmp_path / "hf" / "hub" / "models--openai--clip-vit-base-patch32"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "config.json").write_text(json.dumps(CLIPConfig().to_dict()))
    command, env = train_command(tmp_path, "experiment=dorsal_hand", "dry_run=true", base=[])
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", COLUMNS="200")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "backbone vit_b32" in result.stdout and "7x7 patches" in result.stdout
    assert "87,849,216" in result.stdout  # the ViT-B/32 image tower, which text_frozen trains
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()
