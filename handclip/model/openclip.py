"""The open_clip implementation of the backbone interface: ResNets and LAION ViTs.

A backbone spec (a `conf/backbone/*.yaml` file) names an open_clip model and its weights,

    _target_: handclip.model.openclip.OpenCLIP
    name: RN50                      # any name in open_clip.list_models(), or local-dir:DIR / hf-hub:ORG/REPO
    pretrained: openai              # a tag (open_clip.list_pretrained_tags_by_model(name)), a weights file, or null
    config: null
    seed: 0

or, for the tiny random models of the demo and the tests, `pretrained: null` with a `config:` (an
open_clip model config: `embed_dim`, `vision_cfg`, `text_cfg`). The config is written once as
`open_clip_config.json` into a cache directory and built with
`open_clip.create_model_and_transforms("local-dir:DIR")`, seeded, so nothing is downloaded and open_clip's
global registry is left alone. The spec is cheap: `facts()` and `skeleton()` read the model config only,
`load()` brings the weights (a tag through the Hugging Face cache/hub, as open_clip does; offline, set
HF_HUB_OFFLINE=1 after downloading once). OpenAI's weights were trained with QuickGELU; a tag that says so
builds the model with QuickGELU (`force_quick_gelu`), so `name: RN50, pretrained: openai` is right as written.

Supported: CLIP-style models (`open_clip.CLIP`, and `CustomTextCLIP` with open_clip's own text transformer)
whose image tower is a `VisionTransformer` (without an attentional pooler) or a `ModifiedResNet`, and whose
text tower has a causal mask and no class token. timm or Hugging Face towers and CoCa are refused with a
ConfigError.

Layer groups (names are open_clip's own state-dict names, `visual.conv1.weight`, `transformer.resblocks.0...`):

    ViT image tower   embeddings = conv1, class_embedding, positional_embedding, ln_pre;
                      blocks = visual.transformer.resblocks; final norm = ln_post; projection = proj.
                      These are the groups of open_clip's `lock_image_tower`, so `LastN(vision_blocks=n)`
                      trains what `model.lock_image_tower(unlocked_groups=n + 1)` leaves trainable.
    ResNet image tower embeddings = the stem (conv1..3, bn1..3); blocks = the four stages layer1..layer4;
                      final norm = the attention pool without its output projection (positional_embedding,
                      q/k/v_proj); projection = attnpool.c_proj. open_clip's `ModifiedResNet.lock` supports
                      only `unlocked_groups=0` (all frozen); these groups extend its stage list
                      ([stem, layer1, ..., layer4], as its `forward_intermediates` walks them) the way the ViT's
                      lock pairs the top block with the final norm: `LastN(vision_blocks=0)` trains c_proj, a
                      linear head on the frozen features; n >= 1 adds the attention pool, layer4, then layer3 ...
    Text tower        embeddings = token_embedding, positional_embedding; blocks = transformer.resblocks;
                      final norm = ln_final; projection = text_projection (an nn.Parameter, or an nn.Linear
                      with `proj_bias`). `LastN(text_blocks=m)` trains what
                      `model.lock_text_tower(unlocked_layers=m + 1)` leaves trainable.

So k = n + 1 for both towers (open_clip's k = 0, everything frozen, has no LastN equivalent: LastN always
trains the projections; `freeze=pattern` can express it). A `logit_bias` (SigLIP-style models) belongs to
no tower; it is put in the text projection group (HandCLIP's losses do not use it). Any other image-tower
parameter outside the parts above would go to the image final-norm group.

BatchNorm: a frozen BatchNorm layer (all its parameters frozen) keeps its running statistics during
training (it runs in eval mode, as open_clip's `lock_image_tower(freeze_bn_stats=True)`), so a frozen
stage of a ResNet really is frozen; BatchNorm layers that train update their statistics as usual.

LoRA (`freeze=lora`): open_clip's attention is torch's `nn.MultiheadAttention`, whose q, k and v share one
fused `in_proj_weight` and whose `out_proj` is not called as a module, so peft cannot adapt q, k, v or out
separately; only the MLP's `fc1` (`mlp.c_fc`) and `fc2` (`mlp.c_proj`) are targets, in transformer towers
(not in the ResNet's convolutional stages). Asking for another target is a ConfigError.

`save_pretrained(DIR)` writes open_clip's own format: `open_clip_model.safetensors` (the state dict),
`open_clip_config.json` (`model_cfg` and `preprocess_cfg`) and `<name>.json` (the bare model config). It
loads without HandCLIP with `open_clip.create_model_and_transforms("local-dir:DIR")` (and
`open_clip.get_tokenizer("local-dir:DIR")`), or by registering the config,
`open_clip.add_model_config("DIR/<name>.json")`, then `open_clip.create_model("<name>",
pretrained="DIR/open_clip_model.safetensors")`; for an unchanged built-in architecture
`open_clip.create_model(name, pretrained="DIR/open_clip_model.safetensors")` works too (use the
`-quickgelu` name for OpenAI weights).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handclip.checks import integer
from handclip.errors import BackboneError, ConfigError, first_line
from handclip.io import write_text_atomic
from handclip.model.backbone import Backbone, BackboneFacts, LayerGroup, TowerFacts, tower_groups
from handclip.model.hf import default_cache_dir
from handclip.settings import plain_dict

WEIGHTS = "open_clip_model.safetensors"
CONFIG = "open_clip_config.json"
SCHEMAS = ("local-dir:", "hf-hub:")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz", ".ckpt")
# a causal text tower sees padding only after the pooled token for these pool types, so padding can be cut
TRIMMABLE_POOLS = ("argmax", "eos", "first")


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


def _square(size: Any, key: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"{key}={list(size)}: HandCLIP's image pipeline takes square images only")
        size = size[0]
    return integer(key, size, 1)


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
    _square(vision_cfg.image_size, f"{key}.vision_cfg.image_size")
    if isinstance(vision_cfg.layers, (list, tuple)):
        if len(vision_cfg.layers) != 4:
            raise ConfigError(f"{key}.vision_cfg.layers={list(vision_cfg.layers)}: a ModifiedResNet has 4 stages")
        if (vision_cfg.width * 32) % vision_cfg.head_width:
            raise ConfigError(f"{key}.vision_cfg: width*32={vision_cfg.width * 32} must be divisible by head_width")
    elif vision_cfg.width % vision_cfg.head_width:
        raise ConfigError(
            f"{key}.vision_cfg: width={vision_cfg.width} must be divisible by head_width={vision_cfg.head_width}"
        )
    if text_cfg.width % text_cfg.heads:
        raise ConfigError(f"{key}.text_cfg: width={text_cfg.width} must be divisible by heads={text_cfg.heads}")
    if text_cfg.pool_type not in (*TRIMMABLE_POOLS, "last"):
        raise ConfigError(f"{key}.text_cfg.pool_type={text_cfg.pool_type!r} is not supported")


def facts_of(cfg: Mapping) -> BackboneFacts:
    """An open_clip model config's depths, widths and sizes."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision, text = CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"])
    if isinstance(vision.layers, (list, tuple)):  # ModifiedResNet: 4 stages, its final feature width
        width = vision.width * 32
        vision_facts = TowerFacts(4, width, width // vision.head_width, vision.width * 8)
        patch = None
    else:
        vision_facts = TowerFacts(int(vision.layers), int(vision.width), int(vision.width // vision.head_width),
                                  int(vision.width * vision.mlp_ratio))  # fmt: skip
        patch = _square(vision.patch_size, "vision_cfg.patch_size")
    text_facts = TowerFacts(int(text.layers), int(text.width), int(text.heads), int(text.width * text.mlp_ratio))
    return BackboneFacts(
        vision=vision_facts, text=text_facts, projection_dim=int(cfg["embed_dim"]),
        image_size=_square(vision.image_size, "vision_cfg.image_size"), patch_size=patch,
        context_length=int(text.context_length),
    )  # fmt: skip


def _instantiate(cfg: Mapping) -> nn.Module:
    """The model class open_clip's `create_model` would choose, built from `cfg` (on the current device)."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(dict(cfg))
    custom = cfg.pop("custom_text", False)
    return (CustomTextCLIP if custom else CLIP)(**cfg)


class OpenCLIP:
    """A backbone spec for an open_clip model: cheap to build, `load()` brings the weights."""

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
        if not (out / CONFIG).is_file():
            write_text_atomic(out / CONFIG, json.dumps(
                {"model_cfg": cfg, "preprocess_cfg": _jsonable(self.preprocess_config(cfg))}, indent=2, sort_keys=True
            ))  # fmt: skip
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


def _load_error(name: str, pretrained: str | None, error: BaseException, tag: Mapping | None = None) -> BackboneError:
    """One line: what was tried, why it failed, how to fix it (as hf.py's `_load_error`)."""
    first = first_line(error)
    offline = os.environ.get("HF_HUB_OFFLINE", "0")
    hub = (tag or {}).get("hf_hub", "").rstrip("/")
    if hub:
        repo = hub if hub.count("/") <= 1 else hub.rsplit("/", 1)[0]
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class _Tokenize:
    """Texts -> `input_ids` and `attention_mask` with open_clip's tokenizer (context 77).

    Small and picklable: the tokenizer itself is built on first use in each process (data loader
    workers get the settings only). `attention_mask` covers the tokens up to the end-of-text token
    (id 0 pads, but it is also the BPE token of "!", so it is not read as padding). For a causal text
    tower that pools at the end-of-text token, padding after the longest text is cut (as Hugging Face
    tokenizers pad to the longest); otherwise every row keeps the full context.
    """

    def __init__(self, context_length: int, trim: bool, tokenizer_kwargs: Mapping | None = None):
        self.context_length, self.trim = int(context_length), bool(trim)
        self.tokenizer_kwargs = dict(tokenizer_kwargs or {})
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tokenizer = SimpleTokenizer(context_length=self.context_length, **self.tokenizer_kwargs)
        return self._tokenizer

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.tokenizer
        ids = tokenizer(list(texts), context_length=self.context_length)
        eot = (ids == tokenizer.eot_token_id).int().argmax(-1)  # each row has one (truncation keeps it)
        mask = (torch.arange(ids.shape[1])[None, :] <= eot[:, None]).long()
        if self.trim and len(ids):
            length = int(eot.max()) + 1
            ids, mask = ids[:, :length], mask[:, :length]
        return {"input_ids": ids, "attention_mask": mask}


class _Roles(dict):
    """A block's LoRA targets by role; a role open_clip's layers cannot offer is a ConfigError."""

    def __missing__(self, role: str):
        raise ConfigError(
            f"freeze.targets has {role}: open_clip's attention is torch's nn.MultiheadAttention, whose q, k and v "
            "share one fused in_proj_weight and whose out_proj is not called as a module, so peft's LoRA cannot "
            "adapt q, k, v or out of an open_clip backbone; use freeze.targets=[fc1,fc2] (the MLP)"
        )


class _ParameterHead(nn.Module):
    """What `replace_projection` returns for a projection that is a bare nn.Parameter (`x @ proj`)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight


def _named(module: nn.Module | None, prefix: str) -> dict[str, nn.Parameter]:
    if module is None:
        return {}
    return {f"{prefix}.{name}": p for name, p in module.named_parameters()}


class OpenCLIPBackbone(Backbone):
    """A loaded open_clip model with its tokenizer and preprocessing values (see the module docstring)."""

    export_format = "open_clip"  # what `python -m handclip.export` writes for this backbone

    def __init__(self, model: nn.Module, model_cfg: Mapping, preprocess_cfg: Mapping, name: str, source: str = ""):
        super().__init__()
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        self.model = model
        self.model_cfg = copy.deepcopy(dict(model_cfg))
        self.preprocess_cfg = dict(preprocess_cfg)
        self.name = name
        self.source = source or f"open_clip:{name}"
        if not isinstance(model.visual, (VisionTransformer, ModifiedResNet)):
            raise ConfigError(f"backbone.name={name}: image tower {type(model.visual).__name__} is not supported")
        self.is_resnet = isinstance(model.visual, ModifiedResNet)
        self.image_size = _square(self.preprocess_cfg.get("size", 224), "preprocess size")
        # open_clip's eval transform for resize_mode 'shortest' (RN50, the LAION and OpenAI ViTs): shortest edge
        # to the size, then a centre crop, as HandCLIP's transforms do with these values. HandCLIP's transforms
        # always resize bicubic and crop; weights whose tag says 'squash' or 'bilinear' (DFN, CLIPA) get that
        self.resize_size = self.image_size
        self.image_mean = [float(v) for v in self.preprocess_cfg["mean"]]
        self.image_std = [float(v) for v in self.preprocess_cfg["std"]]
        text = self._text
        self.context_length = int(text.context_length)
        trim = getattr(text, "attn_mask", None) is not None and self._pool_type in TRIMMABLE_POOLS
        tokenizer_kwargs = (self.model_cfg.get("text_cfg") or {}).get("tokenizer_kwargs")
        self.text_tokenizer = _Tokenize(self.context_length, trim, tokenizer_kwargs)

    # the text tower: attributes of the CLIP model itself, or of `model.text` (CustomTextCLIP) ---------
    @property
    def _text(self) -> nn.Module:
        return self.model.text if hasattr(self.model, "text") else self.model

    @property
    def _text_prefix(self) -> str:
        return "text." if hasattr(self.model, "text") else ""

    @property
    def _pool_type(self) -> str:
        text = self._text
        return getattr(text, "pool_type", None) or getattr(self.model, "text_pool_type", "argmax")

    @property
    def _eos_id(self) -> int | None:
        text = self._text
        return (
            getattr(text, "eos_id", None) if hasattr(self.model, "text") else getattr(self.model, "text_eos_id", None)
        )

    # interface ------------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def facts(self) -> BackboneFacts:
        return facts_of(self.model_cfg)

    @property
    def projection_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.text_tokenizer(texts)

    def encode_image(self, pixel_values: torch.Tensor, pre_projection: bool = False):
        self._keep_frozen_batchnorm()
        if pre_projection:
            return self.image_suffix(self.image_prefix(pixel_values, 1), 1, pre_projection=True)
        return self.model.encode_image(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # through the partial forward, so texts padded to the longest (not to 77) work too
        return self.text_suffix(self.text_prefix(input_ids, attention_mask, 1), input_ids, attention_mask, 1)

    def _keep_frozen_batchnorm(self) -> None:
        """In training, a BatchNorm whose parameters are all frozen runs in eval mode (its statistics stay)."""
        if not self.training or not self.is_resnet:
            return
        for module in self.model.visual.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                parameters = list(module.parameters(recurse=False))
                module.train(not parameters or any(p.requires_grad for p in parameters))

    # layer groups ------------------------------------------------------------------------------
    def _vision_parts(self) -> tuple[dict, list[dict], dict, dict]:
        visual = self.model.visual
        if self.is_resnet:
            embeddings: dict[str, nn.Parameter] = {}
            for part in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
                embeddings.update(_named(getattr(visual, part), f"visual.{part}"))
            blocks = [_named(getattr(visual, f"layer{i}"), f"visual.layer{i}") for i in range(1, 5)]
            pool = _named(visual.attnpool, "visual.attnpool")
            projection = {n: p for n, p in pool.items() if n.startswith("visual.attnpool.c_proj.")}
            final_norm = {n: p for n, p in pool.items() if n not in projection}
        else:
            embeddings = _named(visual.conv1, "visual.conv1")
            embeddings["visual.class_embedding"] = visual.class_embedding
            embeddings["visual.positional_embedding"] = visual.positional_embedding
            embeddings.update(_named(visual.ln_pre, "visual.ln_pre"))
            blocks = [
                _named(b, f"visual.transformer.resblocks.{i}") for i, b in enumerate(visual.transformer.resblocks)
            ]
            final_norm = _named(visual.ln_post, "visual.ln_post")
            projection = {"visual.proj": visual.proj} if visual.proj is not None else {}
        # anything else of the image tower sits between the blocks and the projection
        placed = {id(p) for part in (embeddings, final_norm, projection, *blocks) for p in part.values()}
        for name, parameter in visual.named_parameters():
            if id(parameter) not in placed:
                final_norm[f"visual.{name}"] = parameter
        return embeddings, blocks, final_norm, projection

    def _text_parts(self) -> tuple[dict, list[dict], dict, dict]:
        text, prefix = self._text, self._text_prefix
        embeddings = _named(text.token_embedding, f"{prefix}token_embedding")
        embeddings[f"{prefix}positional_embedding"] = text.positional_embedding
        resblocks = text.transformer.resblocks
        blocks = [_named(b, f"{prefix}transformer.resblocks.{i}") for i, b in enumerate(resblocks)]
        final_norm = _named(text.ln_final, f"{prefix}ln_final")
        head = text.text_projection
        projection = (_named(head, f"{prefix}text_projection") if isinstance(head, nn.Module)
                      else {f"{prefix}text_projection": head} if head is not None else {})  # fmt: skip
        if getattr(self.model, "logit_bias", None) is not None:  # fits no tower; unused by HandCLIP's losses
            projection["logit_bias"] = self.model.logit_bias
        return embeddings, blocks, final_norm, projection

    def layer_groups(self, tower: str) -> list[LayerGroup]:
        if tower == "vision":
            parts = self._vision_parts()
        elif tower == "text":
            parts = self._text_parts()
        else:
            raise ValueError(f"tower {tower!r}: choose vision or text")
        groups = tower_groups(tower, *parts)
        norms = {
            f"{name}.{p}" if name else p for name, module in self.model.named_modules()
            if isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm))
            for p, _ in module.named_parameters(recurse=False)
        }  # fmt: skip
        for group in groups:
            group.norms = norms & set(group.parameters)
        return groups

    # partial forward -------------------------------------------------------------------------
    def _depth(self, tower: str) -> int:
        if tower == "vision":
            return 4 if self.is_resnet else len(self.model.visual.transformer.resblocks)
        return len(self._text.transformer.resblocks)

    def _check_groups(self, tower: str, groups: int) -> int:
        depth = self._depth(tower)
        if not 1 <= groups <= depth + 1:
            raise ValueError(f"{tower} prefix of {groups} groups: must be 1 (embeddings) to {depth + 1} (all blocks)")
        return groups - 1  # blocks in the prefix

    @staticmethod
    def _blocks(transformer: nn.Module, hidden: torch.Tensor, start: int, stop: int, mask=None) -> torch.Tensor:
        """open_clip transformer blocks start..stop-1 on [batch, length, width] hidden states."""
        if start >= stop:
            return hidden
        batch_first = getattr(transformer, "batch_first", True)
        if not batch_first:
            hidden = hidden.transpose(0, 1)
        for block in transformer.resblocks[start:stop]:
            hidden = block(hidden, attn_mask=mask)
        return hidden if batch_first else hidden.transpose(0, 1)

    def _stages(self) -> list[nn.Module]:
        visual = self.model.visual
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4]

    def image_prefix(self, pixel_values: torch.Tensor, groups: int) -> torch.Tensor:
        blocks = self._check_groups("vision", groups)
        self._keep_frozen_batchnorm()
        visual = self.model.visual
        if self.is_resnet:
            hidden = visual.stem(pixel_values.to(visual.conv1.weight.dtype))
            for stage in self._stages()[:blocks]:
                hidden = stage(hidden)
            return hidden
        return self._blocks(visual.transformer, visual._embeds(pixel_values), 0, blocks)

    def image_suffix(self, hidden: torch.Tensor, groups: int, pre_projection: bool = False):
        blocks = self._check_groups("vision", groups)
        self._keep_frozen_batchnorm()
        visual = self.model.visual
        if self.is_resnet:
            for stage in self._stages()[blocks:]:
                hidden = stage(hidden)
            projected = visual.attnpool(hidden)
            # the attention pool is the projection: before it, the average-pooled map (as CLIP-ReID's RN50)
            return (hidden.mean(dim=(2, 3)), projected) if pre_projection else projected
        hidden = self._blocks(visual.transformer, hidden, blocks, len(visual.transformer.resblocks))
        pooled, _ = visual._pool(hidden)
        projected = pooled @ visual.proj if visual.proj is not None else pooled
        return (pooled, projected) if pre_projection else projected

    def _text_mask(self, length: int) -> torch.Tensor | None:
        mask = getattr(self._text, "attn_mask", None)
        return None if mask is None else mask[:length, :length]

    def text_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: int) -> torch.Tensor:
        blocks = self._check_groups("text", groups)
        text = self._text
        length = input_ids.shape[1]
        if length > text.positional_embedding.shape[0]:
            raise ValueError(f"{length} tokens: the text tower takes at most {text.positional_embedding.shape[0]}")
        dtype = text.transformer.get_cast_dtype()
        hidden = text.token_embedding(input_ids).to(dtype) + text.positional_embedding[:length].to(dtype)
        return self._blocks(text.transformer, hidden, 0, blocks, self._text_mask(length))

    def text_suffix(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        blocks = self._check_groups("text", groups)
        text = self._text
        hidden = self._blocks(text.transformer, hidden, blocks, len(text.transformer.resblocks),
                              self._text_mask(input_ids.shape[1]))  # fmt: skip
        hidden = text.ln_final(hidden)
        pooled = text_global_pool(hidden, input_ids, self._pool_type, eos_token_id=self._eos_id)
        head = text.text_projection
        if head is None:
            return pooled
        return head(pooled) if isinstance(head, nn.Module) else pooled @ head

    # adapters --------------------------------------------------------------------------------
    def adapter_host(self) -> nn.Module:
        # the backbone itself, not the CLIP model: peft matches target names by suffix, and relative to the
        # CLIP model the text tower's `transformer.resblocks.1.mlp.c_fc` is a suffix of the image tower's
        # `visual.transformer.resblocks.1.mlp.c_fc`; `model.transformer...` is not one of `model.visual...`
        return self

    def adapter_targets(self, tower: str, block: int) -> dict[str, str]:
        if tower == "vision" and self.is_resnet:
            raise ConfigError(
                "freeze=lora: the ModifiedResNet image tower's stages are convolutions, not the attention/MLP linear "
                "layers LoRA targets here; use freeze.towers=[text] with a ResNet backbone"
            )
        prefix = "model.visual.transformer" if tower == "vision" else f"model.{self._text_prefix}transformer"
        layer = f"{prefix}.resblocks.{block}"
        return _Roles({"fc1": f"{layer}.mlp.c_fc", "fc2": f"{layer}.mlp.c_proj"})

    # weights ---------------------------------------------------------------------------------
    def blocks(self, tower: str) -> list[nn.Module]:
        if tower == "vision":
            return [] if self.is_resnet else list(self.model.visual.transformer.resblocks)
        return list(self._text.transformer.resblocks)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.model.set_grad_checkpointing(enabled)

    def set_attention(self, implementation: str) -> None:
        # open_clip's blocks call nn.MultiheadAttention without weights, which runs PyTorch's SDPA
        if implementation != "sdpa":
            raise ConfigError(
                f"compute.attention={implementation}: open_clip backbones always use PyTorch's SDPA; "
                "choose auto or sdpa"
            )

    def replace_projection(self, tower: str, dim: int, generator: torch.Generator) -> nn.Module:
        """A new seeded projection of width `dim`, in the form open_clip builds (so the export loads in open_clip)."""

        def linear(old: nn.Linear) -> nn.Linear:
            head = nn.Linear(old.in_features, dim, bias=old.bias is not None)
            with torch.no_grad():
                head.weight.normal_(0.0, old.in_features**-0.5, generator=generator)
                if head.bias is not None:
                    head.bias.zero_()
            return head.to(old.weight.device, old.weight.dtype)

        def parameter(old: nn.Parameter) -> nn.Parameter:
            width = old.shape[0]
            new = torch.empty(width, dim).normal_(0.0, width**-0.5, generator=generator)
            return nn.Parameter(new.to(old.device, old.dtype))

        if tower == "vision":
            visual = self.model.visual
            if self.is_resnet:
                visual.attnpool.c_proj = head = linear(visual.attnpool.c_proj)
            elif visual.proj is None:
                raise ConfigError(f"projection: backbone {self.name} has no image projection to replace")
            else:
                visual.proj = parameter(visual.proj)
                head = _ParameterHead(visual.proj)
            visual.output_dim = dim
        elif tower == "text":
            text = self._text
            old = text.text_projection
            if old is None:
                raise ConfigError(f"projection: backbone {self.name} has no text projection to replace")
            if isinstance(old, nn.Linear):
                text.text_projection = head = linear(old)
            else:
                text.text_projection = parameter(old)
                head = _ParameterHead(text.text_projection)
            text.output_dim = dim
        else:
            raise ValueError(f"tower {tower!r}: choose vision or text")
        # keep the config true, so the export builds the same shapes
        self.model_cfg["embed_dim"] = dim
        return head

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """open_clip's own format (see the module docstring): weights, `open_clip_config.json`, `<name>.json`."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
        config = {"model_cfg": self.model_cfg, "preprocess_cfg": _jsonable(self.preprocess_cfg)}
        (out_dir / CONFIG).write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True) + "\n")
        (out_dir / f"{self.config_name}.json").write_text(json.dumps(_jsonable(self.model_cfg), indent=2) + "\n")
        return out_dir

    @property
    def config_name(self) -> str:
        """The name the exported bare config registers under with `open_clip.add_model_config`."""
        base = self.name.split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip(".-") or "model"

    def load_hint(self, out_dir: str | Path) -> str:
        """How to load what `save_pretrained(out_dir)` wrote, without HandCLIP."""
        return (
            f"load it with open_clip.create_model_and_transforms('local-dir:{out_dir}') (tokenizer: "
            f"open_clip.get_tokenizer('local-dir:{out_dir}'))"
        )
