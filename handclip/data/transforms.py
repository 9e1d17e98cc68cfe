"""Image transforms built from the backbone's own processor values (size, mean, std).

Training augmentation never flips horizontally: on aspect-specific hand data a flip turns a
right hand into a left one, i.e. into another class of the protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from handclip.checks import number
from handclip.errors import ConfigError

AUGMENT_KEYS = ("crop_scale", "rotation", "color_jitter")


def check_augment(augment: Mapping[str, Any] | None) -> dict:
    augment = dict(augment or {})
    if augment.get("hflip") or augment.get("horizontal_flip"):
        raise ConfigError(
            "data.augment.hflip is not allowed: a horizontal flip turns a right hand into a left "
            "one. Use flip test-time augmentation (eval.flip_tta=true) instead, which flips "
            "query and gallery alike"
        )
    unknown = set(augment) - set(AUGMENT_KEYS)
    if unknown:
        raise ConfigError(f"data.augment.{sorted(unknown)[0]} is unknown; settings are {', '.join(AUGMENT_KEYS)}")
    scale = augment.setdefault("crop_scale", [1.0, 1.0])  # no crop unless asked
    numbers = isinstance(scale, (list, tuple)) and all(_is_number(v) for v in scale)
    if not numbers or len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"data.augment.crop_scale={scale!r} must be [low, high] with 0 < low <= high <= 1")
    for key, high in (("rotation", 180), ("color_jitter", 1)):
        number(f"data.augment.{key}", augment.get(key, 0), 0, high)
    return augment


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def eval_transform(image_size: int, resize_size: int, mean, std):
    """Resize shortest edge, centre crop, normalise: what CLIP's processor does."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose([
        v2.ToImage(),
        v2.Resize(resize_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])  # fmt: skip


def augments(augment: Mapping[str, Any] | None) -> bool:
    """Whether the settings change an image at random (crop_scale [1, 1], no rotation, no jitter: they do not)."""
    augment = check_augment(augment)
    return list(augment["crop_scale"]) != [1, 1] or bool(augment.get("rotation")) or bool(augment.get("color_jitter"))


def train_transform(image_size: int, resize_size: int, mean, std, augment: Mapping[str, Any] | None = None):
    """Random crop of the resized image, small rotation and colour jitter; no flips. Without
    augmentation (see `augments`), the evaluation transform: the same image every epoch."""
    import torch
    from torchvision.transforms import v2

    augment = check_augment(augment)
    if not augments(augment):
        return eval_transform(image_size, resize_size, mean, std)
    low, high = augment["crop_scale"]
    steps = [v2.ToImage(), v2.Resize(resize_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    if augment.get("rotation"):
        steps.append(v2.RandomRotation(float(augment["rotation"]), fill=255))
    steps.append(v2.RandomResizedCrop(image_size, scale=(low, high), ratio=(0.9, 1.1), antialias=True))
    if augment.get("color_jitter"):
        jitter = float(augment["color_jitter"])
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter / 2))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(steps)
