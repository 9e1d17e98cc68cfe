"""Computing frozen parts once: the frozen image prefix stored on disk, a frozen text tower's captions."""

import json

import pytest
import torch

from handclip.eval.evaluator import EvalSettings, Evaluator
from handclip.model import BiasOnly, Full, LastN, Pattern, TextFrozen, apply_freeze, load_backbone
from handclip.model.caching import TextCache, frozen_prefix, text_frozen
from handclip.model.forward import Forward
from handclip.model.schedule import Gradual
from handclip.train.caches import attach_caches
from tests.conftest import TINY
from tests.test_module import datamodule_for, fine_tuner, trainer
from tests.test_train import train

NO_AUGMENT = {"crop_scale": [1.0, 1.0]}
SETTINGS = EvalSettings(baseline=False, test=True, flip_tta=False, text=False, batch_size=16)


def cached_run(root, backbone, policy, **data):
    """A prepared data module, evaluator and module with caches attached under `policy`."""
    apply_freeze(backbone, policy)
    datamodule = datamodule_for(root, backbone, activation_cache=True, **{"augment": NO_AUGMENT, **data})
    evaluate = Evaluator(datamodule.rows, datamodule.root, datamodule.prepare_settings.image_cache, SETTINGS)
    module = fine_tuner(backbone, datamodule)
    uncached = datamodule.train_set
    summary = attach_caches(datamodule, evaluate, module, backbone, policy, epochs=2)
    return datamodule, evaluate, module, uncached, summary


@pytest.mark.parametrize(("dtype", "tolerance"), [("float16", 1e-3), ("float32", 1e-5)])
def test_suffix_from_stored_activations_equals_the_full_forward(tmp_path, synthetic_hands, dtype, tolerance):
    backbone = load_backbone(TINY, tmp_path / "cache")
    datamodule, evaluate, module, uncached, summary = cached_run(
        synthetic_hands, backbone, LastN(vision_blocks=1, text_blocks=0), activation_dtype=dtype
    )
    assert summary["prefix_groups"] == backbone.facts.depth("vision")  # embeddings + every block but the top one
    items = [datamodule.train_set[(epoch, i)] for epoch, i in [(0, 0), (1, 3), (5, 7)]]
    batch = datamodule.collate(items)
    assert "pixel_values" not in batch and batch["hidden"].dtype == torch.float32
    pixels = torch.stack([uncached[(e, i)]["pixel_values"] for e, i in [(0, 0), (1, 3), (5, 7)]])
    with torch.no_grad():
        full = backbone.encode_image(pixels)
        cached = module.image_features(batch)[1]
    assert (cached - full).abs().max() < tolerance
    assert [item["caption"] for item in items] == [uncached[(e, i)]["caption"] for e, i in [(0, 0), (1, 3), (5, 7)]]
    # the evaluation reads the same store: features equal those from pixels
    from_store = evaluate(backbone)["_features"]
    evaluate.activations = None
    from_pixels = evaluate(backbone)["_features"]
    assert (from_store - from_pixels).abs().max() < tolerance


@pytest.mark.parametrize("feature", ["pre_projection", "concat", "bnneck"])
def test_every_evaluation_feature_reads_the_store(tmp_path, synthetic_hands, feature):
    from handclip.eval.feature import ImageEncoder
    from handclip.losses import IdentityLoss, Objective

    backbone = load_backbone(TINY, tmp_path / "cache")
    with torch.no_grad():
        pre, projected = backbone.encode_image(torch.zeros(1, 3, backbone.image_size, backbone.image_size),
                                               pre_projection=True)  # fmt: skip
    objective = Objective({"identity": IdentityLoss(5, projected.shape[1], pre.shape[1], feature="both")})
    for neck in objective.neck().necks.values():  # running statistics that a wrong path would show
        neck.norm.running_mean.normal_()
        neck.norm.running_var.uniform_(0.5, 2.0)
    encode = ImageEncoder(feature, objective)
    policy = LastN(vision_blocks=1, text_blocks=0)
    apply_freeze(backbone, policy)
    datamodule = datamodule_for(synthetic_hands, backbone, activation_cache=True, augment=NO_AUGMENT,
                                activation_dtype="float32")  # fmt: skip
    settings = EvalSettings(baseline=False, test=True, flip_tta=True, text=False, batch_size=16)
    evaluate = Evaluator(datamodule.rows, datamodule.root, datamodule.prepare_settings.image_cache, settings,
                         encode=encode)  # fmt: skip
    module = fine_tuner(backbone, datamodule)
    module.encode, val_pixels = encode, datamodule.val_set
    summary = attach_caches(datamodule, evaluate, module, backbone, policy, epochs=2)
    assert summary["prefix_groups"] == backbone.facts.depth("vision")  # on for every feature, not just projected
    backbone.eval()
    with torch.no_grad():
        from_hidden = module.validation_feature({"hidden": torch.stack([datamodule.val_set[i]["hidden"]
                                                                        for i in range(4)])})  # fmt: skip
        from_pixels = encode(Forward(backbone), {"pixel_values": torch.stack([val_pixels[i]["pixel_values"]
                                                                             for i in range(4)])})  # fmt: skip
    assert from_hidden.shape == from_pixels.shape and (from_hidden - from_pixels).abs().max() < 1e-5
    from_store = evaluate(backbone)["metrics"]
    evaluate.activations = None
    from_pixels = evaluate(backbone)["metrics"]
    assert from_store["test/rank1"] == from_pixels["test/rank1"]
    assert abs(from_store["test/mAP"] - from_pixels["test/mAP"]) < 1e-6


def test_a_changed_setting_never_reads_a_stale_store(tmp_path, synthetic_hands):
    backbone = load_backbone(TINY, tmp_path / "cache")
    policy = LastN(vision_blocks=1, text_blocks=0)
    first = cached_run(synthetic_hands, backbone, policy)[4]
    again = cached_run(synthetic_hands, backbone, policy)[4]
    assert again["train_store"] == first["train_store"] and not again["filled"]  # reused, not recomputed

    def store_after(change) -> str:
        model = load_backbone(TINY, tmp_path / "cache")
        policy_now = change(model) or policy
        summary = cached_run(synthetic_hands, model, policy_now, **getattr(change, "data", {}))[4]
        assert summary["filled"]
        return summary["train_store"]

    def other_weights(model):
        with torch.no_grad():
            model.model.vision_model.encoder.layers[0].mlp.fc1.weight.add_(0.01)

    def other_depth(model):
        return LastN(vision_blocks=2, text_blocks=0)

    def other_transform(model):
        model.image_mean = [0.4, 0.5, 0.5]

    def other_augmentation(model):
        return None

    other_augmentation.data = {"augment": {"crop_scale": [0.8, 1.0]}, "cached_views": 2}
    paths = [store_after(c) for c in (other_weights, other_depth, other_transform, other_augmentation)]
    assert len(set(paths + [first["train_store"]])) == 5
    key = json.loads(open(paths[1].replace(".npy", ".json")).read())
    assert key["groups"] == first["prefix_groups"] - 1 and key["views"] == 1


def test_what_stays_frozen_sets_the_prefix(tiny_model):
    depth = tiny_model.facts.depth("vision")  # 3 blocks: embeddings + 3 blocks can be cached
    for policy, groups, text in [
        (Full(), 0, False), (TextFrozen(), 0, True), (LastN(vision_blocks=0, text_blocks=0), depth + 1, False),
        (LastN(vision_blocks=2, text_blocks=1), depth - 1, False), (BiasOnly(), 0, False),
        (Pattern(include=[r"^visual_projection\."]), depth + 1, True),
        (Pattern(include=[r"vision_model\.encoder\.layers\.1\.mlp"]), 2, True),
    ]:  # fmt: skip
        apply_freeze(tiny_model, policy)
        assert (frozen_prefix(tiny_model, policy), text_frozen(tiny_model, policy)) == (groups, text), policy
    # a schedule that unfreezes one more block per epoch: what trains by the last epoch limits the prefix
    schedule = Gradual(LastN(vision_blocks=0, text_blocks=0), every=1, blocks=1)
    apply_freeze(tiny_model, schedule)
    assert frozen_prefix(tiny_model, schedule, epochs=1) == depth + 1
    assert frozen_prefix(tiny_model, schedule, epochs=3) == depth - 1


def test_a_frozen_text_tower_encodes_each_distinct_caption_once(tmp_path, synthetic_hands):
    backbone = load_backbone(TINY, tmp_path / "cache")
    policy = Pattern(include=[r"vision_model\.encoder\.layers\.2\.", "visual_projection"])
    datamodule, _, module, _, summary = cached_run(synthetic_hands, backbone, policy)
    assert summary["text"] and isinstance(module.forward_path.text_cache, TextCache)
    trainer(2).fit(module, datamodule=datamodule)
    captions = {datamodule.captioner(r) for r in datamodule.train_rows}  # one template: one caption per person
    assert module.forward_path.text_cache.encoded == len(captions)
    tokens = backbone.tokenize(sorted(captions))
    with torch.no_grad():
        direct = backbone.encode_text(tokens["input_ids"], tokens["attention_mask"])
        cached = module.forward_path.text_cache(backbone, tokens["input_ids"], tokens["attention_mask"])
        assert torch.allclose(cached, direct, atol=1e-5)
    assert module.forward_path.text_cache.encoded == len(captions)


@pytest.mark.slow
def test_a_run_with_the_caches_ends_where_one_without_them_does(tmp_path):
    common = ["data.augment.crop_scale=[1.0,1.0]", "data.augment.rotation=0", "data.augment.color_jitter=0",
              "freeze.text_blocks=0", "eval.baseline=false", "trainer.max_epochs=3"]  # fmt: skip
    metrics = {}
    for cache in ("true", "false"):
        result = train(tmp_path / cache, *common, f"data.activation_cache={cache}")
        assert ("activation cache: first" in result.stdout) == (cache == "true")
        (run,) = (tmp_path / cache / "runs" / "demo").iterdir()
        metrics[cache] = json.loads((run / "metrics.json").read_text())["metrics"]
    assert metrics["true"]["cache/prefix_groups"] == 2 and metrics["false"]["cache/prefix_groups"] == 0
    for key in ("test/rank1", "test/mAP", "val/rank1"):
        assert abs(metrics["true"][key] - metrics["false"][key]) <= 0.005, key


def test_a_store_reaches_loader_workers_as_a_file_not_a_copy(tmp_path):
    import pickle

    import numpy as np

    from handclip.data.activations import ActivationStore

    store = ActivationStore(tmp_path, {"what": "test"}, views=2, count=5, dtype="float32")
    store.ensure(
        lambda view, indices: torch.full((len(indices), 3, 4), float(view)) + torch.tensor(indices)[:, None, None], 2
    )
    copy = pickle.loads(pickle.dumps(store))
    assert copy.array is None and len(pickle.dumps(store)) < 2000
    assert torch.equal(copy.batch(1, [0, 4]), torch.tensor([1.0, 5.0])[:, None, None].expand(2, 3, 4))
    assert isinstance(copy.array, np.memmap) and not list(tmp_path.glob(".*tmp*"))
    again = ActivationStore(tmp_path, {"what": "test"}, views=2, count=5, dtype="float32")
    again.ensure(lambda view, indices: 1 / 0, 2)  # already filled: nothing is computed
    assert not again.filled_now and torch.equal(again.hidden(0, 3), torch.full((3, 4), 3.0))


def test_contrastive_accumulation_reads_the_store_and_keeps_the_big_batch_gradients(tmp_path, synthetic_hands):
    import lightning as L

    from handclip.train.compute import Compute
    from tests.test_accumulate import _capture_gradients

    grads = {}
    for accumulate in (1, 4):
        backbone = load_backbone(TINY, tmp_path / "cache")
        policy = LastN(vision_blocks=1, text_blocks=1)
        datamodule, _, module, _, summary = cached_run(synthetic_hands, backbone, policy, batch_size=16,
                                                       activation_dtype="float32")  # fmt: skip
        module.compute = Compute(accumulate)
        assert summary["prefix_groups"] == backbone.facts.depth("vision")  # the cache stays on with accumulation
        batch = datamodule.collate([datamodule.train_set[(0, i)] for i in range(2)])
        assert "hidden" in batch and "pixel_values" not in batch
        captured: list = []
        L.Trainer(
            max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
            callbacks=[_capture_gradients(captured)],
        ).fit(module, datamodule=datamodule)  # fmt: skip
        grads[accumulate] = captured
    assert len(grads[1]) == len(grads[4]) == 2
    for whole, micro in zip(grads[1], grads[4], strict=True):
        assert set(whole) == set(micro) and any(name.startswith("backbone.model.text_model") for name in whole)
        for name in whole:
            torch.testing.assert_close(micro[name], whole[name], atol=1e-5, rtol=1e-4, msg=name)
