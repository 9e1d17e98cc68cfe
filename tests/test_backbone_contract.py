"""The backbone interface's contract, held by every implementation: Hugging Face CLIP and SigLIP, open_clip ViT,
open_clip ResNet, each a tiny model built from a config (no download). What one backbone alone does is tested beside it
(tests/test_backbone.py, tests/test_openclip.py)."""

from __future__ import annotations

import ast
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import open_clip
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from handclip.errors import ConfigError
from handclip.model import LastN, Replace, apply_freeze, freeze_report
from handclip.model.backbone import TOWERS, Backbone, BackboneSpec
from handclip.model.exports import export_spec, load_export, spec_classes
from handclip.model.hf import HuggingFaceCLIP, HuggingFaceSigLIP
from handclip.model.lora import Lora
from handclip.model.openclip import OpenCLIP
from handclip.tools.mfu import backbone_step_flops
from tests.conftest import TINY

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
CAPTIONS = ["the dorsal right hand of person 3, a 21 year old male!", "a palm"]


def hf_reference(backbone, pixels, captions):
    """Embeddings as transformers' own CLIPModel.forward gives them (L2-normalised; captions padded to 77)."""
    tokens = backbone.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt")
    out = backbone.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    return out.image_embeds, out.text_embeds


def siglip_reference(backbone, pixels, captions):
    """Embeddings as transformers' own SiglipModel.forward gives them (L2-normalised; captions padded to the context
    with no mask, as SigLIP's model card feeds them)."""
    tokens = backbone.tokenizer(captions, padding="max_length", max_length=64, return_tensors="pt")
    out = backbone.model(input_ids=tokens["input_ids"], pixel_values=pixels)
    return out.image_embeds, out.text_embeds


def open_clip_reference(backbone, pixels, captions):
    """Embeddings as open_clip's own encode_image / encode_text give them (captions padded to 77)."""
    model = backbone.model
    normalise = nn.functional.normalize
    return normalise(model.encode_image(pixels), dim=-1), normalise(model.encode_text(open_clip.tokenize(captions)),
                                                                    dim=-1)  # fmt: skip


@dataclass
class Case:
    """A tiny backbone and what its groups must hold."""

    make: Callable[[], BackboneSpec]
    vision: list[str]  # group names, input to output
    text: list[str]
    vision_embeddings: set[str]
    vision_projection: set[str]
    text_embeddings: set[str]
    text_projection: set[str]
    reference: Callable
    roles: tuple[str, ...]  # LoRA roles its transformer blocks offer
    vision_roles: bool = True  # whether its image tower has transformer blocks for adapters
    final_norms: set[str] = field(default_factory=set)  # the norm parameters of the vision final-norm group
    padded_to: int | None = None  # the context every caption is padded to (SigLIP); None: to the batch's longest
    replaces_projection: bool = True  # whether `projection=replace` can put a new head on it


BLOCKS3 = ["vision.embeddings", "vision.blocks.0", "vision.blocks.1", "vision.blocks.2", "vision.final_norm",
           "vision.projection"]  # fmt: skip
TEXT2 = ["text.embeddings", "text.blocks.0", "text.blocks.1", "text.final_norm", "text.projection"]
CASES = {
    "hf": Case(
        lambda: HuggingFaceCLIP(**TINY), BLOCKS3, TEXT2,
        {"vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
         "vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm.weight",
         "vision_model.pre_layrnorm.bias"},
        {"visual_projection.weight"},
        {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"},
        {"text_projection.weight"}, hf_reference, ("q", "k", "v", "out", "fc1", "fc2"),
        final_norms={"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"},
    ),
    "siglip": Case(
        lambda: HuggingFaceSigLIP(source="tiny", name="tiny-siglip", seed=0, config={
            "vision_config": {**TINY["config"]["vision_config"]},
            "text_config": {**TINY["config"]["text_config"], "max_position_embeddings": 64}}),
        [*BLOCKS3[:-1], "vision.attention_pool"], TEXT2,
        {"vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.patch_embedding.bias",
         "vision_model.embeddings.position_embedding.weight"},
        {f"vision_model.head.{p}" for p in (
            "probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
            "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
            "mlp.fc2.weight", "mlp.fc2.bias")},
        {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"},
        {"text_model.head.weight", "text_model.head.bias"}, siglip_reference, ("q", "k", "v", "out", "fc1", "fc2"),
        final_norms={"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"}, padded_to=64,
        replaces_projection=False,
    ),
    "oc_vit": Case(
        lambda: OpenCLIP(name="tiny-vit", seed=0, config={"embed_dim": 16, "text_cfg": TEXT, "vision_cfg": {
            "image_size": 32, "patch_size": 16, "width": 32, "layers": 3, "head_width": 16}}),
        BLOCKS3, TEXT2,
        {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
         "visual.ln_pre.bias"},
        {"visual.proj"}, {"token_embedding.weight", "positional_embedding"}, {"text_projection"},
        open_clip_reference, ("fc1", "fc2"), final_norms={"visual.ln_post.weight", "visual.ln_post.bias"},
    ),
    "oc_rn": Case(
        lambda: OpenCLIP(name="tiny-rn", seed=0, config={"embed_dim": 16, "text_cfg": TEXT, "vision_cfg": {
            "image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32}}),
        ["vision.stem", "vision.layer1", "vision.layer2", "vision.layer3", "vision.layer4", "vision.attention_pool",
         "vision.projection"], TEXT2,
        {f"visual.{part}.{p}" for part in ("conv1", "conv2", "conv3") for p in ("weight",)}
        | {f"visual.bn{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")},
        {"visual.attnpool.c_proj.weight", "visual.attnpool.c_proj.bias"},
        {"token_embedding.weight", "positional_embedding"}, {"text_projection"},
        open_clip_reference, ("fc1", "fc2"), vision_roles=False,
    ),
}  # fmt: skip


@pytest.fixture(params=list(CASES), scope="module")
def case(request) -> Case:
    return CASES[request.param]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("contract-cache")


@pytest.fixture
def make(case, cache) -> Callable[[], Backbone]:
    """A fresh copy of the case's backbone, loaded (the first load builds it in the cache)."""
    return lambda: case.make().load(cache).eval()


def pixels_for(backbone, count: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, backbone.image_size, backbone.image_size, generator=generator)


# --- the partition: every parameter in exactly one group, in order ----------------------------------------


def test_every_parameter_is_in_exactly_one_group_in_order(case, make):
    backbone = make()
    backbone.check_partition()
    counted = sum(g.numel() for g in backbone.all_groups()) + sum(p.numel() for _, p in backbone.temperature())
    assert counted == sum(p.numel() for p in backbone.parameters())
    for tower, names in (("vision", case.vision), ("text", case.text)):
        groups = backbone.layer_groups(tower)
        blocks = len(names) - 3
        assert [g.name for g in groups] == names
        assert [g.kind for g in groups] == ["embeddings", *["block"] * blocks, "final_norm", "projection"]
        assert [g.depth for g in groups] == [blocks + 1, *range(blocks, 0, -1), 1, 0]
        assert [g.index for g in groups] == list(range(len(groups)))
        assert [g.block for g in groups if g.kind == "block"] == list(range(blocks))
        assert blocks == backbone.facts.depth(tower)
    vision, text = backbone.layer_groups("vision"), backbone.layer_groups("text")
    assert set(vision[0].parameters) == case.vision_embeddings and set(vision[-1].parameters) == case.vision_projection
    assert set(text[0].parameters) == case.text_embeddings and set(text[-1].parameters) == case.text_projection
    if case.final_norms:
        assert vision[-2].norms == case.final_norms
    # norms are named where they are: every group's norms are its own parameters
    assert all(g.norms <= set(g.parameters) for g in backbone.all_groups())
    backbone.extra = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="outside every layer group: extra.weight"):
        backbone.check_partition()


def test_the_freeze_table_names_groups_by_their_labels_and_policies_see_their_kind(case, make):
    backbone = make()
    report = apply_freeze(backbone, LastN(vision_blocks=1, text_blocks=0))
    rows = {row.group: row.status for row in report.rows}
    temperature = ["logit_scale", "logit_bias"] if backbone.logit_bias is not None else ["logit_scale"]
    assert list(rows) == [*temperature, *reversed(case.vision), *reversed(case.text)]
    # the top block goes with the final-norm group (for a ResNet: layer4 with the attention pool)
    assert rows[case.vision[-2]] == rows[case.vision[-3]] == rows[case.vision[-1]] == "yes"
    assert rows[case.vision[-4]] == "no" and rows["text.final_norm"] == "no"
    assert freeze_report(backbone, "again").to_text().count(case.vision[-2]) == 1


def test_a_repeated_block_holds_exactly_its_groups_parameters(case, make):
    backbone = make()
    for tower in TOWERS:
        blocks = backbone.blocks(tower)
        groups = [g for g in backbone.layer_groups(tower) if g.kind == "block"]
        assert len(blocks) in (0, len(groups))  # [] for a tower whose blocks are not transformer layers
        for module, group in zip(blocks, groups, strict=False):
            assert {id(p) for p in module.parameters()} == {id(p) for p in group.parameters.values()}
    assert len(backbone.blocks("text")) == backbone.facts.depth("text")


def test_each_transformer_blocks_feed_forward_network_is_named_in_its_group(case, make):
    # what freeze=clipfit reads: the parameters of each block's feed-forward network, and nothing outside a block
    backbone = make()
    for tower in TOWERS:
        for group in backbone.layer_groups(tower):
            assert group.feed_forward <= set(group.parameters), group.name
            transformer = tower == "text" or case.vision_roles
            if group.kind == "block" and transformer:
                biases = [n for n in group.feed_forward if n.endswith(".bias")]
                assert len(biases) == 2 and len(group.feed_forward) == 4, (group.name, sorted(group.feed_forward))
                assert len(group.feed_forward_output) == 2 and group.feed_forward_output <= group.feed_forward
            elif group.kind != "block":
                assert not group.feed_forward and not group.feed_forward_output, group.name


# --- the forward: full, and cut at every group ----------------------------------------------------------


def test_the_embeddings_are_the_librarys_own_and_prefix_then_suffix_equals_them_at_every_cut(case, make):
    backbone = make()
    pixels, tokens = pixels_for(backbone), backbone.tokenize(CAPTIONS)
    depth = {tower: backbone.facts.depth(tower) for tower in TOWERS}
    with torch.no_grad():
        image = backbone.encode_image(pixels)
        text = backbone.encode_text(tokens["input_ids"], tokens["attention_mask"])
        assert image.shape == (3, backbone.facts.projection_dim) and text.shape == (2, backbone.facts.projection_dim)
        reference = case.reference(backbone, pixels, CAPTIONS)
        torch.testing.assert_close(nn.functional.normalize(image, dim=-1), reference[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(nn.functional.normalize(text, dim=-1), reference[1], atol=1e-5, rtol=1e-4)
        for groups in range(1, depth["vision"] + 2):
            hidden = backbone.image_prefix(pixels, groups)
            torch.testing.assert_close(backbone.image_suffix(hidden, groups), image, atol=1e-5, rtol=1e-4)
        for groups in range(1, depth["text"] + 2):
            hidden = backbone.text_prefix(tokens["input_ids"], tokens["attention_mask"], groups)
            suffix = backbone.text_suffix(hidden, tokens["input_ids"], tokens["attention_mask"], groups)
            torch.testing.assert_close(suffix, text, atol=1e-5, rtol=1e-4)
    for tower, prefix in (("vision", lambda g: backbone.image_prefix(pixels, g)),
                          ("text", lambda g: backbone.text_prefix(tokens["input_ids"], None, g))):  # fmt: skip
        for groups in (0, depth[tower] + 2):
            with pytest.raises(ValueError, match=rf"must be 1 \(embeddings\) to {depth[tower] + 1}"):
                prefix(groups)


@pytest.mark.parametrize("groups", [1, "all"])
def test_the_pre_projection_feature_comes_with_the_embedding_from_one_forward(make, groups):
    backbone = make()
    pixels = pixels_for(backbone, 2)
    groups = backbone.facts.depth("vision") + 1 if groups == "all" else groups
    with torch.no_grad():
        full = backbone.encode_image(pixels)
        pre, projected = backbone.encode_image(pixels, pre_projection=True)
        assert pre.shape == (2, backbone.facts.vision.width)
        torch.testing.assert_close(projected, full, atol=1e-5, rtol=1e-4)
        suffix_pre, suffix = backbone.image_suffix(backbone.image_prefix(pixels, groups), groups, pre_projection=True)
        torch.testing.assert_close(suffix_pre, pre, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(suffix, full, atol=1e-5, rtol=1e-4)


def test_images_and_texts_are_encoded_independently_of_their_batch(case, make):
    """No sample changes another's embedding: not padding, not the batch it is in (in evaluation mode)."""
    backbone = make()
    pixels = pixels_for(backbone, 3)
    with torch.no_grad():
        together = backbone.encode_image(pixels)
        for row in range(3):
            torch.testing.assert_close(backbone.encode_image(pixels[row : row + 1])[0], together[row], atol=1e-5,
                                       rtol=1e-4)  # fmt: skip
        alone = backbone.tokenize(CAPTIONS[1:])
        padded = backbone.tokenize(CAPTIONS)  # the short caption padded to the long one (or both to the context)
        if case.padded_to:
            assert padded["input_ids"].shape[1] == alone["input_ids"].shape[1] == case.padded_to
        else:
            assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
        torch.testing.assert_close(backbone.encode_text(**padded)[1], backbone.encode_text(**alone)[0], atol=1e-5,
                                   rtol=1e-4)  # fmt: skip


# --- tokenizer and text pooling --------------------------------------------------------------------------


def test_the_tokenizer_is_clips_vocabulary_and_pickles(case, make):
    backbone = make()
    # the hub's openai/clip-vit-base-patch32 tokenizer gives these ids for this text
    ids = [49406, 320, 1125, 539, 320, 2463, 49407]
    tokens = backbone.tokenize(["a photo of a hand"])
    if case.padded_to:  # padded with the end-of-text token to the context, every position attended
        assert tokens["input_ids"].tolist() == [ids + [49407] * (case.padded_to - len(ids))]
        assert tokens["attention_mask"].tolist() == [[1] * case.padded_to]
        long = backbone.tokenize(["hand " * 100])["input_ids"]
        assert long.shape == (1, case.padded_to)  # truncated to the context
    else:
        assert tokens["input_ids"].tolist() == [ids]
        assert tokens["attention_mask"].tolist() == [[1] * 7]
        batch = backbone.tokenize(["a hand", "a photo of a hand"])
        assert batch["attention_mask"].sum(1).tolist() == [4, 7] and batch["input_ids"].shape == (2, 7)
    again = pickle.loads(pickle.dumps(backbone.text_tokenizer))  # what data loader workers get
    assert torch.equal(again(CAPTIONS)["input_ids"], backbone.tokenize(CAPTIONS)["input_ids"])


def test_the_text_embedding_pools_at_the_end_of_text_token(case, make):
    backbone = make()
    tokens = backbone.tokenize(["a dorsal hand", "a palmar hand"])
    with torch.no_grad():
        features = backbone.encode_text(tokens["input_ids"], tokens["attention_mask"])
        # under the causal mask the first token's state is the same for every caption
        assert not torch.allclose(features[0], features[1])
        if case.padded_to:  # SigLIP pools the last position, padding included: it is the end of every text
            changed = tokens["input_ids"].clone()
            changed[:, -1] = 320
            assert not torch.allclose(backbone.encode_text(changed, tokens["attention_mask"]), features)
            return
        # what follows the end-of-text token does not count
        extended = torch.cat([tokens["input_ids"], tokens["input_ids"][:, 1:3]], dim=1)
        mask = torch.cat([tokens["attention_mask"], torch.zeros(2, 2, dtype=torch.long)], dim=1)
        torch.testing.assert_close(backbone.encode_text(extended, mask), features, atol=1e-5, rtol=1e-4)


# --- a replaced projection, adapters, compute settings ---------------------------------------------------


def test_a_replaced_projection_is_seeded_in_the_projection_groups_and_sets_the_width(case, make):
    backbone, twin = make(), make()
    if not case.replaces_projection:  # refused in one line, the model left as it was
        before = {n: p.clone() for n, p in backbone.named_parameters()}
        with pytest.raises(ConfigError, match="projection=replace: .* use projection=keep"):
            Replace(dim=8, seed=3).check(backbone.facts)  # refused from the facts, before any weights load
        with pytest.raises(ConfigError, match="projection=replace: .* use projection=keep"):
            Replace(dim=8, seed=3).apply(backbone)
        assert all(torch.equal(p, before[n]) for n, p in backbone.named_parameters())
        return
    heads = Replace(dim=8, seed=3).apply(backbone)
    Replace(dim=8, seed=3).apply(twin)
    assert backbone.facts.projection_dim == 8
    backbone.check_partition()
    projections = {id(p) for tower in TOWERS for p in backbone.layer_groups(tower)[-1].parameters.values()}
    assert {id(p) for p in heads} <= projections
    assert all(torch.equal(a, b) for a, b in zip(heads, Replace(dim=8, seed=3).apply(twin), strict=True))
    tokens = backbone.tokenize(CAPTIONS)
    with torch.no_grad():
        assert backbone.encode_image(pixels_for(backbone, 1)).shape == (1, 8)
        assert backbone.encode_text(tokens["input_ids"], tokens["attention_mask"]).shape == (2, 8)


def test_adapter_targets_are_linear_layers_and_merging_keeps_the_embeddings(case, make):
    pytest.importorskip("peft")
    backbone = make()
    host = backbone.adapter_host()
    for tower in TOWERS:
        blocks = [g.block for g in backbone.layer_groups(tower) if g.kind == "block"]
        if tower == "vision" and not case.vision_roles:
            with pytest.raises(ConfigError, match="freeze=lora"):
                backbone.adapter_targets(tower, blocks[-1])
            continue
        roles = backbone.adapter_targets(tower, blocks[-1])
        for role in case.roles:
            assert isinstance(host.get_submodule(roles[role]), nn.Linear), (tower, role)
        for role in set(("q", "k", "v", "out", "fc1", "fc2")) - set(case.roles):
            with pytest.raises(ConfigError, match=f"freeze.targets has {role}"):
                roles[role]
    policy = Lora(rank=2, alpha=4, dropout=0.0, targets=["fc1", "fc2"], towers=["text"], blocks=1)
    apply_freeze(backbone, policy)
    backbone.check_partition()  # the adapters sit in their block's group
    adapters = [n for g in backbone.all_groups() for n, p in g.parameters.items() if "lora_" in n and p.requires_grad]
    assert len(adapters) == 2 * 2  # A and B of fc1 and fc2 in the top text block
    tokens = backbone.tokenize(CAPTIONS)
    with torch.no_grad():
        for name, parameter in host.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
        adapted = backbone.encode_text(tokens["input_ids"], tokens["attention_mask"])
        merged = policy.merge(backbone)
        assert merged and "the adapters of 2 layers merged into the weights" in merged
        torch.testing.assert_close(backbone.encode_text(tokens["input_ids"], tokens["attention_mask"]), adapted,
                                   atol=1e-5, rtol=1e-4)  # fmt: skip
    assert not any("lora_" in n for n, _ in backbone.named_parameters()) and policy.merge(backbone) is None


def test_gradient_checkpointing_and_the_attention_kernel_leave_the_numbers_alone(make):
    backbone = make().train()
    pixels, tokens = pixels_for(backbone, 2), backbone.tokenize(CAPTIONS)

    def step():
        backbone.zero_grad(set_to_none=True)
        image, text = backbone.encode_image(pixels), backbone.encode_text(tokens["input_ids"], tokens["attention_mask"])
        (image.square().sum() + text.square().sum()).backward()
        return image.detach(), {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}

    backbone.eval()  # BatchNorm statistics stay as they are between the two steps
    plain = step()
    backbone.set_gradient_checkpointing(True)
    checkpointed = step()
    backbone.set_gradient_checkpointing(False)
    torch.testing.assert_close(checkpointed[0], plain[0], atol=1e-6, rtol=1e-5)
    assert set(checkpointed[1]) == set(plain[1])
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    backbone.set_attention("sdpa")  # every backbone runs PyTorch's fused attention
    torch.testing.assert_close(step()[0], plain[0], atol=1e-5, rtol=1e-4)
    try:
        backbone.set_attention("eager")
    except ConfigError as error:  # a backbone may offer only sdpa, and says so
        assert "compute.attention=eager" in str(error)
    else:
        torch.testing.assert_close(step()[0], plain[0], atol=1e-5, rtol=1e-4)


# --- the spec: facts and skeleton without weights --------------------------------------------------------


def test_the_spec_knows_the_shape_and_the_skeleton_the_groups_without_weights(case, make):
    spec, loaded = case.make(), make()
    skeleton = spec.skeleton()
    assert next(skeleton.parameters()).device.type == "meta"
    assert spec.facts() == skeleton.facts == loaded.facts
    assert [(g.name, g.kind, g.depth, set(g.parameters)) for g in skeleton.all_groups()] == [
        (g.name, g.kind, g.depth, set(g.parameters)) for g in loaded.all_groups()
    ]
    report = apply_freeze(skeleton, LastN(vision_blocks=1, text_blocks=0))
    assert 0 < report.trainable < report.total
    assert skeleton.forward_flops("vision") == loaded.forward_flops("vision")  # the dry run counts on the skeleton
    assert spec.export_format == loaded.export_format and spec.initial_weights()


# --- exports: written, recognised by their own implementation only, loaded back --------------------------


def test_an_export_is_recognised_by_its_own_implementation_and_loads_back_the_same(case, make, tmp_path):
    backbone = make()
    if case.replaces_projection:
        Replace(dim=8, seed=1).apply(backbone)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # "fine-tuned": every weight and BatchNorm statistic moves
        for tensor in backbone.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    out = backbone.save_pretrained(tmp_path / "export")
    owners = [spec_class for spec_class in spec_classes() if spec_class.recognises(out)]
    assert owners == [type(case.make())]
    assert isinstance(export_spec(out), type(case.make()))
    again = load_export(out).eval()
    pixels, tokens = pixels_for(backbone), backbone.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(pixels), backbone.encode_image(pixels), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(again.encode_text(**again.tokenize(CAPTIONS)), backbone.encode_text(**tokens),
                                   atol=1e-5, rtol=1e-4)  # fmt: skip
    assert (again.image_size, again.resize_size, again.image_mean, again.image_std) == (
        backbone.image_size, backbone.resize_size, backbone.image_mean, backbone.image_std)  # fmt: skip
    for (name, mine), (_, theirs) in zip(backbone.temperature(), again.temperature(), strict=True):
        assert torch.equal(mine, theirs), name  # the trained scale (and bias) go with the model
    assert str(out) in backbone.load_hint(out)
    example = backbone.load_example("FOLDER")
    ast.parse(example)  # Python, which the model card carries (run in tests/test_tool_safety.py)
    assert "FOLDER" in example and "features" in example


# --- FLOPs ------------------------------------------------------------------------------------------------


def counted(run: Callable[[], object]) -> float:
    """FLOPs of `run()` as PyTorch's FlopCounterMode counts them (with gradients on, as in training: without,
    nn.MultiheadAttention takes a fused path the counter does not see; CPU attention registered, as on a GPU)."""

    def attention(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    cpu = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention}
    with FlopCounterMode(display=False, custom_mapping=cpu) as counter:
        run()
    return counter.get_total_flops()


def test_forward_flops_are_counted_per_group_as_pytorch_counts_them(make):
    backbone = make()
    pixels = pixels_for(backbone, 1)
    ids = torch.randint(1, 400, (1, 7))
    ids[:, -1] = 49407
    for tower in TOWERS:
        flops = backbone.forward_flops(tower, 7)
        groups = backbone.layer_groups(tower)
        assert len(flops) == len(groups) and all(f is not None and f >= 0 for f in flops)
        assert all(f > 0 for f, g in zip(flops, groups, strict=True) if g.kind in ("block", "projection"))
        for cut in range(1, backbone.facts.depth(tower) + 2):  # each group's count, from the forward cut there
            if tower == "vision":
                prefix = partial(backbone.image_prefix, pixels, cut)
                suffix = partial(backbone.image_suffix, prefix(), cut)
            else:
                prefix = partial(backbone.text_prefix, ids, None, cut)
                suffix = partial(backbone.text_suffix, prefix(), ids, None, cut)
            assert counted(prefix) == pytest.approx(sum(flops[:cut])), (tower, cut)
            assert counted(suffix) == pytest.approx(sum(flops[cut:])), (tower, cut)
    assert sum(backbone.forward_flops("vision")) == pytest.approx(counted(lambda: backbone.encode_image(pixels)))
    # a training step costs the forward, and twice the forward of what trains on top of it
    steps = []
    for blocks in range(backbone.facts.depth("vision") + 1):
        apply_freeze(backbone, LastN(vision_blocks=blocks, text_blocks=0))
        steps.append(backbone_step_flops(backbone, 7))
    tokens = None if backbone.pads_to_context else 7  # a caption padded to the context costs the whole context
    forward = sum(backbone.forward_flops("vision")) + sum(backbone.forward_flops("text", tokens))
    assert forward < steps[0] < steps[-1] < 3 * forward and steps == sorted(steps)


@pytest.mark.parametrize("backbone", ["tiny", "oc_tiny_rn"])
def test_the_dry_run_shows_the_backbones_flops_and_group_labels(tmp_path, backbone):
    from rich.console import Console

    from handclip.build import build
    from handclip.model.freeze import apply_freeze as freeze
    from handclip.train.config import build_components
    from handclip.train.dry_run import dry_run
    from tests.test_config import compose_plain

    cfg = compose_plain(tmp_path, "experiment=demo", f"backbone={backbone}", "freeze=last_n", "freeze.vision_blocks=1")
    console = Console(record=True, width=200)
    plan = dry_run(cfg, console)
    text = console.export_text()
    skeleton = build(cfg["backbone"], "backbone").skeleton()
    freeze(skeleton, build_components(cfg, need_data=False).freeze)
    assert plan["step_flops"] == backbone_step_flops(skeleton, 32) > sum(skeleton.forward_flops("vision"))
    image = sum(skeleton.forward_flops("vision")) / 1e9
    assert f"forward FLOPs per sample: image {image:.3g} GFLOP" in text
    pool = "vision.attention_pool" if backbone == "oc_tiny_rn" else "vision.final_norm"
    assert pool in text and (backbone == "tiny") == ("vision.final_norm" in text)
