"""Model FLOPs utilisation: the FLOPs a training step must do, over what the GPU could do meanwhile.

Forward FLOPs per sample come from the backbone, per layer group (`Backbone.forward_flops`: matrix
multiplies and convolutions, 2 FLOPs per multiply-add, from the model's shape; the formulas are in
`handclip.model.flops`). A backbone that does not count a group makes the step's FLOPs unknown,
and MFU is then reported as not counted (None), never guessed.

A training step costs the forward pass, plus for every group from the lowest trainable one up
twice its forward in the backward pass (gradients for the activations and for the weights),
as in the PaLM appendix; groups below the lowest trainable one have no backward. With a
frozen prefix the backward is cheaper, so MFU measures the work the step must do, not 6N.
Peak throughput is dense bf16 tensor-core FLOP/s from the table below (by GPU name), or given.
"""

from __future__ import annotations

from collections.abc import Sequence

from handclip.model.backbone import TOWERS, BackboneFacts, group_depths
from handclip.model.flops import text_transformer_flops, vision_transformer_flops

# dense (not sparse) bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # an unnamed H100 (e.g. "NVIDIA H100 80GB HBM3") is the SXM part
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 (V100 has no bf16)
    "T4": 65e12,  # fp16
}


def peak_flops(device_name: str, given_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of the GPU named `device_name` (longest matching entry wins), or `given_tflops`."""
    if given_tflops:
        return given_tflops * 1e12
    matches = [key for key in PEAK_BF16 if key.lower() in device_name.lower()]
    return PEAK_BF16[max(matches, key=len)] if matches else None


def step_flops(depths: Sequence[int], forward: Sequence[float], trainable: int) -> float:
    """Forward + backward FLOPs of one sample through a tower's groups (their `depth`s and forward FLOPs) when
    the groups of depth <= `trainable` train (-1: none; then the step is the forward alone)."""
    backward = sum(flops for depth, flops in zip(depths, forward, strict=True) if depth <= trainable)
    return sum(forward) + 2 * backward


def step_flops_per_sample(
    facts: BackboneFacts, vision_trainable: int, text_trainable: int, text_tokens: int | None = None
) -> float | None:
    """Training FLOPs per (image, caption) pair of a transformer CLIP from its shape; None for a vision tower
    without patches (a ResNet: `backbone_step_flops` counts it from the backbone)."""
    if not facts.patch_size:
        return None
    image = step_flops(group_depths(facts.vision.depth), vision_transformer_flops(facts), vision_trainable)
    caption = step_flops(group_depths(facts.text.depth), text_transformer_flops(facts, text_tokens), text_trainable)
    return image + caption


def backbone_step_flops(backbone, text_tokens: int | None = None) -> float | None:
    """Training FLOPs per (image, caption) pair of `backbone` as its groups train now (after `apply_freeze`), with
    captions of `text_tokens` tokens (the whole context where the backbone pads every caption to it); None when the
    backbone does not count some group's FLOPs."""
    text_tokens = None if backbone.pads_to_context else text_tokens
    total = 0.0
    for tower in TOWERS:
        forward = backbone.forward_flops(tower, text_tokens if tower == "text" else None)
        if any(flops is None for flops in forward):
            return None
        depths = [group.depth for group in backbone.layer_groups(tower)]
        total += step_flops(depths, forward, trainable_blocks(backbone, tower))
    return total


def trainable_blocks(backbone, tower: str) -> int:
    """How many top blocks of `tower` train now (depth + 1 with the embeddings; 0 projection only; -1 nothing)."""
    trained = [g.depth for g in backbone.layer_groups(tower) if any(p.requires_grad for p in g.parameters.values())]
    return max(trained) if trained else -1


def mfu(samples_per_second: float, flops_per_sample: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when a FLOP count or the peak is unknown."""
    if not flops_per_sample or not peak:
        return None
    return samples_per_second * flops_per_sample / peak
