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

    out = export(finished_run / "runs" / "r", tmp_path / "model", alpha=1.0)  # unmixed, as load_run_model gives
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
    out = export(finished_run / "runs" / "r", tmp_path / "model", alpha=1.0)  # unmixed, as load_run_model gives
    (images,) = (finished_run / "data" / "synthetic_hands").glob("*_draw0/Hands")
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


def test_feature_cli_skips_what_is_not_an_image_and_refuses_bad_paths_at_once(finished_run, tmp_path):
    import shutil

    out = export(finished_run / "runs" / "r", tmp_path / "model", alpha=1.0)  # unmixed, as load_run_model gives
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((finished_run / "data" / "synthetic_hands").glob("*_draw0/Hands/*.jpg"))[:3]:
        shutil.copy(source, images / source.name)
    (images / "notes.jpg").write_text("not an image")
    (images / "folder.jpg").mkdir()

    def features(*args):
        command = [sys.executable, "-m", "handclip.features", *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    result = features(out, images, "--out", tmp_path / "f")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipping" in result.stderr and "notes.jpg" in result.stderr
    assert len(np.load(tmp_path / "f")["names"]) == 3 and not (tmp_path / "f.npz").exists()  # the name as given
    for args, message in (
        ((out, tmp_path / "nowhere"), "no such folder of images"),
        ((tmp_path / "no-model", images), "is not a model directory"),
        ((out, images, "--out", tmp_path / "no" / "dir" / "f.npz"), "does not exist"),
        ((out, images, "--out", images), "is a folder: give a file name"),
    ):
        bad = features(*args)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr


# --- exporting never destroys what it did not make ------------------------------------------------


def test_export_refuses_a_folder_with_other_files_and_never_touches_a_run(finished_run, tmp_path):
    run = finished_run / "runs" / "r"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(HandClipError, match="not empty and is not a previous export"):
        export(run, mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    for target in (run, run.parent, run / ".."):  # the run itself, or a folder that holds it
        with pytest.raises(HandClipError, match="holds the run"):
            export(run, target, overwrite=True)
    with pytest.raises(HandClipError, match="is inside the run"):
        export(run, run / "exported")
    with pytest.raises(HandClipError, match="is a run directory"):
        export(run, _other_run(tmp_path), overwrite=True)
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    # --overwrite writes the model's files into the folder and leaves the rest
    export(run, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".mine.*"))


def _other_run(tmp_path):
    other = tmp_path / "other_run"
    (other / "checkpoints").mkdir(parents=True)
    return other


def test_a_previous_export_is_replaced_whole(finished_run, tmp_path):
    from transformers import CLIPModel

    run = finished_run / "runs" / "r"
    out = export(run, tmp_path / "model")
    (out / "stale.bin").write_bytes(b"old")  # a file from the previous export's time
    export(run, tmp_path / "model", alpha=0.5)
    assert not (out / "stale.bin").exists() and json.loads((out / "handclip_export.json").read_text())["wise_ft"] == 0.5
    assert CLIPModel.from_pretrained(out).config.projection_dim == 64


def test_export_errors_exit_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "handclip.export", str(tmp_path / "no-run"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
