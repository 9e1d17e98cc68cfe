"""Settings arrive as plain dicts (library use) or OmegaConf DictConfigs (from Hydra)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from handclip.errors import ConfigError


def plain_dict(spec: Any, what: str, hint: str = "") -> dict:
    """`spec` as a plain, resolved dict; anything but a mapping is a ConfigError naming `what`."""
    if hasattr(spec, "_content"):  # a DictConfig: no Hydra or OmegaConf import needed otherwise
        from omegaconf import OmegaConf

        return OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{what} must be a mapping{hint}")
    return dict(spec)
