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
                      q/k/v_proj); projection = attnpool.c_proj. Tables name them by the tower's own labels,
                      vision.stem, vision.layer1..layer4, vision.attention_pool, vision.projection; policies
                      see their kind and depth as listed here. open_clip's `ModifiedResNet.lock` supports
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
`-quickgelu` name for OpenAI weights). `OpenCLIP.recognises(DIR)` / `OpenCLIP.from_export(DIR)` read such a
folder back (`handclip.model.exports`).

Modules: `spec` (the spec: config checks, loading, errors), `tokenizer`, `towers` (what the backbone asks
of an image tower), `vit` and `resnet` (the image towers), `text` (the text tower), `backbone` (the
loaded model, joining one image tower and the text tower).
"""

from handclip.model.openclip.backbone import CONFIG, WEIGHTS, OpenCLIPBackbone
from handclip.model.openclip.spec import OpenCLIP, facts_of

__all__ = ["CONFIG", "WEIGHTS", "OpenCLIP", "OpenCLIPBackbone", "facts_of"]
