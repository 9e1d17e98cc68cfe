import math

import lightning as L
import pytest
import torch

from handclip.data.dataset import CaptionCollator, ManifestImages
from handclip.data.prepare import PrepareSettings, prepare, read_manifest
from handclip.data.sampling import EpochSeededSampler
from handclip.data.transforms import train_transform
from handclip.losses import LOGIT_SCALE_MAX
from handclip.model.freeze import apply_freeze
from handclip.train.module import ClipFineTuner, HandDataModule, parameter_groups, warmup_steps


def test_no_weight_decay_on_biases_norms_embeddings_and_logit_scale(tiny_model):
    apply_freeze(tiny_model, {"name": "full"})
    groups = parameter_groups(tiny_model, weight_decay=0.2, lr=1e-4)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "logit_scale" in plain
    assert "vision_model.embeddings.patch_embedding.weight" in plain
    assert "text_model.embeddings.token_embedding.weight" in plain
    assert "vision_model.encoder.layers.0.layer_norm1.weight" in plain
    assert "vision_model.encoder.layers.0.mlp.fc1.bias" in plain
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in decayed
    assert "visual_projection.weight" in decayed
    assert decayed | plain == {n for n, _ in tiny_model.named_parameters()}


def test_frozen_parameters_are_not_in_the_optimiser_and_heads_get_their_own_lr(tiny_model):
    from handclip.model.projection import replace_projection

    heads = replace_projection(tiny_model, {"name": "replace", "dim": 8})
    apply_freeze(tiny_model, {"name": "frozen"}, always_trainable=tuple(heads))
    groups = parameter_groups(tiny_model, 0.1, 1e-4, heads, head_lr_multiplier=10)
    names = {n: g["lr"] for g in groups for n in g["names"]}
    assert names == {
        "logit_scale": 1e-4,
        "visual_projection.weight": pytest.approx(1e-3),
        "text_projection.weight": pytest.approx(1e-3),
    }


def test_warmup_as_share_or_steps():
    assert warmup_steps(0.1, 200) == 20 and warmup_steps(30, 200) == 30 and warmup_steps(0, 50) == 0


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
    path = prepare(PrepareSettings(root=str(synthetic_hands), cache_size=40), quiet=True)
    return synthetic_hands, read_manifest(path)


def test_augmentation_is_seeded_per_sample_and_epoch(prepared, tiny_model):
    root, rows = prepared
    train = [r for r in rows if r["split"] == "train"]
    transform = train_transform(32, 32, [0.5] * 3, [0.5] * 3, {"crop_scale": [0.5, 1.0], "rotation": 10})
    dataset = ManifestImages(train, root, transform, 40, captioner=lambda row, rng: row["person"], seed=1)
    assert torch.equal(dataset[(0, 3)]["pixel_values"], dataset[(0, 3)]["pixel_values"])
    assert not torch.equal(dataset[(0, 3)]["pixel_values"], dataset[(1, 3)]["pixel_values"])


def test_training_steps_lower_the_loss_and_keep_logit_scale_clamped(prepared, tmp_path):
    from handclip.backbone import load_backbone

    from tests.conftest import TINY

    root, rows = prepared
    backbone = load_backbone(TINY, tmp_path)
    apply_freeze(backbone.model, {"name": "full"})
    with torch.no_grad():
        backbone.model.logit_scale.fill_(LOGIT_SCALE_MAX - 0.01)  # a large lr pushes it past the clamp
    data = {
        "batch_size": 8,
        "num_workers": 0,
        "augment": {"crop_scale": [0.9, 1.0]},
        "captions": ["a photo of the {aspect} hand of person {person}"],
    }
    datamodule = HandDataModule(rows, root, backbone, data, 40, seed=0)
    module = ClipFineTuner(
        backbone.model, {"lr": 5e-3, "weight_decay": 0.0, "warmup": 0}, {"name": "clip"}, datamodule.val_rows
    )
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            assert pl_module.model.logit_scale.item() <= LOGIT_SCALE_MAX + 1e-6

    trainer = L.Trainer(
        max_epochs=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[Record()],
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    assert len(losses) >= 6
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert backbone.model.logit_scale.item() <= math.log(100) + 1e-6


def test_collator_pads_and_keeps_identities(tmp_path):
    from handclip.backbone import load_backbone

    from tests.conftest import TINY

    tokenizer = load_backbone(TINY, tmp_path).tokenizer
    items = [
        {"pixel_values": torch.zeros(3, 4, 4), "identity": i, "index": i, "caption": c}
        for i, c in enumerate(["a hand", "the dorsal right hand of person 0000012"])
    ]
    batch = CaptionCollator(tokenizer)(items)
    assert batch["input_ids"].shape[0] == 2 and batch["identities"].tolist() == [0, 1]
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
