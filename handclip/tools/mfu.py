"""Model FLOPs utilisation: the FLOPs a training step must do, over what the GPU could do meanwhile.

FLOPs per sample come from the model's shape (`BackboneFacts`), counted as matrix multiplies
(2 FLOPs per multiply-add; norms, softmax and the loss are left out, as is usual for MFU):

- a transformer block on n tokens of width w with MLP width m: 2n(4w² + 2wm) for the linear
  layers and 4n²w for attention (QKᵀ and the weighted sum), causal masks counted in full;
- the patch embedding 2·(patches)·(3p²)·w and the projection 2·w·d.

A training step costs the forward pass, plus for every block above the lowest trainable one
twice its forward in the backward pass (gradients for the activations and for the weights),
as in the PaLM appendix; blocks below the lowest trainable block have no backward. With a
frozen prefix the backward is cheaper, so MFU measures the work the step must do, not 6N.
Peak throughput is dense bf16 tensor-core FLOP/s from the table below (by GPU name), or given.
"""

from __future__ import annotations

from handclip.model.backbone import BackboneFacts, TowerFacts

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


def block_flops(tokens: int, tower: TowerFacts) -> float:
    """Forward FLOPs of one transformer block on `tokens` tokens."""
    width, mlp = tower.width, tower.mlp_width
    return 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width


def tower_step_flops(tokens: int, tower: TowerFacts, trainable_blocks: int, stem: float, projection: float) -> float:
    """Forward + backward FLOPs of one sample through a tower whose top `trainable_blocks` blocks train.

    `trainable_blocks` = depth + 1 means everything trains (the embeddings too); 0 means only the
    projection (its own backward is counted), -1 means the tower is frozen (forward only).
    """
    block = block_flops(tokens, tower)
    forward = stem + tower.depth * block + projection
    if trainable_blocks < 0:
        return forward
    backward = 2 * projection + 2 * min(trainable_blocks, tower.depth) * block
    if trainable_blocks > tower.depth:
        backward += 2 * stem
    return forward + backward


def step_flops_per_sample(
    facts: BackboneFacts, vision_trainable: int, text_trainable: int, text_tokens: int | None = None
) -> float | None:
    """Training FLOPs per (image, caption) pair; None for a vision tower without patches (ResNet)."""
    if not facts.patch_size:
        return None
    patches = (facts.image_size // facts.patch_size) ** 2
    vision, text = facts.vision, facts.text
    tokens = text_tokens or facts.context_length
    image = tower_step_flops(
        patches + 1, vision, vision_trainable, 2 * patches * 3 * facts.patch_size**2 * vision.width,
        2 * vision.width * facts.projection_dim,
    )  # fmt: skip
    caption = tower_step_flops(tokens, text, text_trainable, 0.0, 2 * text.width * facts.projection_dim)
    return image + caption


def trainable_blocks(backbone, tower: str) -> int:
    """How many top blocks of `tower` train now (depth + 1 with the embeddings; 0 projection only; -1 nothing)."""
    trained = [g.depth for g in backbone.layer_groups(tower) if any(p.requires_grad for p in g.parameters.values())]
    return max(trained) if trained else -1


def mfu(samples_per_second: float, flops_per_sample: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when a FLOP count or the peak is unknown."""
    if not flops_per_sample or not peak:
        return None
    return samples_per_second * flops_per_sample / peak
