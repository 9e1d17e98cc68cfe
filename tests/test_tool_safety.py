"""What the tools that read other people's folders refuse, and what they say: export, soups, features, model cards.

A run folder may come from someone else: its config.yaml must not run code here, its weights may be broken; an
output path may be taken, read-only or blocked by a file. Every refusal is one `error:` line, exit status 2,
and writes nothing. Runs are faked on disk (tests.fake_runs), so these tests take seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from handclip.errors import HandClipError
from handclip.tools.export import MARKER, export
from handclip.tools.soup import soup
from tests.fake_runs import HF_TINY, command, fake_run, one_error_line

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
VIT = {"_target_": "handclip.model.openclip.OpenCLIP", "name": "tiny-vit", "seed": 0, "pretrained": None,
       "config": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 2,
                                                   "head_width": 16}, "text_cfg": TEXT}}  # fmt: skip
# a tiny SigLIP whose embedding (its pooling head's output, the image tower's width) is 16 wide, as the others'
SIGLIP = {"_target_": "handclip.model.HuggingFaceSigLIP", "name": "tiny-siglip", "source": "tiny", "seed": 0,
          "config": {"vision_config": {"image_size": 32, "patch_size": 16, "hidden_size": 16, "intermediate_size": 32,
                                       "num_hidden_layers": 2, "num_attention_heads": 2},
                     "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "max_position_embeddings": 64}}}  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny Hugging Face run (copy it before changing it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    fake_run(run)
    return run


def copy_run(run: Path, to: Path, **sections) -> Path:
    """A copy of `run` whose config.yaml has `sections` in place of its own."""
    shutil.copytree(run, to)
    config = yaml.safe_load((to / "config.yaml").read_text())
    (to / "config.yaml").write_text(yaml.safe_dump({**config, **sections}))
    return to


def images(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(count):
        Image.new("RGB", (80, 60), (40 * number, 120, 90)).save(folder / f"{number}.jpg")
    return folder


# --- a run folder's config.yaml builds HandCLIP's components only --------------------------------------------


@pytest.mark.parametrize(
    "section, target",
    [("backbone", "os.system"), ("projection", "subprocess.getoutput"), ("freeze", "handclip.io.os.system")],
)
def test_export_refuses_a_config_that_names_code_from_elsewhere(finished, tmp_path, section, target):
    ran = tmp_path / "ran"
    spec = {"_target_": target, ("cmd" if "getoutput" in target else "command"): f"touch {ran}"}
    run = copy_run(finished, tmp_path / "run", **{section: spec})
    line = one_error_line(command(run, tmp_path / "out"))
    assert f"{section}._target_={target} is refused" in line and "handclip" in line
    assert not ran.exists() and not (tmp_path / "out").exists()


def test_a_soup_refuses_a_point_whose_config_names_code_from_elsewhere(finished, tmp_path):
    ran = tmp_path / "ran"
    copy_run(finished, tmp_path / "sweep" / "a")
    copy_run(finished, tmp_path / "sweep" / "b", freeze={"_target_": "os.system", "command": f"touch {ran}"})
    line = one_error_line(command("--soup", tmp_path / "sweep", tmp_path / "out"))
    assert "freeze._target_=os.system is refused" in line
    # a greedy soup builds the first point's whole config (data, objective): all of it is checked first
    shutil.rmtree(tmp_path / "sweep" / "b")
    copy_run(finished, tmp_path / "greedy" / "a", loss={"_target_": "os.system", "command": f"touch {ran}"})
    line = one_error_line(command("--soup", tmp_path / "greedy", tmp_path / "out", "--greedy"))
    assert "loss._target_=os.system is refused" in line
    assert not ran.exists() and not (tmp_path / "out").exists()


def test_a_policy_of_ones_own_is_built_when_its_module_is_trusted(finished, tmp_path):
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "my_parts.py").write_text(
        "from handclip.model import FreezePolicy\n\n\n"
        "class OnlyBiases(FreezePolicy):\n"
        "    def trains(self, group, name):\n"
        "        return name.endswith('.bias')\n"
    )
    run = copy_run(finished, tmp_path / "run", freeze={"_target_": "my_parts.OnlyBiases"})
    env = {"PYTHONPATH": str(tmp_path / "ext")}
    line = one_error_line(command(run, tmp_path / "out", env=env))
    assert "freeze._target_=my_parts.OnlyBiases is refused" in line and "--trust my_parts" in line
    done = command(run, tmp_path / "out", "--trust", "my_parts", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / MARKER).read_text())["format"] == "transformers"


# --- weights that are not finite --------------------------------------------------------------------------


def test_export_and_soups_refuse_weights_that_are_not_finite(tmp_path):
    def poison(state):
        state["model.text_model.encoder.layers.1.mlp.fc1.weight"][0, 0] = float("nan")

    run = tmp_path / "sweep" / "b"
    fake_run(run, change=poison)
    with pytest.raises(HandClipError, match=r"export: model.text_model.encoder.layers.1.mlp.fc1.weight holds NaN"):
        export(run, tmp_path / "out")
    fake_run(tmp_path / "sweep" / "a", change=lambda state: state["model.logit_scale"].fill_(float("inf")))
    with pytest.raises(HandClipError, match=r"soup ingredient a: model.logit_scale holds infinite values"):
        soup(tmp_path / "sweep", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*out.*"))


# --- soups ------------------------------------------------------------------------------------------------


def test_a_soup_of_one_point_says_it_is_that_points_weights(finished, tmp_path):
    copy_run(finished, tmp_path / "sweep" / "a")
    unfinished = copy_run(finished, tmp_path / "sweep" / "b")
    (unfinished / "metrics.json").unlink()
    result = command("--soup", tmp_path / "sweep", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: a soup of one: the sweep has only one finished point, so this export is a's own weights" \
        in result.stderr  # fmt: skip
    assert "a soup of one" in (tmp_path / "out" / "README.md").read_text()


def test_a_soup_refuses_points_whose_adapters_differ_before_loading_any(tmp_path):
    lora = {"_target_": "handclip.model.lora.Lora", "rank": 2, "alpha": 4, "dropout": 0.0, "targets": ["q", "v"],
            "towers": ["vision"], "blocks": 1}  # fmt: skip
    fake_run(tmp_path / "s" / "a", freeze=lora)
    fake_run(tmp_path / "s" / "b", freeze={**lora, "rank": 4})
    for point in ("a", "b"):  # nothing is loaded: the refusal comes from the configs and the models' skeletons
        (tmp_path / "s" / point / "checkpoints" / "best.ckpt").write_bytes(b"")
    with pytest.raises(HandClipError, match=r"b cannot go in a soup with a: its adapters differ \(lora \(rank 4.* vs "
                                            r"lora \(rank 2"):  # fmt: skip
        soup(tmp_path / "s", tmp_path / "out")
    fake_run(tmp_path / "t" / "a", freeze=lora)
    fake_run(tmp_path / "t" / "b", freeze={**lora, "train_norms": True})  # the same adapters: one model
    out = soup(tmp_path / "t", tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "lora (rank 2, alpha 4, q+v in the top 1 blocks of vision): the adapters of 2 layers merged" in card


# --- features ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(finished, tmp_path_factory) -> Path:
    return export(finished, tmp_path_factory.mktemp("exported") / "model")


def test_features_never_overwrites_a_file_it_did_not_write(exported, tmp_path):
    pictures = images(tmp_path / "images")
    config = (exported / "config.json").read_text()
    line = one_error_line(command(exported, pictures, "--out", exported / "config.json", module="handclip.features"))
    assert "is inside the model folder" in line and (exported / "config.json").read_text() == config
    notes = tmp_path / "notes.npz"
    notes.write_text("mine")
    line = one_error_line(command(exported, pictures, "--out", notes, module="handclip.features"))
    assert "exists and is not a features file this command wrote" in line and "--overwrite" in line
    assert notes.read_text() == "mine"
    for args in ((), (), ("--overwrite",)):  # a new file; a features file of ours, replaced; --overwrite
        done = command(exported, pictures, "--out", tmp_path / "f.npz", *args, module="handclip.features")
        assert done.returncode == 0, done.stderr[-2000:]
        assert np.load(tmp_path / "f.npz")["features"].shape == (3, 16)
    done = command(exported, pictures, "--out", notes, "--overwrite", module="handclip.features")
    assert done.returncode == 0 and np.load(notes)["features"].shape == (3, 16)


def test_features_refuses_pickled_weights_in_one_line_without_loading_them(exported, tmp_path):
    from safetensors.torch import load_file

    model = shutil.copytree(exported, tmp_path / "pickled")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    line = one_error_line(command(model, images(tmp_path / "images"), module="handclip.features"))
    assert "pytorch_model.bin holds pickled weights" in line and "safetensors" in line
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {ran}",)

    torch.save({"x": Payload()}, model / "pytorch_model.bin")
    one_error_line(command(model, tmp_path / "images", module="handclip.features"))
    assert not ran.exists()


# --- where the tools write --------------------------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write into (root: made immutable, where the file system lets us)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):  # root may write anyway
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            folder.chmod(0o755)
            pytest.skip("this user writes into read-only folders and chattr is not available")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_a_read_only_or_blocked_output_is_refused_before_any_work(finished, exported, read_only, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    run = copy_run(finished, tmp_path / "run")
    (run / "checkpoints" / "best.ckpt").write_bytes(b"")  # loading it would fail: the refusal must come first
    pictures = images(tmp_path / "images")
    cases = [
        ((run, read_only / "model"), "handclip.export", "cannot be written"),
        ((run, blocker / "model"), "handclip.export", "a-file is a file"),
        ((exported, pictures, "--out", read_only / "f.npz"), "handclip.features", "cannot be written"),
        ((exported, pictures, "--out", blocker / "sub" / "f.npz"), "handclip.features", "a-file is a file"),
    ]
    for args, module, message in cases:
        line = one_error_line(command(*args, module=module))
        assert message in line, line
    assert not list(read_only.iterdir()) and blocker.read_text() == "in the way"


# --- the model card ---------------------------------------------------------------------------------------

EPILOGUE = {
    "transformers": 'pixels = processor(images=image, return_tensors="pt")["pixel_values"]',
    "open_clip": "pixels = preprocess(image).unsqueeze(0)",
}


@pytest.mark.parametrize("backbone, library", [(HF_TINY, "transformers"), (SIGLIP, "transformers"), (VIT, "open_clip")],
                         ids=["hf", "siglip", "open_clip"])  # fmt: skip
def test_the_model_cards_loading_code_runs_and_gives_the_models_embedding(tmp_path, backbone, library):
    model = fake_run(tmp_path / "run", backbone=backbone)
    out = export(tmp_path / "run", tmp_path / "model")
    card = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    picture = images(tmp_path / "images", 1) / "0.jpg"
    code = code.replace("PATH_TO_THIS_FOLDER", str(out)).replace("hand.jpg", str(picture))
    prelude = ["import sys", "sys.modules['handclip'] = None  # no HandCLIP", "import torch", "from PIL import Image",
               f"image = Image.open(r'{picture}')"]  # fmt: skip
    script = "\n".join(prelude) + "\n" + code + "\n"
    saved = tmp_path / "out.pt"
    script += f"{EPILOGUE[library]}\ntorch.save({{'features': features, 'pixels': pixels}}, r'{saved}')\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = torch.load(saved, weights_only=False)
    assert isinstance(saved["features"], torch.Tensor) and saved["features"].shape == (1, 16)
    with torch.no_grad():
        torch.testing.assert_close(saved["features"], model.encode_image(saved["pixels"]), atol=1e-5, rtol=1e-4)


def test_the_card_describes_the_initial_weights_as_they_were(tmp_path):
    from handclip.build import build
    from handclip.tools.card import model_card

    pretrained = {**yaml.safe_load(Path("conf/backbone/tiny.yaml").read_text()),
                  **{k: v for k, v in yaml.safe_load(Path("conf/backbone/tiny_pretrained.yaml").read_text()).items()
                     if k != "defaults"}}  # fmt: skip
    backbone = build(HF_TINY, "backbone").skeleton()
    cards = {}
    for name, spec in (("random", HF_TINY), ("pretrained", pretrained), ("hub", {**HF_TINY, "source": "org/model",
                                                                                 "config": None})):  # fmt: skip
        config = {"backbone": spec, "projection": {}, "freeze": {}}
        cards[name] = model_card(config, None, None, spec=build(spec, "backbone"), backbone=backbone, weights="raw")
    assert "a tiny CLIP built from a config, random initial weights (seed 0)" in cards["random"]
    assert "pretrained contrastively on synthetic hands: 384 people the demo never sees" in cards["pretrained"]
    assert "random" not in cards["pretrained"].split("## Base model")[1].split("##")[0]
    assert "base_model: org/model" in cards["hub"] and "org/model (Hugging Face hub)" in cards["hub"]


def _caption_payload(tmp_path, train=(30, 120), metrics=None, warnings=()):
    """metrics.json of a finished caption run, with its manifest's sizes beside it."""
    manifest = tmp_path / "splits" / "csv_captions_draw0_runs2.csv"
    manifest.parent.mkdir(parents=True)
    sizes = {"train": {"identities": train[0], "images": train[1]}, "val": {"identities": train[0], "images": 30},
             "query0": {"identities": 10, "images": 40}, "gallery0": {"identities": 10, "images": 10}}  # fmt: skip
    manifest.with_suffix(".json").write_text(json.dumps({"sizes": sizes}))
    scores = {"retrieval/text_to_image_R@1": 0.3, "baseline/retrieval/text_to_image_R@1": 0.1,
              "retrieval/image_to_text_R@5": 0.8, "test/rank1": 0.9, "test/rank1_std": 0.02, "test/mAP": 0.85,
              "selection/epoch": 3, **(metrics or {})}  # fmt: skip
    runs = [{"run": i, "rank1": 0.9, "rank5": 1.0, "rank10": 1.0, "mAP": 0.85} for i in range(2)]
    return {"metrics": scores, "runs": {"fine-tuned": {"test": runs}}, "manifest": str(manifest),
            "eval_feature": "projected", "weights": "raw", "warnings": list(warnings)}  # fmt: skip


def test_a_caption_runs_card_names_its_data_and_leads_with_retrieval(tmp_path):
    from huggingface_hub import ModelCard

    from handclip.build import build
    from handclip.tools.card import model_card

    hub = {**HF_TINY, "source": "org/model", "config": None}
    config = {"run_name": "petals", "backbone": hub, "projection": {"_target_": "handclip.model.projection.Keep"},
              "freeze": {}, "eval": {"select": "val/mAP"}, "trainer": {"max_epochs": 8},
              "data": {"name": "captions", "runs": 2, "captions": ["{caption}"], "source": {
                  "_target_": "handclip.data.sources.CaptionCSV", "root": "/data/my_flowers"}}}  # fmt: skip
    backbone = build(HF_TINY, "backbone").skeleton()
    warned = "the selected checkpoint is from epoch 0: the reported model is the untrained one"
    text = model_card(config, _caption_payload(tmp_path, warnings=[warned]), "freeze policy: text_frozen",
                      spec=build(hub, "backbone"), backbone=backbone, weights="raw")  # fmt: skip
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "org/model" and card.data.datasets == ["my_flowers"]
    assert "image-text-retrieval" in card.data.tags and "hand-re-identification" not in card.data.tags
    results = {r.metric_type: r for r in card.data.eval_results}
    assert list(results)[0] == "retrieval/text_to_image_R@1"
    assert results["retrieval/text_to_image_R@1"].metric_value == 0.3
    assert "retrieval" in results["retrieval/image_to_text_R@5"].metric_config
    assert "one gallery image per identity" in results["test/rank1"].metric_config  # not an aspect of a hand
    assert card.data.model_name == "petals" and card.data.eval_results[0].dataset_config == "CaptionCSV"
    body = card.text
    assert "hand" not in body.split("## How to load")[0].lower().replace("handclip", "")
    assert "for image-text retrieval and re-identification of the identities it names on `my_flowers`" in body
    assert "a caption CSV" in body and "training: 30 identities, 120 images" in body
    assert "test: 10 identities never trained on, 40 query and 10 gallery images" in body
    assert "text-to-image R@1 **30.0%** (untrained 10.0%)" in body and "Rank-1 **90.0%** ± 2.0" in body
    assert "org/model (Hugging Face hub)" in body and "checkpoint: epoch 3, chosen by val/mAP" in body
    assert f"- {warned}" in body


def test_a_caption_card_without_identities_reports_retrieval_alone(tmp_path):
    from huggingface_hub import ModelCard

    from handclip.build import build
    from handclip.tools.card import model_card

    config = {"backbone": HF_TINY, "projection": {}, "freeze": {},
              "data": {"source": {"_target_": "handclip.data.sources.ImageFolder", "root": "/d/pets"}}}  # fmt: skip
    backbone = build(HF_TINY, "backbone").skeleton()
    text = model_card(config, _caption_payload(tmp_path, train=(40, 40)), None, spec=build(HF_TINY, "backbone"),
                      backbone=backbone, weights="raw")  # fmt: skip
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    assert {r.metric_type for r in card.data.eval_results} == {"retrieval/text_to_image_R@1",
                                                                 "retrieval/image_to_text_R@5"}  # fmt: skip
    assert "each image is its own" in card.text and "random initial weights (seed 0)" in card.text


@pytest.mark.parametrize("text, message", [("", "holds nothing, not the mapping"), ("- a\n", "holds a list"),
                                           ("backbone: [\n", "is damaged or unreadable"),
                                           ("name: x\n", "has no backbone section")])  # fmt: skip
def test_a_damaged_config_yaml_is_one_line_naming_it(finished, tmp_path, text, message):
    run = shutil.copytree(finished, tmp_path / "run")
    (run / "config.yaml").write_text(text)  # was: a traceback from yaml or from None.get
    line = one_error_line(command(run, tmp_path / "out"))
    assert f"{run / 'config.yaml'}" in line and message in line and not (tmp_path / "out").exists()


def test_what_a_killed_export_left_is_removed_by_the_next_and_a_running_ones_is_not(finished, tmp_path):
    # a kill between writing and moving into place left a hidden folder of the model's size there for good
    dead = tmp_path / "out.tmp999999999"  # no such process
    running = tmp_path / f"out.tmp{os.getppid()}"  # a process that is alive
    for leftover in (dead, running):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half written")
    out = export(finished, tmp_path / "out")
    assert (out / MARKER).is_file() and not dead.exists() and running.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", running.name]
