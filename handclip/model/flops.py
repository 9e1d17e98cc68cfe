"""Forward FLOPs of one sample through each layer group, from a model's shape.

Counted as matrix multiplies and convolutions, 2 FLOPs per multiply-add (norms, activations,
pooling, softmax and the loss are left out, as is usual for MFU); these are the operations
PyTorch's `FlopCounterMode` counts, and the backbones' counts agree with it:

- a transformer block on n tokens of width w with MLP width m: 2n(4w² + 2wm) for the linear
  layers and 4n²w for attention (QKᵀ and the weighted sum), causal masks counted in full;
- the patch embedding 2·(patches)·(3p²)·w and the projection 2·w·d;
- a convolution 2·(output positions)·(output channels)·(input channels / groups)·(kernel area);
- an attention pool (a ResNet's) on n positions of width e: 6ne² for q, k, v, 4n²e for attention,
  and its output projection 2·n·e·d (it is applied at every position, and the first one kept).

Each function returns one number a group, in the order of `Backbone.layer_groups`.
"""

from __future__ import annotations

from torch import nn

from handclip.model.backbone import BackboneFacts, TowerFacts


def transformer_block_flops(tokens: int, tower: TowerFacts) -> float:
    """Forward FLOPs of one transformer block on `tokens` tokens."""
    width, mlp = tower.width, tower.mlp_width
    return 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width


def transformer_tower_flops(tokens: int, tower: TowerFacts, embeddings: float, projection: float) -> list[float]:
    """embeddings, each block, the final norm (0), the projection."""
    return [float(embeddings), *[transformer_block_flops(tokens, tower)] * tower.depth, 0.0, float(projection)]


def vision_transformer_flops(facts: BackboneFacts) -> list[float]:
    """A ViT image tower's groups: patch embedding, blocks on the patches and the class token, projection."""
    patches = (facts.image_size // facts.patch_size) ** 2
    vision = facts.vision
    return transformer_tower_flops(patches + 1, vision, 2 * patches * 3 * facts.patch_size**2 * vision.width,
                                   2 * vision.width * facts.projection_dim)  # fmt: skip


def text_transformer_flops(facts: BackboneFacts, tokens: int | None = None) -> list[float]:
    """A text tower's groups on `tokens` tokens (the context length if None): a lookup, blocks, projection."""
    text = facts.text
    return transformer_tower_flops(tokens or facts.context_length, text, 0.0, 2 * text.width * facts.projection_dim)


def conv_output(size: int, conv: nn.Conv2d) -> int:
    """The output side of a square input of side `size` through `conv`."""
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    padding, dilation = conv.padding[0], conv.dilation[0]
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_flops(conv: nn.Conv2d, output: int) -> float:
    """Forward FLOPs of `conv` producing a square map of side `output`."""
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    return 2.0 * output * output * conv.out_channels * (conv.in_channels // conv.groups) * kernel


def attention_pool_flops(positions: int, width: int, output: int) -> tuple[float, float]:
    """(q, k, v and attention, output projection) of an attention pool on `positions` positions."""
    return 6.0 * positions * width * width + 4.0 * positions * positions * width, 2.0 * positions * width * output
