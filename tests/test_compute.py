"""Compute settings: gradient checkpointing, attention kernel, compilation, fused AdamW, loader workers, MFU."""

import functools

import pytest
import torch
import yaml

from handclip.errors import ConfigError
from handclip.losses import contrastive_loss
from handclip.model import LastN, TextFrozen, apply_freeze, load_backbone
from handclip.model.backbone import BackboneFacts, TowerFacts
from handclip.tools.mfu import mfu, peak_flops, step_flops_per_sample, trainable_blocks
from handclip.train.compute import Compute
from handclip.train.datamodule import loader_workers
from handclip.train.optim import fused_if_cuda
from tests.conftest import TINY

OPEN_CLIP_TINY = {**yaml.safe_load(open("conf/backbone/oc_tiny_vit.yaml")), "pretrained": None}


def saved_bytes(backbone) -> int:
    """Bytes the autograd graph keeps for the backward pass of one step's forward."""
    kept = []

    def keep(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        step_gradients(backbone)
    return sum(kept)


def step_gradients(backbone, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = backbone.image_size
    pixels = torch.randn(6, 3, size, size, generator=generator)
    tokens = backbone.tokenize([f"the dorsal right hand of person {i}" for i in range(6)])
    backbone.zero_grad(set_to_none=True)
    loss = contrastive_loss(
        backbone.encode_image(pixels), backbone.encode_text(tokens["input_ids"], tokens["attention_mask"]),
        backbone.logit_scale,
    )  # fmt: skip
    loss.backward()
    return {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("spec", [TINY, OPEN_CLIP_TINY], ids=["hf", "open_clip"])
@pytest.mark.parametrize("policy", [TextFrozen(), LastN(vision_blocks=2, text_blocks=1)], ids=["text_frozen", "last"])
def test_gradient_checkpointing_gives_the_same_gradients(spec, policy, tmp_path):
    backbone = load_backbone(spec, tmp_path).train()
    apply_freeze(backbone, policy)
    plain, plain_bytes = step_gradients(backbone), saved_bytes(backbone)
    Compute(gradient_checkpointing=True).apply(backbone)
    checkpointed = step_gradients(backbone)
    assert saved_bytes(backbone) < 0.7 * plain_bytes  # what checkpointing is for
    # above a frozen prefix a block's input needs no gradient: reentrant checkpointing would drop its weights'
    assert set(checkpointed) == set(plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    Compute(gradient_checkpointing=False).apply(backbone)
    assert saved_bytes(backbone) == plain_bytes


def test_attention_kernels_agree(tmp_path):
    backbone = load_backbone(TINY, tmp_path).eval()
    pixels = torch.randn(3, 3, backbone.image_size, backbone.image_size)
    Compute(attention="sdpa").apply(backbone)
    sdpa = backbone.encode_image(pixels)
    Compute(attention="eager").apply(backbone)
    assert backbone.model.config._attn_implementation == "eager"
    torch.testing.assert_close(backbone.encode_image(pixels), sdpa, atol=1e-5, rtol=1e-5)


def test_open_clip_refuses_eager_attention(tmp_path):
    backbone = load_backbone(OPEN_CLIP_TINY, tmp_path)
    with pytest.raises(ConfigError, match="compute.attention=eager: open_clip backbones always use"):
        Compute(attention="eager").apply(backbone)


@pytest.mark.slow  # inductor compiles C++ kernels for the CPU: about a minute on two cores
def test_compiled_blocks_give_the_same_features_and_gradients(tmp_path):
    backbone = load_backbone(TINY, tmp_path).train()
    apply_freeze(backbone, TextFrozen())
    plain = step_gradients(backbone)
    Compute(compile=True).apply(backbone)
    compiled = step_gradients(backbone)
    for name in plain:
        torch.testing.assert_close(compiled[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_adamw_only_on_a_gpu_and_never_over_a_chosen_setting():
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert fused_if_cuda(functools.partial(torch.optim.AdamW), cpu) == {}
    assert fused_if_cuda(functools.partial(torch.optim.SGD), cpu) == {}
    if torch.cuda.is_available():
        gpu = [torch.nn.Parameter(torch.zeros(2, device="cuda"))]
        assert fused_if_cuda(functools.partial(torch.optim.AdamW), gpu) == {"fused": True}
        assert fused_if_cuda(functools.partial(torch.optim.AdamW, foreach=True), gpu) == {}


def test_loader_workers_auto_leaves_a_core_for_training(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert loader_workers("auto") == 7
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert loader_workers("auto") == 0
    assert loader_workers(3) == 3
    with pytest.raises(ConfigError, match="data.num_workers='many' must be auto or an integer"):
        loader_workers("many")


VIT_B32 = BackboneFacts(
    vision=TowerFacts(depth=12, width=768, heads=12, mlp_width=3072),
    text=TowerFacts(depth=12, width=512, heads=8, mlp_width=2048),
    projection_dim=512, image_size=224, patch_size=32,
)  # fmt: skip


def counted_flops(backbone, tokens: int) -> float:
    """FLOPs of one training step per sample, as PyTorch's counter sees the matrix multiplies."""
    from torch.utils.flop_counter import FlopCounterMode

    pixels = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    ids = torch.randint(1, 400, (2, tokens))
    ids[:, -1] = 49407
    with FlopCounterMode(display=False) as counter:
        loss = backbone.encode_image(pixels).sum() + backbone.encode_text(ids, torch.ones_like(ids)).sum()
        loss.backward()
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("vision_blocks", [0, 2, 12], ids=["projection", "last_2", "all_blocks"])
def test_flops_per_sample_match_pytorchs_count_on_vit_b32(vision_blocks):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from handclip.model.hf import HFBackbone

    with torch.device("cpu"):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig())
    backbone = HFBackbone(model, None, CLIPImageProcessor(), "ViT-B/32")
    apply_freeze(backbone, LastN(vision_blocks=vision_blocks, text_blocks=0))
    vision, text = trainable_blocks(backbone, "vision"), trainable_blocks(backbone, "text")
    estimate = step_flops_per_sample(VIT_B32, vision, text, text_tokens=16)
    assert estimate == pytest.approx(counted_flops(backbone, 16), rel=0.03)


def test_mfu_from_the_gpu_name_or_a_given_peak():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A10G") == 70e12
    assert peak_flops("a GPU of the future") is None
    assert peak_flops("a GPU of the future", given_tflops=500) == 500e12
    flops = step_flops_per_sample(VIT_B32, 13, 13, text_tokens=77)
    # the whole of ViT-B/32 trains at about 3 x (4.4 + 2.9) GMACs x 2 per pair
    assert 40e9 < flops < 46e9
    assert mfu(1000.0, flops, 989e12) == pytest.approx(1000 * flops / 989e12)
    assert mfu(1000.0, None, 989e12) is None


def test_the_dry_run_estimates_less_memory_with_micro_batches_and_checkpointing(tmp_path):
    from rich.console import Console

    from handclip.train.dry_run import dry_run
    from tests.test_config import compose_plain

    def estimate(*overrides: str) -> tuple[int, str]:
        console = Console(record=True, width=200)
        plan = dry_run(compose_plain(tmp_path, "experiment=demo", "loss=clip", "freeze=full", *overrides), console)
        return plan["memory_bytes"], console.export_text()

    whole, _ = estimate()
    micro, text = estimate("compute.accumulate=4")
    checkpointed, _ = estimate("compute.accumulate=4", "compute.gradient_checkpointing=true")
    assert "memory at batch 32 (4 micro-batches of 8)" in text
    assert checkpointed < micro < whole


def test_a_run_config_refuses_lightnings_accumulation_with_a_contrastive_loss(tmp_path):
    from handclip.train.config import build_components
    from tests.test_config import compose_plain

    cfg = compose_plain(tmp_path, "experiment=demo", "trainer.accumulate_grad_batches=2")
    with pytest.raises(ConfigError, match="compute.accumulate=2 to hold it in memory in 2 micro-batches"):
        build_components(cfg, need_data=False)
    cfg = compose_plain(tmp_path, "experiment=demo", "compute.accumulate=2", "trainer.devices=2")
    with pytest.raises(ConfigError, match="runs on one device only"):
        build_components(cfg, need_data=False)
    cfg = compose_plain(tmp_path, "experiment=demo", "compute.accumulate=2")  # the demo's loss=lwf runs the text
    with pytest.raises(ConfigError, match="loss.terms.keep_prompts runs the text tower inside the loss"):  # tower
        build_components(cfg, need_data=False)
    cfg = compose_plain(tmp_path, "experiment=demo", "loss=clip", "compute.accumulate=2")
    parts = build_components(cfg, need_data=False)
    assert parts.compute.accumulate == 2
