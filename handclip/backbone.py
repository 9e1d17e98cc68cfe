"""Load a CLIP backbone (model, tokenizer, image processor) through `from_pretrained`.

A backbone spec is a mapping (a `conf/backbone/*.yaml` file):

    name: vit_b32
    source: openai/clip-vit-base-patch32   # a hub id or a local save_pretrained directory

or, for the tiny random model used by the demo and the tests,

    name: tiny
    source: tiny
    config: {projection_dim: ..., vision_config: {...}, text_config: {...}}

The tiny model is built once from its config, saved with `save_pretrained` into a cache
directory and loaded back with `from_pretrained`, so it goes through the same path as a real one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handclip.errors import BackboneError, ConfigError
from handclip.settings import plain_dict

TINY = "tiny"
DEFAULT_CACHE = Path(os.environ.get("HANDCLIP_CACHE", Path.home() / ".cache" / "handclip"))


@dataclass
class Backbone:
    """A CLIP model with the tokenizer and image processor that belong to it."""

    model: Any  # transformers.CLIPModel
    tokenizer: Any
    image_processor: Any
    source: str

    @property
    def image_size(self) -> int:
        """Side of the square crop the vision tower takes."""
        return int(_size_field(self.image_processor.crop_size, "height"))

    @property
    def resize_size(self) -> int:
        """Shortest edge images are resized to before the crop."""
        size = _size_field(self.image_processor.size, "shortest_edge")
        return int(size) if size else self.image_size

    @property
    def image_mean(self) -> list[float]:
        return list(self.image_processor.image_mean)

    @property
    def image_std(self) -> list[float]:
        return list(self.image_processor.image_std)


def _size_field(size: Any, key: str) -> Any:
    # transformers 4.x keeps sizes in dicts, 5.x in SizeDict objects
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)


def _source(spec: Mapping) -> str:
    source = spec.get("source")
    if not source:
        raise ConfigError(
            "backbone.source is missing: give a hub id (openai/clip-vit-base-patch32), "
            "a local save_pretrained directory, or 'tiny'"
        )
    return str(source)


def tiny_clip_config(spec: Mapping):
    """The `CLIPConfig` of the tiny backbone described by `spec['config']`."""
    from transformers import CLIPConfig

    config = dict(spec.get("config") or {})
    text = dict(config.pop("text_config", {}))
    vision = dict(config.pop("vision_config", {}))
    for tower, values in (("text_config", text), ("vision_config", vision)):
        width, heads = values.get("hidden_size", 0), values.get("num_attention_heads", 1)
        if width and width % heads:
            raise ConfigError(
                f"backbone.config.{tower}: hidden_size={width} must be divisible by num_attention_heads={heads}"
            )
    # the tokenizer's special ids: the text tower pools at eos_token_id, so they must agree
    text.setdefault("bos_token_id", 49406)
    text.setdefault("eos_token_id", 49407)
    text.setdefault("pad_token_id", 49407)
    text.setdefault("vocab_size", 49408)
    return CLIPConfig(text_config=text, vision_config=vision, **config)


def read_backbone_config(spec: Mapping):
    """The backbone's `CLIPConfig` without loading any weights (for validating a config)."""
    spec = plain_dict(spec, "backbone")
    source = _source(spec)
    if source == TINY:
        return tiny_clip_config(spec)
    from transformers import CLIPConfig

    try:
        return CLIPConfig.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - re-raised with what to do
        raise _load_error(source, error) from error


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or os.sep + os.sep in source


def _load_error(source: str, error: Exception) -> BackboneError:
    if _looks_like_path(source) and not Path(source).expanduser().is_dir():
        return BackboneError(
            f"backbone.source={source}: no such directory. A local backbone is a directory written by "
            "CLIPModel.save_pretrained (with its tokenizer and image processor); check the path"
        )
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    local = Path(source)
    tried = (
        f"the local directory '{source}' ({'exists' if local.is_dir() else 'not found'})"
        f" and the Hugging Face cache/hub (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})"
    )
    return BackboneError(
        f"Could not load backbone '{source}': {first}. Tried {tried}. To fix: download it once on a "
        f"machine with internet (`hf download {source}`) and run with HF_HUB_OFFLINE=1, or save a "
        "model with `save_pretrained(DIR)` and use `backbone=local backbone.source=DIR`, or try the "
        "offline demo with `experiment=demo`."
    )


def tiny_backbone_dir(spec: Mapping, cache_dir: str | Path | None = None) -> Path:
    """Build the tiny backbone once (seeded random weights) and return its directory."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    from handclip.tokenizer import build_clip_tokenizer

    spec = plain_dict(spec, "backbone")
    config = tiny_clip_config(spec)
    seed = int(spec.get("seed", 0))
    key = json.dumps({"config": spec.get("config"), "seed": seed}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    out = Path(cache_dir or DEFAULT_CACHE) / "backbones" / f"tiny-{digest}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(tmp, safe_serialization=True)
    build_clip_tokenizer(tmp)
    size = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(tmp)
    if out.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return out
    tmp.rename(out)
    return out


def load_backbone(spec: Mapping, cache_dir: str | Path | None = None) -> Backbone:
    """Load model, tokenizer and image processor named by a backbone spec."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    spec = plain_dict(spec, "backbone")
    source = _source(spec)
    path = str(tiny_backbone_dir(spec, cache_dir)) if source == TINY else source
    try:
        model = CLIPModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        processor = CLIPImageProcessor.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - re-raised with what to do
        raise _load_error(source, error) from error
    return Backbone(model=model, tokenizer=tokenizer, image_processor=processor, source=source)
