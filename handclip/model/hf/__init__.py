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

SigLIP and SigLIP 2 (`transformers.SiglipModel`) are the same kind of spec and backbone, `HuggingFaceSigLIP`
(`handclip.model.hf.siglip`).

Works with transformers 4.x and 5.x (5.x returns output objects from `get_*_features`, and its
encoder layers return tensors rather than tuples).
"""

from handclip.model.backbone import default_cache_dir
from handclip.model.hf.backbone import HFBackbone, facts_of
from handclip.model.hf.siglip import HuggingFaceSigLIP, SiglipBackbone
from handclip.model.hf.spec import TINY, HuggingFaceCLIP, tiny_clip_config

__all__ = ["TINY", "HFBackbone", "HuggingFaceCLIP", "HuggingFaceSigLIP", "SiglipBackbone", "default_cache_dir",
           "facts_of", "tiny_clip_config"]  # fmt: skip
