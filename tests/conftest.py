"""Shared fixtures: a tiny CLIP (no download), offline settings, synthetic hands."""

from __future__ import annotations

import os

# several test processes (pytest-xdist, `make test`) share the cores: each takes its share of threads
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
                 // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))  # fmt: skip
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("MKL_NUM_THREADS", str(_share))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs the same examples every time; locally every run explores new ones
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

TINY = {
    "name": "tiny",
    "source": "tiny",
    "seed": 0,
    "config": {
        "projection_dim": 16,
        "vision_config": {"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 3, "num_attention_heads": 2},
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "max_position_embeddings": 77},
    },
}  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    # the session's tests build tiny backbones in one cache of their own (each once), never in ~/.cache
    before = os.environ.get("HANDCLIP_CACHE")
    os.environ["HANDCLIP_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    yield
    if before is None:
        os.environ.pop("HANDCLIP_CACHE", None)
    else:
        os.environ["HANDCLIP_CACHE"] = before


@pytest.fixture
def tiny_model():
    """A tiny randomly initialised CLIP backbone: 3 vision blocks, 2 text blocks, no tokenizer."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    from handclip.model.hf import HFBackbone, tiny_clip_config

    torch.manual_seed(0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return HFBackbone(CLIPModel(tiny_clip_config(TINY["config"])), None, processor, "tiny")


@pytest.fixture(scope="session")
def synthetic_hands(tmp_path_factory):
    """A small synthetic 11k Hands folder (12 identities, 4 aspects, 160x120 images)."""
    from handclip.data.synthetic import generate_hands

    root = tmp_path_factory.mktemp("hands")
    generate_hands(root, identities=12, seed=3, image_size=(160, 120))
    return root


@pytest.fixture(scope="session")
def pretrained_cache(tmp_path_factory):
    """A cache directory shared by the tests that use the demo's pretrained tiny backbone (built once, by the first)."""
    return tmp_path_factory.mktemp("pretrained-cache")


def pytest_collection_modifyitems(config, items):
    """The longest test first (it builds the demo's pretrained backbone: minutes), so that with several test
    processes it runs beside the others instead of after them."""
    items.sort(key=lambda item: item.get_closest_marker("pretrained") is None)
