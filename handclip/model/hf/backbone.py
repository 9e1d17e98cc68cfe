"""A loaded `transformers.CLIPModel` as a `Backbone`, with its tokenizer and image processor.

Works with transformers 4.x and 5.x (5.x returns output objects from `get_*_features`, and its
encoder layers return tensors rather than tuples).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handclip.errors import ConfigError, first_line
from handclip.model.backbone import (
    Backbone,
    BackboneFacts,
    LayerGroup,
    TowerFacts,
    check_tower,
    named,
    tower_groups,
    with_norms,
)
from handclip.model.flops import text_transformer_flops, vision_transformer_flops


def facts_of(config, projection_dim: int | None = None, **differ) -> BackboneFacts:
    """A `CLIPConfig`'s depths, widths and sizes; another family's config with the towers' fields of CLIP's gives its
    own embedding width (`projection_dim`) and what else differs (`differ`: `BackboneFacts` fields)."""
    vision, text = config.vision_config, config.text_config

    def tower(c) -> TowerFacts:
        return TowerFacts(int(c.num_hidden_layers), int(c.hidden_size), int(c.num_attention_heads),
                          int(c.intermediate_size))  # fmt: skip

    return BackboneFacts(
        vision=tower(vision), text=tower(text),
        projection_dim=int(config.projection_dim if projection_dim is None else projection_dim),
        image_size=int(vision.image_size), patch_size=int(vision.patch_size),
        context_length=int(text.max_position_embeddings), **differ,
    )  # fmt: skip


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
    """A loaded `CLIPModel` with its tokenizer and image processor. Another family of transformers (SigLIP:
    `handclip.model.hf.siglip`) subclasses it and names what differs: its classes, its input sizes, its tokenizing."""

    export_format = "transformers"  # a save_pretrained directory
    card_metadata = {"library_name": "transformers", "pipeline_tag": "zero-shot-image-classification"}
    model_class = "CLIPModel"  # transformers' classes that load an export, by name (load hint and model card)
    processor_class = "CLIPProcessor"
    example_notes: tuple[str, ...] = ()  # lines a model card's loading code ends with
    tokenizer_type: type = _Tokenize  # texts -> tokens, what `tokenize` and data loader workers call

    def __init__(self, model, tokenizer, image_processor, source: str = ""):
        super().__init__()
        self.check_model(model)
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        self.image_size, self.resize_size = self.input_sizes(model, image_processor)
        self.image_mean = list(image_processor.image_mean)
        self.image_std = list(image_processor.image_std)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.text_tokenizer = self.tokenizer_type(tokenizer, self.context_length)

    def check_model(self, model) -> None:
        """Refuse, in one line, a model of the family this backbone cannot serve (none for CLIP)."""

    def input_sizes(self, model, image_processor) -> tuple[int, int | tuple[int, int]]:
        """(`image_size`, `resize_size`) from the image processor: CLIP's crop, after its shortest-edge resize."""
        crop = int(_size_field(image_processor.crop_size, "height"))
        resize = _size_field(image_processor.size, "shortest_edge")
        return crop, int(resize) if resize else crop

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def facts(self) -> BackboneFacts:
        return facts_of(self.model.config)

    @property
    def projection_dim(self) -> int:
        return self.facts.projection_dim

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
        embeddings = named(transformer.embeddings, f"{prefix}.embeddings")
        if first_norm:
            embeddings.update(named(getattr(transformer, first_norm), f"{prefix}.{first_norm}"))
        blocks = [named(layer, f"{prefix}.encoder.layers.{i}") for i, layer in enumerate(transformer.encoder.layers)]
        groups = tower_groups(
            tower, embeddings, blocks, named(getattr(transformer, final_norm), f"{prefix}.{final_norm}"),
            named(getattr(model, projection), projection),
        )  # fmt: skip
        return with_norms(groups, model, (nn.LayerNorm,), [layer.mlp for layer in transformer.encoder.layers])

    def forward_flops(self, tower: str, tokens: int | None = None) -> list[float | None]:
        if check_tower(tower) == "vision":
            return list(vision_transformer_flops(self.facts))
        return list(text_transformer_flops(self.facts, tokens))

    # partial forward -----------------------------------------------------------------------
    def _blocks(self, transformer, hidden: torch.Tensor, start: int, stop: int, mask=None) -> torch.Tensor:
        for layer in transformer.encoder.layers[start:stop]:
            hidden = _layer_call(layer)(hidden, mask)
        return hidden

    def image_prefix(self, pixel_values: torch.Tensor, groups: int) -> torch.Tensor:
        blocks = self.prefix_blocks("vision", groups)
        vision = self.model.vision_model
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
        return self._blocks(vision, hidden, 0, blocks)

    def image_suffix(self, hidden: torch.Tensor, groups: int, pre_projection: bool = False):
        blocks = self.prefix_blocks("vision", groups)
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
        blocks = self.prefix_blocks("text", groups)
        text = self.model.text_model
        hidden = text.embeddings(input_ids=input_ids)
        return self._blocks(text, hidden, 0, blocks, self._text_mask(hidden, attention_mask))

    def text_suffix(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        blocks = self.prefix_blocks("text", groups)
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

    def load_hint(self, out_dir: str | Path) -> str:
        return f"load it with {self.model_class}.from_pretrained({str(out_dir)!r})"

    def load_example(self, out_dir: str) -> str:
        return "\n".join([
            "import torch",
            "from PIL import Image",
            f"from transformers import {self.model_class}, {self.processor_class}",
            "",
            f'model = {self.model_class}.from_pretrained("{out_dir}").eval()',
            f'processor = {self.processor_class}.from_pretrained("{out_dir}")',
            'image = Image.open("hand.jpg")',
            "with torch.no_grad():",
            "    features = model.get_image_features(**processor(images=image, return_tensors=\"pt\"))",
            "# transformers 5 returns an output object holding the embedding, 4.x the tensor itself",
            'features = getattr(features, "pooler_output", features)',
            *self.example_notes,
        ])  # fmt: skip
