import functools
import math

import lightning as L
import pytest
import torch

from handclip.data.dataset import CaptionCollator, ManifestImages
from handclip.data.prepare import PrepareSettings, prepare, read_manifest
from handclip.data.sampling import EpochSeededSampler
from handclip.data.sources import Hands11k
from handclip.data.transforms import eval_transform, train_transform
from handclip.errors import DataError
from handclip.losses import LOGIT_SCALE_MAX, ContrastiveLoss, Objective
from handclip.model import Full, TextFrozen, apply_freeze, load_backbone
from handclip.train.datamodule import HandDataModule
from handclip.train.module import FineTuner
from handclip.train.optim import Optimization, warmup_cosine
from tests.conftest import TINY

DATA = {
    "name": "synthetic", "draw": 0, "run_seed": 0, "runs": 10, "cache_size": 40, "on_bad_image": "skip",
    "batch_size": 8, "sampler": "random", "identities_per_batch": 4, "images_per_identity": 2, "num_workers": 0,
    "captions": ["a photo of the {aspect} hand of person {person}"], "augment": {"crop_scale": [0.9, 1.0]},
    "activation_cache": False, "cached_views": 1, "activation_dtype": "float16",
}  # fmt: skip


def datamodule_for(root, backbone, **changes) -> HandDataModule:
    """A data module on `root`, prepared and attached to `backbone`."""
    datamodule = HandDataModule(**{**DATA, "source": Hands11k(root=str(root)), **changes})
    datamodule.prepare(backbone.image_size)
    datamodule.attach(backbone, eval_batch_size=16)
    return datamodule


def fine_tuner(backbone, datamodule, lr: float = 5e-3) -> FineTuner:
    optimization = Optimization(
        lr=lr, weight_decay=0.0, head_lr_multiplier=1.0, optimizer=functools.partial(torch.optim.AdamW),
        schedule=functools.partial(warmup_cosine, warmup=0),
    )  # fmt: skip
    return FineTuner(backbone, Objective({"clip": ContrastiveLoss()}), optimization, datamodule.val_rows)


def trainer(epochs: int, *callbacks) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        num_sanity_val_steps=0, callbacks=list(callbacks), limit_val_batches=0, enable_model_summary=False,
    )  # fmt: skip


def test_sampler_order_is_a_function_of_seed_and_epoch():
    sampler = EpochSeededSampler(10, seed=3)
    first = list(sampler)
    assert sorted(i for _, i in first) == list(range(10)) and all(e == 0 for e, _ in first)
    sampler.set_epoch(1)
    second = list(sampler)
    assert [i for _, i in second] != [i for _, i in first]
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.fixture
def prepared(synthetic_hands):
    settings = PrepareSettings(Hands11k(root=str(synthetic_hands)), cache_size=40)
    return settings.image_cache, read_manifest(prepare(settings, quiet=True))


def test_augmentation_is_seeded_per_sample_and_epoch(prepared):
    cache, rows = prepared
    train = [r for r in rows if r["split"] == "train"]
    transform = train_transform(32, 32, [0.5] * 3, [0.5] * 3, {"crop_scale": [0.5, 1.0], "rotation": 10})
    dataset = ManifestImages(train, "unread", transform, cache, captioner=lambda row, rng: row["person"], seed=1)
    assert torch.equal(dataset[(0, 3)]["pixel_values"], dataset[(0, 3)]["pixel_values"])
    assert not torch.equal(dataset[(0, 3)]["pixel_values"], dataset[(1, 3)]["pixel_values"])


def test_validation_images_are_read_once_when_they_fit_in_memory_and_give_the_same_tensors(prepared, tmp_path):
    import shutil

    cache, rows = prepared
    rows = [r for r in rows if r["split"] == "val"][:4]
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)  # the resized copies the images are read from
    transform = eval_transform(32, 32, [0.5] * 3, [0.5] * 3)
    plain = ManifestImages(rows, "unread", transform, copy)
    kept = ManifestImages(rows, "unread", transform, copy, memory_bytes=1 << 20)
    small = ManifestImages(rows, "unread", transform, copy, memory_bytes=3 * 32 * 32 * 4 * 3)  # 3 of the 4 would fit
    first = [kept[i]["pixel_values"] for i in range(4)]
    assert all(torch.equal(a, plain[i]["pixel_values"]) for i, a in enumerate(first))
    [small[i] for i in range(4)]
    shutil.rmtree(copy)  # the images are gone: the kept tensors are served, nothing else is
    assert all(torch.equal(kept[i]["pixel_values"], first[i]) for i in range(4))
    assert kept[2]["identity"] == plain.identity_index[rows[2]["identity"]]
    with pytest.raises(DataError, match="cannot read"):
        small[0]


def test_training_steps_lower_the_loss_and_keep_logit_scale_clamped(synthetic_hands, tmp_path):
    backbone = load_backbone(TINY, tmp_path)
    apply_freeze(backbone, Full())
    with torch.no_grad():
        backbone.logit_scale.fill_(LOGIT_SCALE_MAX - 0.01)  # a large lr pushes it past the clamp
    datamodule = datamodule_for(synthetic_hands, backbone)
    module = fine_tuner(backbone, datamodule)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            assert pl_module.backbone.logit_scale.item() <= LOGIT_SCALE_MAX + 1e-6

    trainer(6, Record()).fit(module, datamodule=datamodule)
    assert len(losses) >= 6
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert backbone.logit_scale.item() <= math.log(100) + 1e-6


def test_a_tower_unfrozen_mid_run_trains_from_that_point_on(synthetic_hands, tmp_path):
    backbone = load_backbone(TINY, tmp_path)
    apply_freeze(backbone, TextFrozen())
    datamodule = datamodule_for(synthetic_hands, backbone)
    module = fine_tuner(backbone, datamodule, lr=1e-3)
    text_weight = backbone.model.text_model.encoder.layers[0].mlp.fc1.weight
    snapshots = {}

    class UnfreezeText(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            snapshots[trainer.current_epoch] = text_weight.detach().clone()
            if trainer.current_epoch == 2:  # no optimiser rebuilt: it already holds the text tower
                apply_freeze(pl_module.backbone, Full())

    fit = trainer(4, UnfreezeText())
    fit.fit(module, datamodule=datamodule)
    assert torch.equal(snapshots[0], snapshots[1]) and torch.equal(snapshots[1], snapshots[2])
    assert not torch.equal(snapshots[2], snapshots[3])
    assert not torch.equal(snapshots[3], text_weight.detach())
    held = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert id(text_weight) in held


def test_collator_pads_and_keeps_identities(tmp_path):
    backbone = load_backbone(TINY, tmp_path)
    items = [
        {"pixel_values": torch.zeros(3, 4, 4), "identity": i, "index": i, "caption": c}
        for i, c in enumerate(["a hand", "the dorsal right hand of person 0000012"])
    ]
    batch = CaptionCollator(backbone.tokenize)(items)
    assert batch["input_ids"].shape[0] == 2 and batch["identities"].tolist() == [0, 1]
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()


def test_identity_heads_are_in_the_optimiser_at_the_head_lr_and_change_after_a_step(synthetic_hands, tmp_path):
    from handclip.losses import IdentityLoss, TripletLoss

    backbone = load_backbone(TINY, tmp_path)
    apply_freeze(backbone, TextFrozen())
    datamodule = datamodule_for(synthetic_hands, backbone, sampler="identity_balanced")
    objective = Objective(
        {"identity": IdentityLoss(datamodule.num_identities, backbone.projection_dim, backbone.facts.vision.width,
                                  feature="both"), "triplet": TripletLoss(feature="pre_projection")},
    )  # fmt: skip
    optimization = Optimization(
        lr=1e-4, weight_decay=0.0, head_lr_multiplier=10.0, optimizer=functools.partial(torch.optim.AdamW),
        schedule=None,
    )  # fmt: skip
    module = FineTuner(backbone, objective, optimization, datamodule.val_rows)
    classifier = objective.terms["identity"].necks["pre_projection"].classifier.weight
    assert classifier.shape == (datamodule.num_identities, backbone.facts.vision.width)
    before = {n: p.detach().clone() for n, p in objective.named_parameters()}
    fit = trainer(1)
    fit.fit(module, datamodule=datamodule)
    (optimizer,) = fit.optimizers
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in objective.named_parameters():
        assert lr_of[id(parameter)] == pytest.approx(1e-3), name  # 10 x the backbone's lr
        if parameter.requires_grad:
            assert not torch.equal(parameter, before[name]), f"{name} did not train"
    neck = objective.terms["identity"].necks["projected"].norm
    assert torch.all(neck.bias == 0) and neck.running_mean.abs().sum() > 0  # no shift learned; statistics kept
