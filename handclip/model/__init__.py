"""The CLIP model: the backbone interface, its layer groups, freeze policies and projections.

from handclip.model import HuggingFaceCLIP, LastN, apply_freeze
backbone = HuggingFaceCLIP("openai/clip-vit-base-patch32").load()
report = apply_freeze(backbone, LastN(vision_blocks=2, text_blocks=0))
"""

from handclip.model.backbone import Backbone, BackboneFacts, BackboneSpec, LayerGroup, TowerFacts, default_cache_dir
from handclip.model.freeze import (
    BiasOnly,
    CLIPFit,
    FreezePolicy,
    FreezeReport,
    Frozen,
    Full,
    LastN,
    Locked,
    NormsOnly,
    Pattern,
    TextFrozen,
    apply_freeze,
    freeze_report,
    trainable_parameter_names,
)
from handclip.model.hf import HFBackbone, HuggingFaceCLIP, HuggingFaceSigLIP
from handclip.model.projection import Keep, Replace

__all__ = [
    "Backbone", "BackboneFacts", "BackboneSpec", "BiasOnly", "CLIPFit", "FreezePolicy", "FreezeReport", "Frozen",
    "Full",
    "HFBackbone", "HuggingFaceCLIP", "HuggingFaceSigLIP", "Keep", "LastN", "LayerGroup", "Locked", "NormsOnly",
    "Pattern", "Replace", "TextFrozen", "TowerFacts",
    "apply_freeze", "default_cache_dir", "freeze_report", "load_backbone", "trainable_parameter_names",
]  # fmt: skip


def load_backbone(spec, cache_dir=None) -> Backbone:
    """Load the backbone a spec names: a spec object, or a mapping with or without `_target_`."""
    from handclip.build import build
    from handclip.settings import plain_dict

    if hasattr(spec, "load"):
        return spec.load(cache_dir)
    spec = plain_dict(spec, "backbone")
    spec.setdefault("_target_", "handclip.model.HuggingFaceCLIP")
    return build(spec, "backbone").load(cache_dir)
