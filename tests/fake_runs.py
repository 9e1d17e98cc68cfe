"""Finished runs on disk without training: a run folder (config.yaml, checkpoints/best.ckpt, metrics.json)
whose checkpoint holds a tiny backbone with every weight moved, as training would leave it. Seconds, not the
minutes a real run takes, for the tests of what reads run folders (export, soups, model cards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml

from handclip.build import build
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
KEEP = {"_target_": "handclip.model.projection.Keep"}
FULL = {"_target_": "handclip.model.freeze.Full"}
HF_TINY = {"_target_": "handclip.model.HuggingFaceCLIP", **TINY}


def fake_run(
    run: Path, backbone: Mapping = HF_TINY, projection: Mapping = KEEP, freeze: Mapping = FULL, seed: int = 1,
    change: Callable[[dict], None] | None = None, metrics: Mapping | None = None,
):  # fmt: skip
    """Write a finished run into `run`; return its backbone as the checkpoint holds it (eval mode).

    `change` may alter the checkpoint's state dict (names without the `backbone.` prefix) before it is saved.
    """
    (run / "checkpoints").mkdir(parents=True)
    cache = run.parent / "cache"
    config = {"run_name": run.name, "backbone": dict(backbone), "projection": dict(projection),
              "freeze": dict(freeze), "paths": {"cache": str(cache)}}  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.json").write_text(json.dumps({"metrics": dict(metrics or {"val/rank1": 0.5})}))
    model = build(backbone, "backbone").load(cache)
    build(projection, "projection").apply(model)
    build(freeze, "freeze").adapt(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # "training": every weight and BatchNorm statistic moves
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if change:
        change(state)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()}}, run / "checkpoints" / "best.ckpt")
    return model.eval()


def model_folder(folder: Path, backbone: Mapping = HF_TINY) -> Path:
    """A CLIP model saved as anyone saves one (model, tokenizer and image processor by `save_pretrained`)."""
    model = build(backbone, "backbone").load(os.environ["HANDCLIP_CACHE"])
    for part in (model.model, model.tokenizer, model.image_processor):
        part.save_pretrained(folder)
    return folder


def command(*args, module: str = "handclip.export", env: Mapping | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository, offline; its output as text."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [environment.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=environment, cwd=ROOT)  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The refusal of a command: exit status 2 and one `error:` line, no traceback; the line."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]
