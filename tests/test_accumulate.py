"""Contrastive accumulation: a batch in micro-batches gives the gradients of the whole batch."""

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from handclip.errors import ConfigError
from handclip.losses import ContrastiveLoss, LossInputs, LossTerm, Objective
from handclip.model import Full, LastN, TextFrozen, apply_freeze, load_backbone
from handclip.model.forward import Forward
from handclip.train.accumulate import accumulated_backward, contrastive_step, split_batch
from handclip.train.compute import Compute, contrastive_accumulation_refused
from handclip.train.module import FineTuner
from handclip.train.optim import Optimization, warmup_cosine
from tests.conftest import TINY
from tests.test_module import datamodule_for


class SigmoidWithIdentityHead(LossTerm):
    """A term with learnable parts of its own: a SigLIP-style bias and an identity classifier."""

    needs_text = True

    def __init__(self, num_identities: int, embed_dim: int, weight: float = 1.0):
        super().__init__(weight)
        self.bias = torch.nn.Parameter(torch.tensor(-2.0))
        self.head = torch.nn.Linear(embed_dim, num_identities)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        image, text = F.normalize(inputs.image, dim=-1), F.normalize(inputs.text, dim=-1)
        logits = inputs.logit_scale.exp() * image @ text.T + self.bias
        same = (inputs.identities[:, None] == inputs.identities[None, :]).float() * 2 - 1
        sigmoid = -F.logsigmoid(same * logits).sum() / len(image)
        return sigmoid + F.cross_entropy(self.head(inputs.image), inputs.identities)


def objective() -> Objective:
    torch.manual_seed(1)
    return Objective({"clip": ContrastiveLoss(), "sig": SigmoidWithIdentityHead(num_identities=8, embed_dim=16)})


def library_objective() -> Objective:
    """The package's own terms with learnable parts: SigLIP's scale and bias, BN-neck identity heads."""
    from handclip.losses.identity import IdentityLoss
    from handclip.losses.siglip import SigLIPLoss
    from handclip.losses.triplet import TripletLoss

    torch.manual_seed(1)
    return Objective({
        "clip": ContrastiveLoss(), "siglip": SigLIPLoss(),
        "id": IdentityLoss(num_identities=8, embed_dim=16, pre_projection_dim=32, feature="both"),
        "triplet": TripletLoss(feature="pre_projection"),
    })  # fmt: skip


def batch(size: int = 32) -> dict:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 400, (size, 7), generator=generator)
    tokens[:, -1] = 49407  # end of text
    mask = torch.ones_like(tokens)
    mask[::3, -3:-1] = 0  # some captions padded
    return {
        "pixel_values": torch.randn(size, 3, 32, 32, generator=generator),
        "input_ids": tokens, "attention_mask": mask,
        "identities": torch.randint(0, 8, (size,), generator=generator),
    }  # fmt: skip


def gradients(backbone, objective) -> dict[str, torch.Tensor]:
    named = [*backbone.named_parameters(prefix="backbone"), *objective.named_parameters(prefix="objective")]
    return {name: p.grad.clone() for name, p in named if p.grad is not None}


def step_gradients(backbone, objective, data: dict, accumulate: int) -> tuple[dict, float, float]:
    """Gradients after one step's backward, the loss, and the value of what was back-propagated."""
    backbone.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    loss, _, backward = contrastive_step(Forward(backbone), objective, data, accumulate, torch.device("cpu"))
    backward.backward()
    return gradients(backbone, objective), loss.item(), backward.item()


def loss_over(backbone, objective, identities):
    def loss_of(features: dict):
        return objective(LossInputs(features["image"], features["text"], backbone.logit_scale, identities))

    return loss_of


@pytest.mark.parametrize("make", [objective, library_objective], ids=["test_terms", "library_terms"])
@pytest.mark.parametrize("policy", [Full(), LastN(vision_blocks=1, text_blocks=0)], ids=["full", "last_1"])
def test_four_micro_batches_of_8_give_the_gradients_of_one_batch_of_32(tiny_model, policy, make):
    apply_freeze(tiny_model, policy)
    terms, data = make(), batch(32)
    assert [len(c["pixel_values"]) for c in split_batch(data, 4, 32)] == [8, 8, 8, 8]
    expected, whole_loss, _ = step_gradients(tiny_model, terms, data, 1)
    got, loss, backward = step_gradients(tiny_model, terms, data, 4)

    assert set(got) == set(expected)
    assert any(name.startswith("objective.terms.sig") for name in got)  # a term's own parameters
    assert "backbone.model.logit_scale" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)
    assert loss == pytest.approx(whole_loss, rel=1e-5)
    assert backward == pytest.approx(loss)  # what a callback reads as the step's loss


def test_ordinary_accumulation_is_a_different_objective(tiny_model):
    # what Lightning's accumulate_grad_batches computes: a loss per micro-batch, gradients summed
    apply_freeze(tiny_model, Full())
    terms, data = objective(), batch(32)
    expected, _, _ = step_gradients(tiny_model, terms, data, 1)
    tiny_model.zero_grad(set_to_none=True)
    terms.zero_grad(set_to_none=True)
    for chunk in split_batch(data, 4, 32):
        loss, _, _ = contrastive_step(Forward(tiny_model), terms, chunk, 1, torch.device("cpu"))
        (loss / 4).backward()
    got = gradients(tiny_model, terms)
    name = "backbone.model.visual_projection.weight"
    assert (got[name] - expected[name]).abs().max() > 1e-3


def test_dropout_draws_the_same_numbers_in_both_passes(tiny_model):
    # with dropout on, the re-forward must see the masks of the first pass, or the gradient is of nothing
    apply_freeze(tiny_model, Full())
    dropout = torch.nn.Dropout(0.3)
    terms, data = objective(), batch(16)
    first_pass = []

    def encode(chunk: dict, again: bool) -> dict:
        image = dropout(tiny_model.encode_image(chunk["pixel_values"]))
        if not again:
            first_pass.append(image.detach().clone())
        else:
            torch.testing.assert_close(image.detach(), first_pass[len(seen)])
            seen.append(1)
        return {"image": image, "text": tiny_model.encode_text(chunk["input_ids"], chunk["attention_mask"])}

    seen: list = []
    chunks = split_batch(data, 2, 16)
    _, _, surrogate = accumulated_backward(
        encode, loss_over(tiny_model, terms, data["identities"]), chunks, torch.device("cpu")
    )
    surrogate.backward()
    assert len(seen) == 2


def _capture_gradients(grads: list):
    class Capture(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    return Capture()


def _fit_one_step(synthetic_hands, tmp_path, accumulate: int, policy, precision: str = "32-true") -> dict:
    backbone = load_backbone(TINY, tmp_path)
    apply_freeze(backbone, policy)
    datamodule = datamodule_for(synthetic_hands, backbone, batch_size=16)
    optimization = Optimization(
        lr=1e-3, weight_decay=0.0, head_lr_multiplier=1.0, optimizer=functools.partial(torch.optim.AdamW),
        schedule=functools.partial(warmup_cosine, warmup=0),
    )  # fmt: skip
    module = FineTuner(backbone, objective(), optimization, datamodule.val_rows, compute=Compute(accumulate))
    grads: list = []
    L.Trainer(
        max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
        gradient_clip_val=0.05, callbacks=[_capture_gradients(grads)], precision=precision,
    ).fit(module, datamodule=datamodule)  # fmt: skip
    return grads


@pytest.mark.parametrize("policy", [Full(), TextFrozen()], ids=["full", "text_frozen"])
def test_a_lightning_step_in_4_micro_batches_has_the_big_batch_gradients(synthetic_hands, tmp_path, policy):
    whole = _fit_one_step(synthetic_hands, tmp_path, 1, policy)
    micro = _fit_one_step(synthetic_hands, tmp_path, 4, policy)
    assert len(whole) == len(micro) == 2  # two optimiser steps: the second after an update and its zeroing
    for step_whole, step_micro in zip(whole, micro, strict=True):
        assert set(step_whole) == set(step_micro)
        for name in step_whole:
            torch.testing.assert_close(step_micro[name], step_whole[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow  # bf16 matmuls are slow on a CPU
def test_bf16_mixed_micro_batches_agree_with_the_whole_batch_to_bf16_precision(synthetic_hands, tmp_path):
    whole = _fit_one_step(synthetic_hands, tmp_path, 1, TextFrozen(), "bf16-mixed")
    micro = _fit_one_step(synthetic_hands, tmp_path, 2, TextFrozen(), "bf16-mixed")
    for name in whole[0]:
        assert micro[0][name].dtype == torch.float32  # the parameters' gradients stay fp32
        torch.testing.assert_close(micro[0][name], whole[0][name], atol=2e-3, rtol=5e-2, msg=name)


def test_settings_that_would_train_something_else_are_refused():
    with pytest.raises(ConfigError, match="trainer.accumulate_grad_batches=4 with a contrastive loss"):
        raise contrastive_accumulation_refused({"accumulate_grad_batches": 4}, needs_text=True)
    assert contrastive_accumulation_refused({"accumulate_grad_batches": 4}, needs_text=False) is None
    with pytest.raises(ConfigError, match="compute.accumulate=4 runs on one device only"):
        Compute(4).check(32, {"devices": 2}, "32-true")
    with pytest.raises(ConfigError, match="larger than data.batch_size=8"):
        Compute(16).check(8, {"devices": 1}, "32-true")
    with pytest.raises(ConfigError, match="16-mixed"):
        Compute(2).check(8, {"devices": 1}, "16-mixed")
    with pytest.raises(ConfigError, match=r"compute.attention='flash': choose one of auto, sdpa, eager"):
        Compute(attention="flash")
    with pytest.raises(ConfigError, match="compute.accumulate=0 must be an integer"):
        Compute(0)
    Compute(2).check(8, {"devices": 1, "accumulate_grad_batches": 1}, "bf16-mixed")


def test_the_second_pass_runs_only_what_trains(tiny_model):
    apply_freeze(tiny_model, LastN(vision_blocks=1, text_blocks=0))
    calls = {"vision": 0, "text": 0}
    for tower in calls:
        for block in tiny_model.blocks(tower):
            block.register_forward_hook(lambda *args, tower=tower: calls.__setitem__(tower, calls[tower] + 1))
    contrastive_step(Forward(tiny_model), objective(), batch(16), 2, torch.device("cpu"))
    # first pass: 3 vision and 2 text blocks for each of 2 micro-batches; second: the top vision block only
    assert calls == {"vision": 3 * 2 + 1 * 2, "text": 2 * 2}
