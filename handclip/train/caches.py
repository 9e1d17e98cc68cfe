"""Compute once what stays frozen for the whole run (see `handclip.model.caching`, `handclip.data.activations`).

`attach_caches` is called by the run after the freeze policy is applied and any `init_from`
weights are loaded, before the baseline: it fills (or opens) the activation stores and points
the data module's datasets, the evaluator and the module at them. With `data.activation_cache`
false, or when nothing stays frozen, it changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from handclip.data.activations import ActivationStore, CachedImages, CachedTrainingViews, images_digest, store_dir
from handclip.data.dataset import ManifestImages
from handclip.data.transforms import augments, eval_transform
from handclip.eval.protocol import images_needed
from handclip.io import load_checkpoint_file
from handclip.model.caching import TextCache, frozen_prefix, prefix_digest, text_frozen


def _prefix(backbone, dataset, groups: int, flip_view: int | None = None, seeded: bool = False):
    """compute(view, indices) for a store: hidden states of those images after `groups` image groups."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @torch.no_grad()
    def compute(view: int, indices: Sequence[int]) -> torch.Tensor:
        pixels = torch.stack([dataset[(view, i) if seeded else i]["pixel_values"] for i in indices]).to(device)
        if view == flip_view:
            pixels = pixels.flip(-1)
        return backbone.image_prefix(pixels, groups)

    return compute, device


def _fill(store: ActivationStore, backbone, compute, device, batch_size: int, desc: str) -> ActivationStore:
    if store.exists():
        return store.ensure(compute, batch_size, desc)
    place, was_training = next(backbone.parameters()).device, backbone.training
    backbone.to(device).eval()
    try:
        return store.ensure(compute, batch_size, desc)
    finally:
        backbone.to(place).train(was_training)


def restore_frozen_prefix(module, backbone, checkpoint: str, freeze, epochs: int) -> int:
    """On a resume, the weights of the image groups that never train, read from the checkpoint.

    They are the weights the run started from, which are not the backbone's own where the run began
    with `init_from` (a resume drops it); the stored activations are computed from, and keyed by,
    them. Lightning restores the whole checkpoint later. Returns the number of tensors copied.
    """
    groups = backbone.layer_groups("vision")[: frozen_prefix(backbone, freeze, epochs)]
    if not groups:
        return 0
    state = load_checkpoint_file(checkpoint)["state_dict"]
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    copied = 0
    with torch.no_grad():
        for group in groups:
            for parameter in group.parameters.values():
                saved = state.get(names.get(id(parameter)))
                if saved is not None and saved.shape == parameter.shape:
                    parameter.copy_(saved)
                    copied += 1
    return copied


def attach_caches(datamodule, evaluate, module, backbone, freeze, epochs: int, console=None) -> dict:
    """Point training, validation and evaluation at stored activations; a summary of what is cached."""
    say = console.print if console is not None else print
    if not datamodule.activation_cache:
        return {"prefix_groups": 0, "text": False}
    summary = {"prefix_groups": 0, "text": text_frozen(backbone, freeze, epochs)}
    if summary["text"]:
        module.forward_path.text_cache = evaluate.text_cache = TextCache()
    groups = frozen_prefix(backbone, freeze, epochs)
    if groups == 0:
        say("activation cache: off (the image embeddings train)" + ("; text cached" if summary["text"] else ""))
        return summary
    train = datamodule.train_set
    common = {
        "backbone": f"{type(backbone).__name__}:{backbone.source}", "weights": prefix_digest(backbone, groups),
        "groups": groups, "image_size": backbone.image_size, "resize_size": backbone.resize_size,
        "mean": list(backbone.image_mean), "std": list(backbone.image_std), "source": str(train.image_root),
        "data": datamodule.content_digest,  # the images' sizes and times: a replaced image never reads stale values
    }  # fmt: skip
    augmenting = augments(datamodule.augment)
    batch, directory, dtype = datamodule.eval_batch_size, store_dir(datamodule.derived), datamodule.activation_dtype
    views = datamodule.cached_views if augmenting else 1
    key = {**common, "images": images_digest([r["image"] for r in train.rows]), "transform": repr(train.transform),
           "seed": datamodule.seed if augmenting else None}  # fmt: skip
    compute, device = _prefix(backbone, train, groups, seeded=True)
    train_store = _fill(ActivationStore(directory, key, views, len(train), dtype), backbone, compute, device,
                        batch, f"caching {groups} frozen image groups, {views} view(s)")  # fmt: skip
    datamodule.train_set = CachedTrainingViews(train, train_store)

    # evaluation: every image the protocol or validation reads, eval transform (view 1: mirrored, for flip_tta)
    rows = images_needed(datamodule.rows, include_test=True)
    names = {r["image"] for r in rows}
    rows += [r for r in datamodule.val_set.rows if r["image"] not in names]
    transform = eval_transform(backbone.image_size, backbone.resize_size, backbone.image_mean, backbone.image_std)
    images = ManifestImages(rows, datamodule.root, transform, datamodule.prepare_settings.image_cache)
    flip = evaluate.settings.flip_tta
    key = {**common, "images": images_digest([r["image"] for r in rows]), "transform": repr(transform)}
    compute, device = _prefix(backbone, images, groups, flip_view=1 if flip else None)
    eval_store = _fill(ActivationStore(directory, key, 2 if flip else 1, len(rows), dtype), backbone, compute,
                       device, batch, "caching evaluation images")  # fmt: skip
    position = {r["image"]: i for i, r in enumerate(rows)}
    datamodule.val_set = CachedImages(eval_store, [position[r["image"]] for r in datamodule.val_set.rows])
    evaluate.activations = (eval_store, position, groups)
    module.forward_path.prefix = groups
    summary.update(prefix_groups=groups, train_store=str(train_store.path), eval_store=str(eval_store.path),
                   filled=train_store.filled_now or eval_store.filled_now)  # fmt: skip
    state = "filled" if summary["filled"] else "reused"
    say(f"activation cache: first {groups} image groups frozen for the run, {state} ({views} training view(s), "
        f"{dtype}) in {directory}" + ("; text cached" if summary["text"] else ""))  # fmt: skip
    return summary
