"""The open_clip backbone spec: config checks, loading, errors, and reading its own exports back.

See `handclip.model.openclip` for what a spec names and how the model is built.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handclip.checks import integer
from handclip.errors import BackboneError, ConfigError, first_line
from handclip.io import write_text_atomic
from handclip.model.backbone import BackboneFacts, BackboneSpec, TowerFacts, default_cache_dir
from handclip.model.openclip.backbone import CONFIG, WEIGHTS, OpenCLIPBackbone, image_tower_class, jsonable
from handclip.model.openclip.text import TRIMMABLE_POOLS
from handclip.model.openclip.towers import square
from handclip.settings import plain_dict

SCHEMAS = ("local-dir:", "hf-hub:")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz", ".ckpt")
PICKLED = ("open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")  # what open_clip's local-dir also reads


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_file(value: str) -> bool:
    return (
        value.startswith(("/", "./", "../", "~")) or "/" in value or os.sep in value or value.endswith(WEIGHT_SUFFIXES)
    )


@contextmanager
def _quiet():
    """open_clip logs warnings (random init, missing weights) and errors we re-raise as one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def _check_model_config(cfg: Mapping, key: str) -> None:
    """Refuse what this implementation does not support, naming the setting."""
    for part in ("embed_dim", "vision_cfg", "text_cfg"):
        if part not in cfg:
            raise ConfigError(f"{key}.{part} is missing: an open_clip model config has embed_dim, vision_cfg, text_cfg")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if not isinstance(vision, Mapping) or not isinstance(text, Mapping):
        raise ConfigError(f"{key}.vision_cfg and {key}.text_cfg must be mappings")
    if "multimodal_cfg" in cfg:
        raise ConfigError(f"{key}: CoCa models (multimodal_cfg) are not supported by handclip.model.openclip")
    if vision.get("timm_model_name"):
        raise ConfigError(f"{key}.vision_cfg.timm_model_name: timm image towers are not supported; use a ViT or RN")
    if vision.get("attentional_pool"):
        raise ConfigError(f"{key}.vision_cfg.attentional_pool: an attentional pooler is not supported")
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        raise ConfigError(
            f"{key}.text_cfg: Hugging Face text towers and tokenizers are not supported by handclip.model.openclip; "
            "use an open_clip model with its own text transformer (RN50, ViT-B-32, ...)"
        )
    if text.get("no_causal_mask") or text.get("embed_cls"):
        raise ConfigError(
            f"{key}.text_cfg: a text tower without a causal mask, or with a class token, is not supported"
        )
    try:
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        vision_cfg, text_cfg = CLIPVisionCfg(**vision), CLIPTextCfg(**text)
    except TypeError as error:
        raise ConfigError(f"{key}: {first_line(error)} (see open_clip.model.CLIPVisionCfg / CLIPTextCfg)") from None
    square(vision_cfg.image_size, f"{key}.vision_cfg.image_size")
    image_tower_class(vision).check_config(vision_cfg, key)
    if text_cfg.width % text_cfg.heads:
        raise ConfigError(f"{key}.text_cfg: width={text_cfg.width} must be divisible by heads={text_cfg.heads}")
    if text_cfg.pool_type not in (*TRIMMABLE_POOLS, "last"):
        raise ConfigError(f"{key}.text_cfg.pool_type={text_cfg.pool_type!r} is not supported")


def facts_of(cfg: Mapping) -> BackboneFacts:
    """An open_clip model config's depths, widths and sizes."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision, text = CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"])
    vision_facts, patch = image_tower_class(cfg["vision_cfg"]).facts(vision)
    text_facts = TowerFacts(int(text.layers), int(text.width), int(text.heads), int(text.width * text.mlp_ratio))
    return BackboneFacts(
        vision=vision_facts, text=text_facts, projection_dim=int(cfg["embed_dim"]),
        image_size=square(vision.image_size, "vision_cfg.image_size"), patch_size=patch,
        context_length=int(text.context_length),
    )  # fmt: skip


def _instantiate(cfg: Mapping) -> nn.Module:
    """The model class open_clip's `create_model` would choose, built from `cfg` (on the current device)."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(dict(cfg))
    custom = cfg.pop("custom_text", False)
    return (CustomTextCLIP if custom else CLIP)(**cfg)


class OpenCLIP(BackboneSpec):
    """A backbone spec for an open_clip model: cheap to build, `load()` brings the weights."""

    export_format = OpenCLIPBackbone.export_format

    def __init__(self, name: str | None = None, pretrained: str | None = None, config: Mapping | None = None,
                 seed: int = 0):  # fmt: skip
        if not name or not isinstance(name, str):
            raise ConfigError(
                f"backbone.name={name!r}: give an open_clip model name (RN50, ViT-B-32; open_clip.list_models() "
                "lists them), local-dir:DIR, or a label for a model built from backbone.config"
            )
        if pretrained is not None and (not isinstance(pretrained, str) or not pretrained.strip()):
            raise ConfigError(
                f"backbone.pretrained={pretrained!r} must be a tag (openai, laion2b_s34b_b79k), a weights file, or null"
            )
        config = plain_dict(config or {}, "backbone.config")
        if config:
            _check_model_config(config, "backbone.config")
            if pretrained is not None and not _looks_like_file(pretrained):
                raise ConfigError(
                    f"backbone.pretrained={pretrained}: a tag names weights of one of open_clip's built-in models; "
                    "a model built from backbone.config takes a weights file or null (random, seeded weights)"
                )
        elif name.startswith(SCHEMAS) and pretrained is not None:
            raise ConfigError(
                f"backbone.pretrained={pretrained}: backbone.name={name} brings its own weights; set "
                "backbone.pretrained=null"
            )
        integer("backbone.seed", seed)
        self.name, self.pretrained, self.config, self.seed = name, pretrained, config, seed

    # ----------------------------------------------------------------------------------------
    def _tag(self) -> dict:
        """open_clip's pretrained config for `pretrained` if it is a tag of a built-in model, else {}."""
        if not self.pretrained or self.config or self.name.startswith(SCHEMAS):
            return {}
        from open_clip import get_pretrained_cfg

        return dict(get_pretrained_cfg(self.name, self.pretrained) or {})

    def _weights_file(self) -> str | None:
        """The local weights file `pretrained` names (checked to exist), or None for a tag or no weights."""
        if not self.pretrained or self._tag():
            return None
        path = Path(self.pretrained).expanduser()
        if path.is_file():
            return str(path)
        if self.config or _looks_like_file(self.pretrained):
            raise BackboneError(
                f"backbone.pretrained={self.pretrained}: no such file. A local open_clip weights file is a state dict "
                f"(.safetensors, .pt, .bin) for model {self.name}, such as {WEIGHTS} written by `python -m "
                "handclip.export`; check the path, or set backbone.pretrained=null for random weights"
            )
        from open_clip import list_pretrained_tags_by_model

        tags = list_pretrained_tags_by_model(self.name)
        near = difflib.get_close_matches(self.pretrained, tags, n=1)
        raise ConfigError(
            f"backbone.pretrained={self.pretrained} is neither a tag of {self.name} nor a file"
            + (f" (did you mean {near[0]}?)" if near else "")
            + (f"; its tags are {', '.join(tags)}" if tags else f"; open_clip has no tags for {self.name}")
        )

    def model_config(self) -> dict:
        """The open_clip model config, as the model will be built (QuickGELU forced if the tag needs it)."""
        if self.config:
            cfg = copy.deepcopy(self.config)
        else:
            import open_clip

            try:
                cfg = open_clip.get_model_config(self.name)
            except Exception as error:  # noqa: BLE001 - a local-dir or hub config that cannot be read
                raise _load_error(self.name, None, error) from error
            if cfg is None:
                near = difflib.get_close_matches(self.name, open_clip.list_models(), n=3)
                raise ConfigError(
                    f"backbone.name={self.name} is not an open_clip model"
                    + (f" (did you mean {', '.join(near)}?)" if near else "")
                    + "; open_clip.list_models() lists them, or give a backbone.config"
                )
            _check_model_config(cfg, f"backbone.name={self.name}: its config")
        if self._tag().get("quick_gelu") and not cfg.get("quick_gelu"):
            cfg["quick_gelu"] = True  # the weights were trained with QuickGELU
        return cfg

    def preprocess_config(self, cfg: Mapping | None = None) -> dict:
        """open_clip's preprocessing for the model: its defaults, the tag's values, the model's image size."""
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        cfg = cfg or self.model_config()
        overlay: dict = self._tag()
        if self.name.startswith("local-dir:") and not self.config:
            path = Path(self.name.removeprefix("local-dir:")) / CONFIG
            overlay = json.loads(path.read_text()).get("preprocess_cfg", {}) if path.is_file() else {}
        preprocess = merge_preprocess_dict(PreprocessCfg(), overlay)
        preprocess["size"] = cfg["vision_cfg"].get("image_size", 224)
        return preprocess

    def facts(self) -> BackboneFacts:
        """Depths, widths and sizes of the towers, from the model config alone (no weights)."""
        cfg = self.model_config()
        self._weights_file()  # a missing file or an unknown tag fails now, before any data is prepared
        return facts_of(cfg)

    def skeleton(self) -> OpenCLIPBackbone:
        """The model's structure with no weights (on the meta device): what policies are checked on."""
        cfg = self.model_config()
        with torch.device("meta"):
            model = _instantiate(cfg)
        return OpenCLIPBackbone(model, cfg, self.preprocess_config(cfg), self.name, self.source)

    @property
    def source(self) -> str:
        return f"open_clip:{self.name}" + (f"/{self.pretrained}" if self.pretrained else "")

    def config_dir(self, cache_dir: str | Path | None = None) -> Path:
        """A `local-dir:` folder holding only `open_clip_config.json` for a model built from `config`."""
        cfg = self.model_config()
        key = json.dumps(cfg, sort_keys=True)
        out = (
            Path(cache_dir or default_cache_dir())
            / "backbones"
            / f"openclip-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
        )
        text = json.dumps({"model_cfg": cfg, "preprocess_cfg": jsonable(self.preprocess_config(cfg))}, indent=2,
                          sort_keys=True)  # fmt: skip
        try:
            current = (out / CONFIG).read_text()
        except (OSError, ValueError):
            current = None
        if current != text:  # missing, or edited since: the model would be built from another config without a word
            if current is not None:
                print(f"{out / CONFIG} differs from the config it was written from: written again", flush=True)
            write_text_atomic(out / CONFIG, text)
        return out

    def load(self, cache_dir: str | Path | None = None) -> OpenCLIPBackbone:
        """The model through `open_clip.create_model_and_transforms`, with its preprocessing and tokenizer."""
        import open_clip

        cfg = self.model_config()
        weights = self._weights_file()
        tag = self._tag()
        if tag and _offline() and not tag.get("hf_hub"):
            target = Path("~/.cache/clip").expanduser() / os.path.basename(tag.get("url", ""))
            if not target.is_file():
                raise _load_error(self.name, self.pretrained, FileNotFoundError(f"{target} not found"), tag)
        kwargs: dict[str, Any] = {"force_quick_gelu": bool(cfg.get("quick_gelu"))}
        if self.config:
            name, pretrained = f"local-dir:{self.config_dir(cache_dir)}", None
        else:
            name, pretrained = self.name, (weights or self.pretrained)
        try:
            # a private random stream: random weights are seeded, and the run's own random numbers stay as they were
            with torch.random.fork_rng(devices=[]), _quiet():
                torch.manual_seed(self.seed)
                model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained, **kwargs)
                if self.config and weights:
                    open_clip.load_checkpoint(model, weights)
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - re-raised with what was tried and what to do
            raise _load_error(self.name, self.pretrained, error, tag) from error
        from open_clip.model import get_model_preprocess_cfg

        preprocess = dict(get_model_preprocess_cfg(model)) or self.preprocess_config(cfg)
        return OpenCLIPBackbone(model, cfg, preprocess, self.name, self.source)

    def initial_weights(self) -> str:
        if self.name.startswith("local-dir:") and not self.config:
            return f"the open_clip model in {self.name.removeprefix('local-dir:')}"
        if self.name.startswith("hf-hub:"):
            return f"open_clip {self.name} (weights from the Hugging Face hub)"
        what = f"open_clip {self.name}" + (" (built from a config)" if self.config else "")
        if not self.pretrained:
            return f"{what}, random initial weights (seed {self.seed})"
        if self._tag():
            return f"{what} with its {self.pretrained} weights"
        return f"{what} with the weights in {self.pretrained}"

    def base_model(self) -> str | None:
        if self.name.startswith("hf-hub:"):
            return self.name.removeprefix("hf-hub:")
        return _hub_repo(self._tag())

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return (Path(folder) / CONFIG).is_file()

    @classmethod
    def from_export(cls, folder: Path) -> OpenCLIP:
        folder = Path(folder)
        if not (folder / WEIGHTS).is_file():
            pickled = [name for name in PICKLED if (folder / name).is_file()]
            if pickled:
                raise BackboneError(
                    f"{folder / pickled[0]} holds pickled weights, which can run code when loaded: HandCLIP reads "
                    f"{WEIGHTS} only; save the model's state dict with safetensors (safetensors.torch.save_file) "
                    f"as {folder / WEIGHTS}"
                )
            raise BackboneError(f"{folder} has {CONFIG} but no {WEIGHTS}: give a folder that export wrote")
        return cls(name=f"local-dir:{folder}")


def _hub_repo(tag: Mapping | None) -> str | None:
    """The Hugging Face repository of a pretrained tag's weights (`timm/resnet50_clip.openai`), if on the hub."""
    hub = (tag or {}).get("hf_hub", "").rstrip("/")
    return (hub if hub.count("/") <= 1 else hub.rsplit("/", 1)[0]) or None


def _load_error(name: str, pretrained: str | None, error: BaseException, tag: Mapping | None = None) -> BackboneError:
    """One line: what was tried, why it failed, how to fix it (as hf.py's `_load_error`)."""
    first = first_line(error)
    offline = os.environ.get("HF_HUB_OFFLINE", "0")
    repo = _hub_repo(tag)
    if repo:
        tried = f"the Hugging Face cache/hub for {repo} (HF_HUB_OFFLINE={offline})"
        fetch = f"download it once on a machine with internet (`hf download {repo}`) and run with HF_HUB_OFFLINE=1"
    elif tag:
        tried = f"~/.cache/clip and {tag.get('url')} (HF_HUB_OFFLINE={offline})"
        fetch = f"download {tag.get('url')} once into ~/.cache/clip on a machine with internet"
    else:
        tried = f"open_clip's model {name} (HF_HUB_OFFLINE={offline})"
        fetch = "check backbone.name (and that a local-dir: folder holds open_clip_config.json)"
    what = f"'{name}'" + (f" with pretrained='{pretrained}'" if pretrained else "")
    return BackboneError(
        f"Could not load open_clip backbone {what}: {first}. Tried {tried}. To fix: {fetch}, or give a local weights "
        f"file (backbone.pretrained=/path/to/{WEIGHTS}), or try the offline demo with "
        "`experiment=demo backbone=oc_tiny_vit`."
    )
