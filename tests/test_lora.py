import json
import subprocess
import sys

import pytest
import torch

from handclip.errors import ConfigError
from handclip.model import apply_freeze, trainable_parameter_names
from handclip.model.lora import Lora, merge_lora
from tests.test_train import train


def lora(**changes) -> Lora:
    settings = {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "v"], "towers": ["vision"], "blocks": 2}
    return Lora(**{**settings, **changes})


def test_only_the_adapters_and_projections_train_and_the_table_counts_them(tiny_model):
    report = apply_freeze(tiny_model, lora())
    names = set(trainable_parameter_names(tiny_model))
    adapters = {n for n in names if "lora_" in n}
    assert {n.split(".self_attn")[0] for n in adapters} == {
        "vision_model.encoder.layers.1",
        "vision_model.encoder.layers.2",
    }
    assert names - adapters == {"visual_projection.weight", "text_projection.weight", "logit_scale"}
    assert sum(p.numel() for n, p in tiny_model.model.named_parameters() if "lora_" in n) == 2 * 2 * (2 * 4 * 32)
    rows = {r.group: r for r in report.rows}
    assert rows["vision.blocks.2"].status == "partial" and rows["vision.blocks.0"].status == "no"
    assert report.trainable == 1024 + 2 * 16 * 32 + 1
    apply_freeze(tiny_model, lora())  # applying again adds nothing
    assert sum("lora_" in n for n, _ in tiny_model.model.named_parameters()) == len(adapters)


def test_merging_keeps_the_adapted_embeddings_and_leaves_a_plain_model(tiny_model, tmp_path):
    from transformers import CLIPModel

    apply_freeze(tiny_model, lora(targets=["q", "k", "v", "out", "fc1"]))
    with torch.no_grad():
        for name, parameter in tiny_model.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # trained adapters are not zero
    pixels = torch.randn(2, 3, 32, 32)
    tiny_model.eval()
    with torch.no_grad():
        adapted = tiny_model.encode_image(pixels)
        assert merge_lora(tiny_model) == 2 * 5
        assert torch.allclose(tiny_model.encode_image(pixels), adapted, atol=1e-5)
    assert not any("lora_" in n or "base_layer" in n for n, _ in tiny_model.model.named_parameters())
    tiny_model.model.save_pretrained(tmp_path / "merged")
    assert torch.allclose(CLIPModel.from_pretrained(tmp_path / "merged").visual_projection.weight,
                          tiny_model.model.visual_projection.weight)  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": 0}, "freeze.rank=0"),
        ({"targets": ["qkv"]}, "freeze.targets=\\['qkv'\\]: choose from q, k, v, out, fc1, fc2"),
        ({"towers": ["audio"]}, "freeze.towers"),
        ({"dropout": 1.0}, "freeze.dropout=1.0"),
    ],
)
def test_bad_lora_settings_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        lora(**changes)


def test_a_rank_above_the_layers_width_is_refused(tiny_model):
    # rank 100000 was accepted: 204M trainable parameters for adapters whose rank can be at most the width
    width = tiny_model.facts.vision.width
    message = f"freeze.rank=100000 is out of range: the backbone's vision tower is {width}"
    with pytest.raises(ConfigError, match=message):
        apply_freeze(tiny_model, lora(rank=100000))
    apply_freeze(tiny_model, lora(rank=width))  # the full rank is allowed


def test_more_blocks_than_the_tower_has_is_refused(tiny_model):
    with pytest.raises(ConfigError, match="freeze.blocks=4 is out of range: the backbone's vision tower has 3"):
        apply_freeze(tiny_model, lora(blocks=4))


@pytest.mark.slow
def test_a_lora_run_resumes_and_exports_a_model_that_loads_without_peft_or_handclip(tmp_path):
    from handclip.export import export, load_run_model

    run = ["freeze=lora", "freeze.blocks=1", "freeze.targets=[q,v,fc1]", "eval.baseline=false", "run_name=l"]
    train(tmp_path, *run, "trainer.max_epochs=1")
    result = train(tmp_path, *run, "trainer.max_epochs=2", "ckpt_path=last")
    assert "resuming" in result.stdout
    out = export(tmp_path / "runs" / "l", tmp_path / "model", alpha=1.0)  # the unmixed weights, as load_run_model
    backbone, _ = load_run_model(tmp_path / "runs" / "l")
    pixels = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    with torch.no_grad():
        expected = backbone.eval().encode_image(pixels)
    torch.save(pixels, tmp_path / "pixels.pt")
    script = (
        "import sys; sys.modules['handclip'] = None; sys.modules['peft'] = None\n"
        "import torch; from transformers import CLIPModel\n"
        f"model = CLIPModel.from_pretrained({str(out)!r}).eval()\n"
        f"pixels = torch.load({str(tmp_path / 'pixels.pt')!r})\n"
        "with torch.no_grad(): out = model.get_image_features(pixel_values=pixels)\n"
        "out = out if isinstance(out, torch.Tensor) else out.pooler_output\n"
        "print(__import__('json').dumps(out.tolist()))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert torch.allclose(torch.tensor(json.loads(loaded.stdout)), expected, atol=1e-5)
