"""Validate a whole run configuration before any weights or images are loaded.

Every check raises `ConfigError` with the offending key and the allowed values.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handclip.backbone import read_backbone_config
from handclip.captions import DEFAULT_TEMPLATES, Captioner
from handclip.data.images import BAD_IMAGE_POLICIES
from handclip.data.prepare import settings_from_config
from handclip.errors import ConfigError
from handclip.freeze import check_freeze_policy
from handclip.losses import LOSSES
from handclip.projection import check_projection
from handclip.transforms import check_augment

SAMPLERS = ("random", "identity_balanced")


def _number(cfg: Mapping, key: str, low: float, high: float, integer: bool = False) -> Any:
    section, name = key.split(".")
    value = (cfg.get(section) or {}).get(name)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{key}={value!r} is out of range: it must be {what} from {low:g} to {high:g}")
    return value


def check_config(cfg: Mapping) -> dict:
    """Check a resolved run configuration (a plain dict); return the backbone's `CLIPConfig`
    values used for the checks: {'vision_depth', 'text_depth', 'projection_dim', 'image_size'}."""
    for section in ("backbone", "freeze", "projection", "loss", "data", "optim", "trainer"):
        if not isinstance(cfg.get(section), Mapping):
            raise ConfigError(f"config section '{section}' is missing")
    loss = cfg["loss"].get("name")
    if loss not in LOSSES:
        raise ConfigError(f"loss.name={loss!r} is not a loss; choose one of {', '.join(LOSSES)}")
    batch = _number(cfg, "data.batch_size", 1, 1_000_000, integer=True)
    if batch < 2:
        raise ConfigError(f"data.batch_size={batch} is too small: a contrastive loss needs at least 2 pairs per batch")
    sampler = cfg["data"].get("sampler", "random")
    if sampler not in SAMPLERS:
        raise ConfigError(f"data.sampler={sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if sampler == "identity_balanced":
        p = _number(cfg, "data.identities_per_batch", 2, 100_000, integer=True)
        k = _number(cfg, "data.images_per_identity", 1, 100_000, integer=True)
        if p * k != batch:
            raise ConfigError(
                f"data.batch_size={batch} must equal data.identities_per_batch x data.images_per_identity "
                f"= {p} x {k} = {p * k} with data.sampler=identity_balanced"
            )
    _number(cfg, "optim.lr", 1e-12, 1.0)
    _number(cfg, "optim.weight_decay", 0.0, 10.0)
    _number(cfg, "trainer.max_epochs", 1, 100_000, integer=True)
    data = cfg["data"]
    if data.get("on_bad_image", "skip") not in BAD_IMAGE_POLICIES:
        raise ConfigError(
            f"data.on_bad_image={data.get('on_bad_image')!r}: choose one of {', '.join(BAD_IMAGE_POLICIES)}"
        )
    Captioner(data.get("captions") or DEFAULT_TEMPLATES)
    check_augment(data.get("augment"))
    settings = settings_from_config(data)
    if not Path(settings.root).exists() and not data.get("synthetic"):
        raise ConfigError(
            f"data.root={settings.root} does not exist. Put the dataset there (see data/README.md), "
            "point data.root at it, or try the demo on synthetic hands: python train.py experiment=demo"
        )
    config = read_backbone_config(cfg["backbone"])
    vision_depth = int(config.vision_config.num_hidden_layers)
    text_depth = int(config.text_config.num_hidden_layers)
    check_freeze_policy(cfg["freeze"], vision_depth, text_depth)
    check_projection(cfg["projection"], int(config.projection_dim))
    return {
        "vision_depth": vision_depth,
        "text_depth": text_depth,
        "projection_dim": int(config.projection_dim),
        "image_size": int(config.vision_config.image_size),
    }
