"""The Hugging Face implementation of the backbone interface: `transformers.CLIPModel`.

A backbone spec (a `conf/backbone/*.yaml` file) names a hub id or a local directory,

    _target_: handclip.model.HuggingFaceCLIP
    name: vit_b32
    source: openai/clip-vit-base-patch32

or, for the tiny random model of the demo and the tests, `source: tiny` with a `config:`
(a `CLIPConfig`'s fields). The tiny model is built once from its config, saved with
`save_pretrained` into a cache directory and loaded back with `from_pretrained`, so it goes
through the same path as a real one. The spec itself is cheap: `facts()` reads only the model
config, and `load()` brings the weights.

Works with transformers 4.x and 5.x (5.x returns output objects from `get_*_features`, and its
encoder layers return tensors rather than tuples).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handclip.checks import integer
from handclip.errors import BackboneError, ConfigError, first_line
from handclip.io import atomic_path, remove_dead_leftovers, waiting_lock, write_json_atomic
from handclip.model.backbone import Backbone, BackboneFacts, LayerGroup, TowerFacts, tower_groups
from handclip.settings import plain_dict

TINY = "tiny"


def default_cache_dir() -> Path:
    """Where built backbones are kept: $HANDCLIP_CACHE, else ~/.cache/handclip (read when used)."""
    return Path(os.environ.get("HANDCLIP_CACHE") or Path.home() / ".cache" / "handclip")


def _size_field(size: Any, key: str) -> Any:
    # transformers 4.x keeps sizes in dicts, 5.x in SizeDict objects
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)


def _tensor(output) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def tiny_clip_config(config: Mapping | None):
    """The `CLIPConfig` of a tiny backbone from its fields (`projection_dim`, `vision_config`, `text_config`)."""
    from transformers import CLIPConfig

    config = dict(config or {})
    text = dict(config.pop("text_config", {}) or {})
    vision = dict(config.pop("vision_config", {}) or {})
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


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or os.sep + os.sep in source


def _load_error(source: str, error: Exception) -> BackboneError:
    if _looks_like_path(source) and not Path(source).expanduser().is_dir():
        return BackboneError(
            f"backbone.source={source}: no such directory. A local backbone is a directory written by "
            "CLIPModel.save_pretrained (with its tokenizer and image processor); check the path"
        )
    first = first_line(error)
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


def facts_of(config) -> BackboneFacts:
    """A `CLIPConfig`'s depths, widths and sizes."""
    vision, text = config.vision_config, config.text_config

    def tower(c) -> TowerFacts:
        return TowerFacts(int(c.num_hidden_layers), int(c.hidden_size), int(c.num_attention_heads),
                          int(c.intermediate_size))  # fmt: skip

    return BackboneFacts(
        vision=tower(vision), text=tower(text), projection_dim=int(config.projection_dim),
        image_size=int(vision.image_size), patch_size=int(vision.patch_size),
        context_length=int(text.max_position_embeddings),
    )  # fmt: skip


class HuggingFaceCLIP:
    """A backbone spec for `transformers.CLIPModel`: cheap to build, `load()` brings the weights."""

    def __init__(self, source: str | None = None, name: str | None = None, config: Mapping | None = None,
                 seed: int = 0, pretrain: Mapping | None = None):  # fmt: skip
        if not source:
            raise ConfigError(
                "backbone.source is missing: give a hub id (openai/clip-vit-base-patch32), "
                "a local save_pretrained directory, or 'tiny'"
            )
        if source != TINY and config:
            raise ConfigError(f"backbone.config is only for source=tiny; backbone.source={source} brings its own")
        integer("backbone.seed", seed)
        self.source = str(source)
        self.name = name or self.source
        self.config = plain_dict(config or {}, "backbone.config")
        self.seed = seed
        if pretrain is not None and source != TINY:
            raise ConfigError(f"backbone.pretrain is only for source=tiny; backbone.source={source} is already trained")
        self.pretrain = None
        if pretrain is not None:
            from handclip.model.pretrain import Pretraining

            self.pretrain = Pretraining.from_settings(plain_dict(pretrain, "backbone.pretrain"))

    def clip_config(self):
        """The model's `CLIPConfig`, without loading any weights."""
        if self.source == TINY:
            return tiny_clip_config(self.config)
        from transformers import CLIPConfig

        try:
            return CLIPConfig.from_pretrained(self.source)
        except Exception as error:  # noqa: BLE001 - re-raised with what to do
            raise _load_error(self.source, error) from error

    def facts(self) -> BackboneFacts:
        """Depths, widths and sizes of the towers, from the config alone."""
        return facts_of(self.clip_config())

    def skeleton(self) -> HFBackbone:
        """The model's structure with no weights (on the meta device): what policies are checked on."""
        from transformers import CLIPImageProcessor, CLIPModel

        config = self.clip_config()
        with torch.device("meta"):
            model = CLIPModel(config)
        size = int(config.vision_config.image_size)
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return HFBackbone(model, None, processor, self.source)

    def tiny_dir(self, cache_dir: str | Path | None = None) -> Path:
        """Build the tiny backbone once (seeded random weights, then pretrained if asked) and return its directory."""
        key = {"config": self.config, "seed": self.seed}
        if self.pretrain is not None:
            key["pretrain"] = self.pretrain.key()
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        kind = "tiny" if self.pretrain is None else "tiny-pretrained"
        out = Path(cache_dir or default_cache_dir()) / "backbones" / f"{kind}-{digest}"

        def built() -> bool:
            return (out / "config.json").is_file() and (out / "model.safetensors").is_file()

        if built():
            return out
        # a second process building the same model waits here, then finds it built
        with waiting_lock(out.with_name(f".{out.name}.lock")):
            remove_dead_leftovers(out.parent)  # killed builds' half-made folders
            if not built():  # missing, or damaged (a file gone): built anew, put in place whole
                with atomic_path(out) as tmp:
                    self._build_tiny(tmp)
        return out

    def _build_tiny(self, out: Path) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from handclip.model.tokenizer import build_clip_tokenizer

        config = tiny_clip_config(self.config)
        # a private random stream: building the cache must not change the run's own random numbers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = CLIPModel(config)
            build_clip_tokenizer(out)
            size = config.vision_config.image_size
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
            processor.save_pretrained(out)
            if self.pretrain is not None:
                from handclip.model.pretrain import pretrain_tiny

                print("pretraining the tiny CLIP once on synthetic hands (a few minutes on a CPU); "
                      f"kept in {out.parent}", flush=True)  # fmt: skip
                backbone = HFBackbone(model, AutoTokenizer.from_pretrained(out), processor, TINY)
                report = pretrain_tiny(backbone, self.pretrain, self.seed)
                write_json_atomic(out / "pretraining.json", report)
                print(f"pretrained in {report['seconds']:.0f} s; loss by epoch {report['epoch_loss']}", flush=True)
        model.save_pretrained(out, safe_serialization=True)

    def load(self, cache_dir: str | Path | None = None) -> HFBackbone:
        """Model, tokenizer and image processor through `from_pretrained`."""
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        path = str(self.tiny_dir(cache_dir)) if self.source == TINY else self.source
        try:
            model = CLIPModel.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            processor = CLIPImageProcessor.from_pretrained(path)
        except Exception as error:  # noqa: BLE001 - re-raised with what to do
            raise _load_error(self.source, error) from error
        return HFBackbone(model, tokenizer, processor, self.source)


def _layer_call(layer: nn.Module):
    """Call an encoder layer on (hidden, additive mask) in transformers 4.x and 5.x alike."""
    positional = [
        p for p in inspect.signature(layer.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]  # fmt: skip
    legacy = len(positional) >= 3  # 4.x: (hidden_states, attention_mask, causal_attention_mask, ...)

    def call(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = layer(hidden, mask, None) if legacy else layer(hidden, mask)
        return out[0] if isinstance(out, tuple) else out

    return call


class _Tokenize:
    """Texts -> padded `input_ids` and `attention_mask`; small and picklable, for data loader workers."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                                return_tensors="pt")  # fmt: skip
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


class HFBackbone(Backbone):
    """A loaded `CLIPModel` with its tokenizer and image processor."""

    def __init__(self, model, tokenizer, image_processor, source: str = ""):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        crop = int(_size_field(image_processor.crop_size, "height"))
        resize = _size_field(image_processor.size, "shortest_edge")
        self.image_size = crop
        self.resize_size = int(resize) if resize else crop
        self.image_mean = list(image_processor.image_mean)
        self.image_std = list(image_processor.image_std)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.text_tokenizer = _Tokenize(tokenizer, self.context_length)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def facts(self) -> BackboneFacts:
        return facts_of(self.model.config)

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.text_tokenizer(texts)

    def encode_image(self, pixel_values: torch.Tensor, pre_projection: bool = False):
        if not pre_projection:
            return _tensor(self.model.get_image_features(pixel_values=pixel_values))
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output  # post_layernorm(CLS)
        return pooled, self.model.visual_projection(pooled)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    def layer_groups(self, tower: str) -> list[LayerGroup]:
        model = self.model
        if tower == "vision":
            transformer, projection = model.vision_model, "visual_projection"
            final_norm, first_norm = "post_layernorm", "pre_layrnorm"
        elif tower == "text":
            transformer, projection = model.text_model, "text_projection"
            final_norm, first_norm = "final_layer_norm", None
        else:
            raise ValueError(f"tower {tower!r}: choose vision or text")
        prefix = "vision_model" if tower == "vision" else "text_model"

        def named(module: nn.Module, name: str) -> dict[str, nn.Parameter]:
            return {f"{name}.{n}": p for n, p in module.named_parameters()}

        embeddings = named(transformer.embeddings, f"{prefix}.embeddings")
        if first_norm:
            embeddings.update(named(getattr(transformer, first_norm), f"{prefix}.{first_norm}"))
        blocks = [named(layer, f"{prefix}.encoder.layers.{i}") for i, layer in enumerate(transformer.encoder.layers)]
        groups = tower_groups(
            tower, embeddings, blocks, named(getattr(transformer, final_norm), f"{prefix}.{final_norm}"),
            named(getattr(model, projection), projection),
        )  # fmt: skip
        norms = {
            f"{name}.{p}" for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)
            for p, _ in module.named_parameters()
        }  # fmt: skip
        for group in groups:
            group.norms = norms & set(group.parameters)
        return groups

    # partial forward -----------------------------------------------------------------------
    def _blocks(self, transformer, hidden: torch.Tensor, start: int, stop: int, mask=None) -> torch.Tensor:
        for layer in transformer.encoder.layers[start:stop]:
            hidden = _layer_call(layer)(hidden, mask)
        return hidden

    def _check_groups(self, tower: str, groups: int) -> int:
        depth = len(self.layer_groups(tower)) - 3
        if not 1 <= groups <= depth + 1:
            raise ValueError(f"{tower} prefix of {groups} groups: must be 1 (embeddings) to {depth + 1} (all blocks)")
        return groups - 1  # blocks in the prefix

    def image_prefix(self, pixel_values: torch.Tensor, groups: int) -> torch.Tensor:
        blocks = self._check_groups("vision", groups)
        vision = self.model.vision_model
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
        return self._blocks(vision, hidden, 0, blocks)

    def image_suffix(self, hidden: torch.Tensor, groups: int, pre_projection: bool = False):
        blocks = self._check_groups("vision", groups)
        vision = self.model.vision_model
        hidden = self._blocks(vision, hidden, blocks, len(vision.encoder.layers))
        pooled = vision.post_layernorm(hidden[:, 0, :])
        projected = self.model.visual_projection(pooled)
        return (pooled, projected) if pre_projection else projected

    def _text_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        # CLIP's causal mask plus padding, as one additive mask [batch, 1, seq, seq]
        batch, length = hidden.shape[:2]
        lowest = torch.finfo(hidden.dtype).min
        mask = torch.full((length, length), lowest, dtype=hidden.dtype, device=hidden.device).triu(1)
        mask = mask[None, None].expand(batch, 1, length, length)
        if attention_mask is not None:
            padding = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * lowest
            mask = (mask + padding).clamp(min=lowest)
        return mask

    def text_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: int) -> torch.Tensor:
        blocks = self._check_groups("text", groups)
        text = self.model.text_model
        hidden = text.embeddings(input_ids=input_ids)
        return self._blocks(text, hidden, 0, blocks, self._text_mask(hidden, attention_mask))

    def text_suffix(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        blocks = self._check_groups("text", groups)
        text = self.model.text_model
        hidden = self._blocks(text, hidden, blocks, len(text.encoder.layers), self._text_mask(hidden, attention_mask))
        hidden = text.final_layer_norm(hidden)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        eos = int(self.model.config.text_config.eos_token_id)
        # pooled at the first end-of-text token (the legacy eos id 2 pooled at the highest id)
        position = input_ids.argmax(-1) if eos == 2 else (input_ids == eos).int().argmax(-1)
        return self.model.text_projection(hidden[rows, position])

    # adapters --------------------------------------------------------------------------------
    def adapter_host(self) -> nn.Module:
        return self.model

    def adapter_targets(self, tower: str, block: int) -> dict[str, str]:
        layer = f"{'vision_model' if tower == 'vision' else 'text_model'}.encoder.layers.{block}"
        return {
            "q": f"{layer}.self_attn.q_proj", "k": f"{layer}.self_attn.k_proj", "v": f"{layer}.self_attn.v_proj",
            "out": f"{layer}.self_attn.out_proj", "fc1": f"{layer}.mlp.fc1", "fc2": f"{layer}.mlp.fc2",
        }  # fmt: skip

    # weights ---------------------------------------------------------------------------------
    def blocks(self, tower: str) -> list[nn.Module]:
        model = self.model.vision_model if tower == "vision" else self.model.text_model
        return list(model.encoder.layers)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        model = self.model
        # transformers 5 renamed it activation checkpointing; 4.x has only the old names
        if hasattr(model, "activation_checkpointing_enable"):
            enable, disable = model.activation_checkpointing_enable, model.activation_checkpointing_disable
            on, kwargs = model.is_activation_checkpointing, "activation_checkpointing_kwargs"
        else:
            enable, disable = model.gradient_checkpointing_enable, model.gradient_checkpointing_disable
            on, kwargs = model.is_gradient_checkpointing, "gradient_checkpointing_kwargs"
        if enabled:
            # non-reentrant: blocks whose inputs need no gradient (above a frozen prefix) still get theirs
            enable(**{kwargs: {"use_reentrant": False}})
            # enabling also hooks the token embeddings to require gradients (for reentrant checkpoints),
            # which would run a frozen text tower's backward for nothing
            if hasattr(model, "_require_grads_hook"):
                model.disable_input_require_grads()
        elif on:
            disable()

    def set_attention(self, implementation: str) -> None:
        try:
            self.model.set_attn_implementation(implementation)
        except (ValueError, ImportError) as error:
            raise ConfigError(f"compute.attention={implementation}: {first_line(error)}") from None

    def replace_projection(self, tower: str, dim: int, generator: torch.Generator) -> nn.Module:
        attribute = "visual_projection" if tower == "vision" else "text_projection"
        old = getattr(self.model, attribute)
        head = nn.Linear(old.in_features, dim, bias=False)
        with torch.no_grad():
            # CLIP's own init scale for projections: std = width ** -0.5
            head.weight.normal_(0.0, old.in_features**-0.5, generator=generator)
        head = head.to(old.weight.device, old.weight.dtype)
        setattr(self.model, attribute, head)
        # keep the config true so save_pretrained / from_pretrained rebuild the same shapes
        self.model.config.projection_dim = dim
        return head

    def save_pretrained(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
        return out_dir
