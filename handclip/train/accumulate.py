"""Contrastive batches larger than memory: one batch's loss over all its negatives, in micro-batches.

A contrastive loss couples every pair of a batch, so ordinary gradient accumulation (a loss per
micro-batch, gradients summed) is a different objective: each micro-batch only sees its own
negatives. Here the batch is split into `chunks` micro-batches and the gradient of the *whole*
batch's loss is computed in three passes (the cached-gradient formulation of GradCache, as in
open_clip's `--accum-freq`):

1. every micro-batch is encoded without a graph, and the features are concatenated;
2. the loss over the whole batch is computed on those features as leaves and back-propagated:
   the objective's own parameters (logit_scale, a SigLIP bias, identity heads) get their full
   gradient, and each feature row gets d loss / d feature;
3. each micro-batch is encoded again with a graph and back-propagated with its rows of that
   feature gradient, so only one micro-batch's activations are alive at a time.

By the chain rule the parameter gradients equal those of one big batch (to float rounding),
for twice the forward work of the encoders. Dropout draws the same numbers in passes 1 and 3
(the random state is replayed per micro-batch). The last micro-batch is not back-propagated
here: its `(features * gradient).sum()`, shifted to the loss's value, is returned for the
caller's own backward (Lightning's, with its precision plugin and gradient clipping).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager

import torch

from handclip.losses import LossInputs
from handclip.model.forward import Forward, frozen_prefix, trains_now

Features = Mapping[str, torch.Tensor | None]


def split_batch(batch: Mapping, chunks: int, size: int) -> list[dict]:
    """`chunks` micro-batches (sizes differ by at most one) of every tensor whose first dimension is `size`."""
    chunks = max(1, min(chunks, size))
    parts: list[dict] = [{} for _ in range(chunks)]
    for key, value in batch.items():
        split = isinstance(value, torch.Tensor) and value.ndim > 0 and len(value) == size
        pieces = value.tensor_split(chunks) if split else [value] * chunks
        for part, piece in zip(parts, pieces, strict=True):
            part[key] = piece
    return parts


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextmanager
def _replayed(state: tuple, device: torch.device):
    """Run with the random state `state` (as at the micro-batch's first pass), then restore the current one."""
    now = _rng_state(device)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
    try:
        yield
    finally:
        torch.set_rng_state(now[0])
        if now[1] is not None:
            torch.cuda.set_rng_state(now[1], device)


def accumulated_backward(
    encode: Callable[[dict, bool], Features],
    loss_of: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    chunks: list[dict],
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(loss, its parts, a surrogate whose backward completes the gradient) for one batch in `chunks`.

    `encode(chunk, again)` returns named features of one micro-batch (e.g. `image`, `text`); with
    `again=True` it may leave out (None) features that no trainable parameter produces. `loss_of`
    takes the whole batch's features and returns (loss, parts). Gradients are accumulated into
    `.grad`; the caller must not zero them between this call and the surrogate's backward.
    """
    states, features = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state(device))
            features.append(encode(chunk, False))
    names = [name for name, value in features[0].items() if value is not None]
    sizes = [len(f[names[0]]) for f in features]
    rows = [sum(sizes[:number]) for number in range(len(sizes) + 1)]
    whole = {name: torch.cat([f[name] for f in features]).requires_grad_() for name in names}
    del features
    loss, parts = loss_of(whole)
    if loss.requires_grad:
        loss.backward()
    surrogate = None
    for number, chunk in enumerate(chunks):
        with _replayed(states[number], device):
            again = encode(chunk, True)
        pairs = [
            (again[name], whole[name].grad[rows[number] : rows[number + 1]])
            for name in names
            if again.get(name) is not None and again[name].requires_grad and whole[name].grad is not None
        ]  # fmt: skip
        if number < len(chunks) - 1:
            if pairs:
                torch.autograd.backward([f for f, _ in pairs], [g.to(f.dtype) for f, g in pairs])
        else:
            surrogate = sum(((f * g.to(f.dtype)).sum() for f, g in pairs), torch.zeros((), device=device))
    if not surrogate.requires_grad:  # nothing below the features trains: a backward that adds nothing
        surrogate = torch.zeros((), device=device, requires_grad=True)
    loss = loss.detach()
    # the loss's value with the surrogate's gradient, so whoever reads the step's output sees the loss
    surrogate = surrogate - surrogate.detach() + loss
    return loss, {name: value.detach() for name, value in parts.items()}, surrogate


def contrastive_step(forward: Forward, objective, batch: Mapping, accumulate: int, device: torch.device):
    """(loss, parts, what to back-propagate) of one training batch, in `accumulate` micro-batches.

    With `accumulate=1` the plain forward: back-propagating the loss. Otherwise the gradient is
    partly accumulated here and the returned surrogate's backward completes it (see above). The
    batch goes through `forward` (`handclip.model.forward`) like every other: from pixels or stored
    activations, captions through the text tower or a frozen tower's cache. The first pass runs each
    tower's frozen groups once (`Forward.ahead`); the second starts above them and skips a tower in
    which nothing trains.
    """
    backbone = forward.backbone
    needs_text, needs_pre = objective.needs_text, objective.needs_pre_projection

    def loss_of(features: Mapping) -> tuple[torch.Tensor, dict]:
        inputs = LossInputs(
            features["image"], features.get("text"), backbone.logit_scale, batch["identities"],
            image_pre_projection=features.get("pre_projection"), labels=batch.get("labels"), index=batch.get("index"),
            logit_bias=backbone.logit_bias,
        )  # fmt: skip
        return objective(inputs)

    if accumulate == 1:
        loss, parts = loss_of(forward.features(batch, needs_text, needs_pre))
        return loss, parts, loss
    vision_trains, text_trains = trains_now(backbone, "vision"), needs_text and trains_now(backbone, "text")
    image_cut = frozen_prefix(backbone, tower="vision")
    text_cut = frozen_prefix(backbone, tower="text") if needs_text else 0

    def encode(chunk: dict, again: bool) -> dict:
        if not again:  # the frozen groups once, kept in the chunk for the second pass
            ahead = forward.ahead(chunk, image_cut, text_cut)
            chunk.clear()
            chunk.update(ahead)
        features: dict = {"image": None, "pre_projection": None, "text": None}
        if not again or vision_trains:
            features["pre_projection"], features["image"] = forward.image(chunk, needs_pre)
        if needs_text and (not again or text_trains):
            features["text"] = forward.text(chunk)
        return features

    size = len(batch["identities"])
    return accumulated_backward(encode, loss_of, split_batch(batch, accumulate, size), device)
