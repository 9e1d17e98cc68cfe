"""A loaded open_clip model as a `Backbone`: one image tower (ViT or ResNet) and the text tower, joined.

The backbone asks its image tower (`towers.ImageTower`) for everything that depends on the tower's
kind, so nothing here tells a ViT from a ResNet.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handclip.errors import ConfigError
from handclip.model.backbone import Backbone, BackboneFacts, LayerGroup, check_tower, tower_groups, with_norms
from handclip.model.openclip.resnet import ResNetImageTower
from handclip.model.openclip.text import TextTower
from handclip.model.openclip.tokenizer import OpenCLIPTokenize
from handclip.model.openclip.towers import ImageTower, TowerParts, square
from handclip.model.openclip.vit import ViTImageTower

WEIGHTS = "open_clip_model.safetensors"
CONFIG = "open_clip_config.json"
# the image towers this implementation supports, each recognising its own config and module
IMAGE_TOWERS: tuple[type, ...] = (ViTImageTower, ResNetImageTower)


def image_tower_class(vision_cfg: Mapping) -> type:
    """The image tower an open_clip `vision_cfg` builds."""
    return next(tower for tower in IMAGE_TOWERS if tower.fits(vision_cfg))


def jsonable(value: Any) -> Any:
    """Mappings and sequences as plain dicts and lists (what json writes)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class OpenCLIPBackbone(Backbone):
    """A loaded open_clip model with its tokenizer and preprocessing values (see `handclip.model.openclip`)."""

    export_format = "open_clip"  # what `python -m handclip.export` writes for this backbone
    card_metadata = {"library_name": "open_clip"}

    def __init__(self, model: nn.Module, model_cfg: Mapping, preprocess_cfg: Mapping, name: str, source: str = ""):
        super().__init__()
        self.model = model
        self.model_cfg = copy.deepcopy(dict(model_cfg))
        self.preprocess_cfg = dict(preprocess_cfg)
        self.name = name
        self.source = source or f"open_clip:{name}"
        kinds = [tower for tower in IMAGE_TOWERS if isinstance(model.visual, tower.module_class())]
        if not kinds:
            raise ConfigError(f"backbone.name={name}: image tower {type(model.visual).__name__} is not supported")
        self.image_tower: ImageTower = kinds[0](model.visual)
        self.text_tower = TextTower(model)
        self.image_size = square(self.preprocess_cfg.get("size", 224), "preprocess size")
        # open_clip's eval transform for resize_mode 'shortest' (RN50, the LAION and OpenAI ViTs): shortest edge
        # to the size, then a centre crop, as HandCLIP's transforms do with these values. HandCLIP's transforms
        # always resize bicubic and crop; weights whose tag says 'squash' or 'bilinear' (DFN, CLIPA) get that
        self.resize_size = self.image_size
        self.image_mean = [float(v) for v in self.preprocess_cfg["mean"]]
        self.image_std = [float(v) for v in self.preprocess_cfg["std"]]
        self.context_length = self.text_tower.context_length
        tokenizer_kwargs = (self.model_cfg.get("text_cfg") or {}).get("tokenizer_kwargs")
        self.text_tokenizer = OpenCLIPTokenize(self.context_length, self.text_tower.trimmable, tokenizer_kwargs)

    # interface ------------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def facts(self) -> BackboneFacts:
        from handclip.model.openclip.spec import facts_of

        return facts_of(self.model_cfg)

    @property
    def projection_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.text_tokenizer(texts)

    def encode_image(self, pixel_values: torch.Tensor, pre_projection: bool = False):
        self.image_tower.hold_frozen_statistics(self.training)
        if pre_projection:
            return self.image_suffix(self.image_prefix(pixel_values, 1), 1, pre_projection=True)
        return self.model.encode_image(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # through the partial forward, so texts padded to the longest (not to 77) work too
        return self.text_suffix(self.text_prefix(input_ids, attention_mask, 1), input_ids, attention_mask, 1)

    def _tower(self, tower: str):
        """The image tower or the text tower."""
        return self.image_tower if check_tower(tower) == "vision" else self.text_tower

    # layer groups ------------------------------------------------------------------------------
    def _parts(self, tower: str) -> TowerParts:
        if check_tower(tower) == "vision":
            parts = self.image_tower.parts()
            # anything else of the image tower sits between the blocks and the projection
            placed = {id(p) for part in (parts.embeddings, parts.final_norm, parts.projection, *parts.blocks)
                      for p in part.values()}  # fmt: skip
            for name, parameter in self.model.visual.named_parameters():
                if id(parameter) not in placed:
                    parts.final_norm[f"visual.{name}"] = parameter
            return parts
        parts = self.text_tower.parts()
        if getattr(self.model, "logit_bias", None) is not None:  # fits no tower; unused by HandCLIP's losses
            parts.projection["logit_bias"] = self.model.logit_bias
        return parts

    def layer_groups(self, tower: str) -> list[LayerGroup]:
        parts = self._parts(tower)
        groups = tower_groups(tower, parts.embeddings, parts.blocks, parts.final_norm, parts.projection, parts.labels)
        feed_forward = [getattr(block, "mlp", None) for block in self.blocks(tower)]  # a ResNet stage has none
        return with_norms(groups, self.model, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm), feed_forward)

    def forward_flops(self, tower: str, tokens: int | None = None) -> list[float | None]:
        if check_tower(tower) == "vision":
            return list(self.image_tower.forward_flops(self.facts))  # an image tower's count needs no tokens
        return list(self.text_tower.forward_flops(self.facts, tokens))

    # partial forward -------------------------------------------------------------------------

    def image_prefix(self, pixel_values: torch.Tensor, groups: int) -> torch.Tensor:
        blocks = self.prefix_blocks("vision", groups)
        self.image_tower.hold_frozen_statistics(self.training)
        return self.image_tower.prefix(pixel_values, blocks)

    def image_suffix(self, hidden: torch.Tensor, groups: int, pre_projection: bool = False):
        blocks = self.prefix_blocks("vision", groups)
        self.image_tower.hold_frozen_statistics(self.training)
        pooled, projected = self.image_tower.suffix(hidden, blocks)
        return (pooled, projected) if pre_projection else projected

    def text_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: int) -> torch.Tensor:
        return self.text_tower.prefix(input_ids, self.prefix_blocks("text", groups))

    def text_suffix(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        return self.text_tower.suffix(hidden, input_ids, self.prefix_blocks("text", groups))

    # adapters --------------------------------------------------------------------------------
    def adapter_host(self) -> nn.Module:
        # the backbone itself, not the CLIP model: peft matches target names by suffix, and relative to the
        # CLIP model the text tower's `transformer.resblocks.1.mlp.c_fc` is a suffix of the image tower's
        # `visual.transformer.resblocks.1.mlp.c_fc`; `model.transformer...` is not one of `model.visual...`
        return self

    def adapter_targets(self, tower: str, block: int) -> dict[str, str]:
        targets = self._tower(tower).adapter_targets(block)
        return type(targets)({role: f"model.{name}" for role, name in targets.items()})

    # weights ---------------------------------------------------------------------------------
    def blocks(self, tower: str) -> list[nn.Module]:
        return self._tower(tower).blocks()

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
        head = self._tower(tower).replace_projection(dim, generator)
        if head is None:
            kind = "image" if tower == "vision" else "text"
            raise ConfigError(f"projection: backbone {self.name} has no {kind} projection to replace")
        # keep the config true, so the export builds the same shapes
        self.model_cfg["embed_dim"] = dim
        return head

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """open_clip's own format (see `handclip.model.openclip`): weights, `open_clip_config.json`, `<name>.json`."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
        config = {"model_cfg": self.model_cfg, "preprocess_cfg": jsonable(self.preprocess_cfg)}
        (out_dir / CONFIG).write_text(json.dumps(jsonable(config), indent=2, sort_keys=True) + "\n")
        (out_dir / f"{self.config_name}.json").write_text(json.dumps(jsonable(self.model_cfg), indent=2) + "\n")
        return out_dir

    @property
    def config_name(self) -> str:
        """The name the exported bare config registers under with `open_clip.add_model_config`."""
        base = self.name.split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip(".-") or "model"

    def load_hint(self, out_dir: str | Path) -> str:
        return (
            f"load it with open_clip.create_model_and_transforms('local-dir:{out_dir}') (tokenizer: "
            f"open_clip.get_tokenizer('local-dir:{out_dir}'))"
        )

    def load_example(self, out_dir: str) -> str:
        return "\n".join([
            "import open_clip",
            "import torch",
            "from PIL import Image",
            "",
            f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out_dir}")',
            f'tokenizer = open_clip.get_tokenizer("local-dir:{out_dir}")',
            'image = Image.open("hand.jpg")',
            "with torch.no_grad():",
            "    features = model.eval().encode_image(preprocess(image).unsqueeze(0))",
        ])  # fmt: skip
