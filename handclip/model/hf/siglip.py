"""SigLIP and SigLIP 2 as a `Backbone`: `transformers.SiglipModel`, with its pretrained sigmoid scale and bias.

    _target_: handclip.model.hf.HuggingFaceSigLIP
    name: siglip2_b16
    source: google/siglip2-base-patch16-224

SigLIP 2's fixed-resolution checkpoints are `SiglipModel`s too; its NaFlex models (`model_type: siglip2`,
variable resolution) are refused with that said. `source: tiny` with a `config:` (a `SiglipConfig`'s fields)
builds a small one with random weights, as for CLIP, and it is saved and loaded back through `from_pretrained`.

Where SigLIP differs from CLIP, and what HandCLIP does about it:

- No class token and no projection in the image tower: the image embedding is the output of an attention-pooling
  head (a learned probe attends over the patches, then an MLP). That head is the image tower's projection group
  (labelled `vision.attention_pool`); the pre-projection feature is its output too, so a BN-neck reads the pooled
  feature. There is no linear projection to replace: `projection=replace` is refused (transformers could not load
  such a model back).
- The text tower attends in both directions with no padding mask and pools at the last position: captions are always
  padded to the context length (64), as SigLIP was trained, and the mask `tokenize` returns is all ones.
- `logit_bias` is a pretrained parameter beside `logit_scale` (t' and b of the sigmoid loss), exported with the model:
  `loss=siglip` starts from both instead of the paper's from-scratch values, and the scale is not clamped (SigLIP's
  pretrained t = exp(t') is above CLIP's clamp of 100).
- Images are resized to the square input whatever their shape, as SigLIP's image processor does (no centre crop).

A tiny SigLIP uses CLIP's vocabulary (the tokenizer HandCLIP can build offline); a hub SigLIP brings its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from handclip.checks import number
from handclip.errors import ConfigError
from handclip.model.backbone import (
    NO_LINEAR_PROJECTION,
    BackboneFacts,
    LayerGroup,
    check_tower,
    named,
    tower_groups,
    with_norms,
)
from handclip.model.flops import transformer_block_flops, transformer_tower_flops
from handclip.model.hf.backbone import HFBackbone, _size_field, facts_of
from handclip.model.hf.spec import TINY, HuggingFaceCLIP, tiny_fields

PAPER_LOG_SCALE, PAPER_BIAS = 2.302585, -10.0  # SigLIP's initialisation: t' = ln 10, b = -10


def siglip_facts(config) -> BackboneFacts:
    """A `SiglipConfig`'s depths, widths and sizes; the embedding width is the image tower's (its pooling head's)."""
    return facts_of(config, int(config.vision_config.hidden_size), logit_bias=True, projection_replaceable=False)


@contextlib.contextmanager
def _quiet_config_defaults() -> Iterator[None]:
    """Without transformers' warning that SiglipTextConfig's own defaults (CLIP's special ids, a 32000-token
    vocabulary) fail its validation, which every save of a SigLIP prints while comparing with those defaults."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


class _PadToContext:
    """Texts -> `input_ids` padded (and truncated) to the context length, with an all-ones mask: SigLIP's text
    tower attends to every position and pools at the last one. Small and picklable, for data loader workers."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")["input_ids"]  # fmt: skip
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class SiglipBackbone(HFBackbone):
    """A loaded `SiglipModel` with its tokenizer and image processor (see the module docstring)."""

    family = "SigLIP"
    logit_scale_max = None  # SigLIP learns t' unclamped; its pretrained value is above CLIP's ln 100
    pads_to_context = True

    model_class = "SiglipModel"
    processor_class = "AutoProcessor"
    example_notes = (
        '# captions: processor(text=texts, padding="max_length", return_tensors="pt"), as SigLIP was trained',
    )
    tokenizer_type = _PadToContext

    def check_model(self, model) -> None:
        if not getattr(model.config.vision_config, "vision_use_head", True):
            raise ConfigError(
                "backbone: this SigLIP has no attention-pooling head (vision_use_head=false), so no image embedding: "
                "give a SigLIP image-text model"
            )

    def input_sizes(self, model, image_processor) -> tuple[int, tuple[int, int]]:
        """The model's input square, and (height, width) images are resized to whatever their shape."""
        size = int(model.config.vision_config.image_size)
        height = _size_field(image_processor.size, "height") or size
        width = _size_field(image_processor.size, "width") or size
        return size, (int(height), int(width))

    @property
    def logit_bias(self) -> nn.Parameter:
        return self.model.logit_bias

    @property
    def facts(self) -> BackboneFacts:
        return siglip_facts(self.model.config)

    # the whole forward ---------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor, pre_projection: bool = False):
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output  # the attention-pooling head's
        return (pooled, pooled) if pre_projection else pooled

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # no mask: SigLIP attends to the padding it was trained with (tokenize pads every caption to the context)
        return self.model.text_model(input_ids=input_ids).pooler_output

    def layer_groups(self, tower: str) -> list[LayerGroup]:
        prefix = f"{check_tower(tower)}_model"
        transformer = getattr(self.model, prefix)
        layers = transformer.encoder.layers
        blocks = [named(layer, f"{prefix}.encoder.layers.{i}") for i, layer in enumerate(layers)]
        final_norm = "post_layernorm" if tower == "vision" else "final_layer_norm"
        groups = tower_groups(
            tower, named(transformer.embeddings, f"{prefix}.embeddings"), blocks,
            named(getattr(transformer, final_norm), f"{prefix}.{final_norm}"),
            named(transformer.head, f"{prefix}.head"),
            labels=["", *[""] * len(blocks), "", "attention_pool" if tower == "vision" else ""],
        )  # fmt: skip
        return with_norms(groups, self.model, (nn.LayerNorm,), [layer.mlp for layer in layers])

    def forward_flops(self, tower: str, tokens: int | None = None) -> list[float | None]:
        facts = self.facts
        if check_tower(tower) == "text":  # a lookup, the blocks, the linear head (captions fill the context)
            text = facts.text
            return transformer_tower_flops(tokens or facts.context_length, text, 0.0,
                                           2.0 * text.width * facts.projection_dim)  # fmt: skip
        vision, patches = facts.vision, (facts.image_size // facts.patch_size) ** 2
        width = vision.width
        # the pooling head: the probe's query and the patches' keys and values, attention of one query, the output
        # projection and the MLP on the one pooled token
        head = 2.0 * width * width * (2 + 2 * patches) + 4.0 * patches * width + 4.0 * width * vision.mlp_width
        embeddings = 2.0 * patches * 3 * facts.patch_size**2 * width
        return [embeddings, *[float(transformer_block_flops(patches, vision))] * vision.depth, 0.0, head]

    # partial forward -----------------------------------------------------------------------------
    def image_prefix(self, pixel_values: torch.Tensor, groups: int) -> torch.Tensor:
        blocks = self.prefix_blocks("vision", groups)
        vision = self.model.vision_model
        return self._blocks(vision, vision.embeddings(pixel_values), 0, blocks)

    def image_suffix(self, hidden: torch.Tensor, groups: int, pre_projection: bool = False):
        blocks = self.prefix_blocks("vision", groups)
        vision = self.model.vision_model
        hidden = self._blocks(vision, hidden, blocks, len(vision.encoder.layers))
        pooled = vision.head(vision.post_layernorm(hidden))
        return (pooled, pooled) if pre_projection else pooled

    def text_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: int) -> torch.Tensor:
        blocks = self.prefix_blocks("text", groups)
        text = self.model.text_model
        return self._blocks(text, text.embeddings(input_ids=input_ids), 0, blocks)

    def text_suffix(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        blocks = self.prefix_blocks("text", groups)
        text = self.model.text_model
        hidden = text.final_layer_norm(self._blocks(text, hidden, blocks, len(text.encoder.layers)))
        return text.head(hidden[:, -1, :])

    # what differs in the rest ----------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> Path:
        with _quiet_config_defaults():
            return super().save_pretrained(out_dir)

    def replace_projection(self, tower: str, dim: int, generator: torch.Generator) -> nn.Module:
        raise ConfigError(NO_LINEAR_PROJECTION)


class HuggingFaceSigLIP(HuggingFaceCLIP):
    """A backbone spec for `transformers.SiglipModel` (SigLIP, and SigLIP 2 at a fixed resolution)."""

    model_type = "siglip"
    model_class = SiglipBackbone.model_class
    family = SiglipBackbone.family
    tokenizer_inputs = ["input_ids"]  # as SigLIP's own tokenizers: no mask, the padding is attended

    def __init__(self, source: str | None = None, name: str | None = None, config: Mapping | None = None,
                 seed: int = 0, pretrain: Mapping | None = None, init_logit_scale: float = PAPER_LOG_SCALE,
                 init_logit_bias: float = PAPER_BIAS):  # fmt: skip
        """`init_logit_scale` and `init_logit_bias`: where a tiny SigLIP's t' and b start (the paper's ln 10 and
        -10, meant for batches of thousands); a model from the hub or a folder brings its own."""
        super().__init__(source, name, config, seed, pretrain)
        self.init = (number("backbone.init_logit_scale", init_logit_scale),
                     number("backbone.init_logit_bias", init_logit_bias))  # fmt: skip
        if self.source != TINY and self.init != (PAPER_LOG_SCALE, PAPER_BIAS):
            raise ConfigError(f"backbone.init_logit_scale and init_logit_bias are only for source=tiny; "
                              f"backbone.source={self.source} brings its own")  # fmt: skip

    def cache_key(self) -> dict:
        key = super().cache_key()
        if self.init != (PAPER_LOG_SCALE, PAPER_BIAS):  # the paper's start keeps the keys it had
            key["init"] = list(self.init)
        return key

    def transformers_classes(self) -> tuple[type, type, type]:
        from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

        return SiglipConfig, SiglipModel, SiglipImageProcessor

    def tiny_config(self):
        from transformers import SiglipConfig

        text, vision, rest = tiny_fields(self.config)
        return SiglipConfig(text_config=text, vision_config=vision, **rest)

    def new_processor(self, size: int):
        _, _, processor = self.transformers_classes()
        return processor(size={"height": size, "width": size})

    def wrap(self, model, tokenizer, processor) -> SiglipBackbone:
        return SiglipBackbone(model, tokenizer, processor, self.source)

    def facts_of(self, config) -> BackboneFacts:
        return siglip_facts(config)

    def check_config(self, config) -> None:
        vision, text = config.vision_config, config.text_config
        width, projection = int(vision.hidden_size), int(getattr(text, "projection_size", None) or text.hidden_size)
        if projection != width:
            given = "text_config.projection_size" if projection != int(text.hidden_size) else (
                "text_config.hidden_size (the text embedding's width when projection_size is not given)")
            raise ConfigError(
                f"backbone.config: the text embedding is {projection} wide ({given}={projection}) and the image "
                f"embedding {width} (vision_config.hidden_size={width}, the pooling head's width): they must match"
            )
        for tower, values in (("vision_config", vision), ("text_config", text)):
            if isinstance(getattr(values, "image_size", 0), (list, tuple)) or isinstance(
                getattr(values, "patch_size", 0), (list, tuple)
            ):
                raise ConfigError(f"backbone.config.{tower}: image_size and patch_size must be single numbers")

    def _build_tiny(self, out: Path) -> None:
        with _quiet_config_defaults():
            super()._build_tiny(out)

    def start_tiny(self, model) -> None:
        """SigLIP's initialisation of the sigmoid's scale and bias (transformers starts both at 0)."""
        with torch.no_grad():
            model.logit_scale.fill_(self.init[0])
            model.logit_bias.fill_(self.init[1])
