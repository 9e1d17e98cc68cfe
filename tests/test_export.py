import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from handclip.errors import HandClipError
from handclip.export import export, load_run_model
from tests.test_train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    train(root, "eval.baseline=false", "run_name=r", "trainer.max_epochs=2")
    return root


def test_exported_directory_loads_in_plain_transformers_with_the_same_embeddings(finished_run, tmp_path):
    from transformers import CLIPModel

    from handclip.model.hf import HFBackbone

    out = export(finished_run / "runs" / "r", tmp_path / "model")
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
    }
    backbone, _ = load_run_model(finished_run / "runs" / "r")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = backbone.eval().encode_image(pixels)
        loaded = HFBackbone(CLIPModel.from_pretrained(out), None, backbone.image_processor).eval().encode_image(pixels)
    assert torch.allclose(expected, loaded, atol=1e-6)
    # a zero-shot pipeline, in a process where handclip cannot be imported
    script = (
        "import sys; sys.modules['handclip'] = None\n"
        "from PIL import Image\nfrom transformers import pipeline\n"
        f"p = pipeline('zero-shot-image-classification', model={str(out)!r})\n"
        "result = p(Image.new('RGB', (64, 48), (200, 150, 120)), candidate_labels=['a dorsal hand', 'a palmar hand'])\n"
        "print(sorted(r['label'] for r in result))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "['a dorsal hand', 'a palmar hand']" in result.stdout


def test_wise_ft_interpolates_with_the_original(finished_run, tmp_path):
    from transformers import CLIPModel

    from handclip.model import load_backbone

    run = finished_run / "runs" / "r"
    tuned, config = load_run_model(run)
    original = load_backbone(config["backbone"], config["paths"]["cache"]).model
    half = CLIPModel.from_pretrained(export(run, tmp_path / "half", alpha=0.5))
    zero = CLIPModel.from_pretrained(export(run, tmp_path / "zero", alpha=0.0))
    name = "visual_projection.weight"
    a, b = original.state_dict()[name], tuned.model.state_dict()[name]
    assert not torch.allclose(a, b)
    assert torch.allclose(half.state_dict()[name], (a + b) / 2, atol=1e-6)
    assert torch.allclose(zero.state_dict()[name], a, atol=1e-6)
    with pytest.raises(HandClipError, match=r"alpha must be in \[0, 1\]"):
        export(run, tmp_path / "bad", alpha=1.5)


def test_wise_ft_is_refused_for_replaced_projections(tmp_path):
    train(
        tmp_path, "eval.baseline=false", "run_name=p", "trainer.max_epochs=1", "projection=replace", "projection.dim=8"
    )
    with pytest.raises(HandClipError, match="replaced its projection heads"):
        export(tmp_path / "runs" / "p", tmp_path / "out", alpha=0.5)
    # without WiSE-FT it exports, at the new width
    from transformers import CLIPModel

    assert CLIPModel.from_pretrained(export(tmp_path / "runs" / "p", tmp_path / "out")).config.projection_dim == 8


def test_feature_cli_embeds_a_folder(finished_run, tmp_path):
    out = export(finished_run / "runs" / "r", tmp_path / "model")
    images = finished_run / "data" / "synthetic_hands" / "Hands"
    result = subprocess.run(
        [sys.executable, "-m", "handclip.features", str(out), str(images), "--out", str(tmp_path / "f.npz")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    saved = np.load(tmp_path / "f.npz")
    width = json.loads((out / "config.json").read_text())["projection_dim"]
    assert len(saved["names"]) == len(list(images.glob("*.jpg"))) and saved["features"].shape[1] == width
    assert np.allclose(np.linalg.norm(saved["features"], axis=1), 1.0, atol=1e-5)
    assert saved["names"][0] in result.stdout
