"""A user adds a freeze policy and a loss of their own: one Python module and one config file each."""

import json
import textwrap
from pathlib import Path

import pytest

from handclip.data.prepare import derived_folder
from tests.runner import run_in_process
from tests.test_train import train_command

MODULE = '''
import torch.nn.functional as F

from handclip.losses import LossTerm
from handclip.model import FreezePolicy


class OnlyBiases(FreezePolicy):
    """BitFit-like: every bias trains, plus the projections."""

    def trains(self, group, name):
        return name.endswith(".bias") or group.kind == "projection"


class Alignment(LossTerm):
    """Pull each image towards its own caption: 1 - cosine similarity."""

    needs_text = True

    def forward(self, inputs):
        return 1 - F.cosine_similarity(inputs.image, inputs.text).mean()
'''

FREEZE = """
_target_: my_parts.OnlyBiases
train_logit_scale: false
"""

LOSS = """
_target_: handclip.losses.Objective
_partial_: true
terms:
  align: {_target_: my_parts.Alignment, weight: 1.0}
"""


@pytest.mark.slow
def test_a_policy_and_a_loss_from_outside_the_package_train_the_demo(tmp_path):
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "my_parts.py").write_text(textwrap.dedent(MODULE))
    for group, name, text in (("freeze", "only_biases", FREEZE), ("loss", "align", LOSS)):
        (tmp_path / "conf" / group).mkdir(parents=True)
        (tmp_path / "conf" / group / f"{name}.yaml").write_text(text)
    command, env = train_command(
        tmp_path / "work", "freeze=only_biases", "loss=align", "trainer.max_epochs=1", "run_name=own",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
    )  # fmt: skip
    env["PYTHONPATH"] += f":{tmp_path / 'ext'}"
    result = run_in_process(command, tmp_path / "work", env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "work" / "runs" / "own"
    payload = json.loads((run / "metrics.json").read_text())
    assert payload["freeze"]["policy"] == "only_biases"
    status = {g["group"]: g["trainable"] for g in payload["freeze"]["groups"]}
    assert status["logit_scale"] == "no" and status["vision.projection"] == "yes"
    assert status["vision.blocks.0"] == "partial" and status["text.embeddings"] == "no"
    assert 0.0 <= payload["metrics"]["test/rank1"] <= 1.0
    assert "val/rank1" in (run / "logs" / "metrics.csv").read_text()


READER = '''
from dataclasses import dataclass
from pathlib import Path

from handclip.data.readers import ImageRecord
from handclip.data.sources import DataSource


@dataclass
class FolderPerPerson(DataSource):
    """ROOT/<person>/<picture>: one folder per person; split by person (the default split)."""

    suffix: str = ".jpg"

    def read(self, folder):
        pictures = sorted(Path(folder).glob(f"*/*{self.suffix}"))
        return [ImageRecord(f"{p.parent.name}/{p.name}", p.parent.name, "", where=str(p)) for p in pictures]
'''

READER_CONFIG = """
defaults:
  - loader@_here_: default   # the data module, the draw, the loader, sampler and cache settings
  - _self_
name: my_reader
source:
  _target_: my_reader.FolderPerPerson
  root: ${paths.data}/people
captions:
  - "a photo of the hand of person {person}"
"""


@pytest.mark.slow
def test_a_dataset_reader_from_outside_the_package_trains_the_demo(tmp_path):
    from handclip.data.synthetic import generate_hands
    from tests.test_train import QUICK

    generate_hands(tmp_path / "drawn", identities=10, seed=4, image_size=(96, 72), aspects=["dorsal right"])
    for line in (tmp_path / "drawn" / "HandInfo.csv").read_text().splitlines()[1:]:
        person, name = line.split(",")[0], line.split(",")[7]
        (tmp_path / "work" / "data" / "people" / person).mkdir(parents=True, exist_ok=True)
        (tmp_path / "drawn" / "Hands" / name).rename(tmp_path / "work" / "data" / "people" / person / name)
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "my_reader.py").write_text(textwrap.dedent(READER))
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "my_reader.yaml").write_text(READER_CONFIG)
    base = [q for q in QUICK if not q.startswith("data.source")]
    command, env = train_command(
        tmp_path / "work", "data=my_reader", "data.num_workers=0", "run_name=mine",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", base=base,
    )  # fmt: skip
    env["PYTHONPATH"] += f":{tmp_path / 'ext'}"
    result = run_in_process(command, tmp_path / "work", env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "work" / "runs" / "mine" / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["test/rank1"] <= 1.0 and "test Rank-1" in result.stdout
    derived = derived_folder(tmp_path / "work" / "data" / "people", Path(env["HANDCLIP_CACHE"]) / "data")
    (manifest,) = (derived / "splits").glob("folderperperson_*_draw0_runs2.csv")
    assert "0000" in manifest.read_text()  # the people's folder names are the identities
