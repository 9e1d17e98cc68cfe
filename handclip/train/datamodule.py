"""The data module: validates the `data:` settings, prepares the dataset, serves the loaders.

Built from `conf/data/*.yaml` by its `_target_`; the constructor only checks settings (no I/O),
so a bad value is refused before anything heavy. Then, in order:

    datamodule.prepare(image_size)   # synthetic data on first use, the split manifest, the image cache
    datamodule.attach(backbone)      # datasets with the backbone's preprocessing values and tokenizer
    trainer.fit(module, datamodule)  # loaders
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from handclip.checks import integer
from handclip.data.activations import DTYPES
from handclip.data.captions import Captioner
from handclip.data.dataset import CaptionCollator, ManifestImages
from handclip.data.images import BAD_IMAGE_POLICIES
from handclip.data.prepare import PrepareSettings, prepare, read_manifest
from handclip.data.sampling import EpochSeededSampler, IdentityBalancedBatchSampler, balanced_sampler_for
from handclip.data.transforms import check_augment, eval_transform, train_transform
from handclip.errors import ConfigError
from handclip.eval.protocol import images_needed

SAMPLERS = ("random", "identity_balanced")


def loader_workers(value: int | str) -> int:
    """data.num_workers; `auto`: every CPU core but one for the main process, at most 16."""
    if value == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(0, min(cores - 1, 16))
    if isinstance(value, str):
        raise ConfigError(f"data.num_workers={value!r} must be auto or an integer from 0 to 256")
    return _integer("num_workers", value, 0, 256)


def _integer(key: str, value: Any, low: int, high: int = 1_000_000) -> int:
    return integer(f"data.{key}", value, low, high)


def _check_synthetic(synthetic: Mapping[str, Any]) -> dict:
    synthetic = dict(synthetic)
    unknown = sorted(set(synthetic) - {"identities", "seed", "image_size"})
    if unknown:
        raise ConfigError(f"data.synthetic.{unknown[0]} is not a setting; settings are identities, seed, image_size")
    identities = synthetic.get("identities")
    if isinstance(identities, bool) or not isinstance(identities, int) or not 4 <= identities <= 1000:
        raise ConfigError(f"data.synthetic.identities={identities!r} must be an integer from 4 to 1000")
    if isinstance(synthetic.get("seed"), bool) or not isinstance(synthetic.get("seed"), int):
        raise ConfigError(f"data.synthetic.seed={synthetic.get('seed')!r} must be an integer")
    size = synthetic.get("image_size")
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(isinstance(v, int) and v >= 32 for v in size):
        raise ConfigError(f"data.synthetic.image_size={size!r} must be [width, height], each at least 32 pixels")
    return synthetic


class HandDataModule(L.LightningDataModule):
    """Training pairs (image, caption, identity) and the validation images, from a split manifest."""

    def __init__(
        self, *, name: str, format: str, root: str, aspect: str, seed: int, run_seed: int, runs: int,
        no_accessories: bool,
        cache_size: int | str, on_bad_image: str, batch_size: int, sampler: str, identities_per_batch: int,
        images_per_identity: int, num_workers: int, captions: Sequence[str], augment: Mapping[str, Any] | None,
        synthetic: Mapping[str, Any] | None, csv: str, activation_cache: bool, cached_views: int,
        activation_dtype: str,
    ):  # fmt: skip
        super().__init__()
        self.name = name
        batch_size = _integer("batch_size", batch_size, 1)
        if batch_size < 2:
            raise ConfigError(
                f"data.batch_size={batch_size} is too small: a contrastive loss needs at least 2 pairs per batch"
            )
        if sampler not in SAMPLERS:
            raise ConfigError(f"data.sampler={sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if sampler == "identity_balanced":
            p = _integer("identities_per_batch", identities_per_batch, 2)
            k = _integer("images_per_identity", images_per_identity, 1)
            if p * k != batch_size:
                raise ConfigError(
                    f"data.batch_size={batch_size} must equal data.identities_per_batch x data.images_per_identity "
                    f"= {p} x {k} = {p * k} with data.sampler=identity_balanced"
                )
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"data.on_bad_image={on_bad_image!r}: choose one of {', '.join(BAD_IMAGE_POLICIES)}")
        self.num_workers = loader_workers(num_workers)
        if not isinstance(activation_cache, bool):
            raise ConfigError(f"data.activation_cache={activation_cache!r} must be true or false")
        if activation_dtype not in DTYPES:
            raise ConfigError(f"data.activation_dtype={activation_dtype!r}: choose one of {', '.join(DTYPES)}")
        self.activation_cache, self.activation_dtype = activation_cache, activation_dtype
        self.cached_views = _integer("cached_views", cached_views, 1, 1000)
        self.captioner = Captioner(captions)
        self.augment = check_augment(augment)
        self.batch_size, self.sampler = batch_size, sampler
        self.identities_per_batch, self.images_per_identity = identities_per_batch, images_per_identity
        if isinstance(run_seed, bool) or not isinstance(run_seed, int):
            raise ConfigError(f"data.run_seed={run_seed!r} must be an integer (it follows the run's seed)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"data.seed={seed!r} must be an integer (it seeds the split)")
        self.seed = run_seed  # batch order, augmentation, captions; `seed` seeds the split
        self.synthetic = _check_synthetic(synthetic) if synthetic else None
        if cache_size in (None, False):
            cache_size = 0
        if cache_size != "auto":
            _integer("cache_size", cache_size, 0, 100_000)
        self._cache_size = cache_size
        self.prepare_settings = PrepareSettings(
            root=str(root), format=str(format), csv=str(csv), aspect=str(aspect), seed=seed,
            runs=_integer("runs", runs, 1, 100), no_accessories=bool(no_accessories), cache_size=0,
            on_bad_image=on_bad_image,
        ).check()  # fmt: skip
        self.rows: list[dict] = []
        self.manifest: Path | None = None

    def check_root(self) -> None:
        """The dataset folder exists (or will be generated)."""
        if not self.root.exists() and not self.synthetic:
            raise ConfigError(
                f"data.root={self.root} does not exist. Put the dataset there (see data/README.md), "
                "point data.root at it, or try the demo on synthetic hands: python train.py experiment=demo"
            )

    @property
    def root(self) -> Path:
        return Path(self.prepare_settings.root)

    def cache_size_for(self, image_size: int) -> int:
        """The resized cache's shortest edge; `auto` is a little above the model's input for crops."""
        return int(round(image_size * 1.15)) if self._cache_size == "auto" else int(self._cache_size)

    # before weights ---------------------------------------------------------------------------
    def ensure_synthetic(self) -> None:
        """The synthetic dataset at `root`, made with `data.synthetic`'s settings (generated on first use)."""
        if self.synthetic:
            from handclip.data.synthetic import ensure_synthetic

            ensure_synthetic(self.root, **self.synthetic)

    def prepare(self, image_size: int) -> list[dict]:
        """Synthetic data if asked, the manifest and the image cache; the rows. Checks the sampler can be filled."""
        from dataclasses import replace

        self.ensure_synthetic()
        self.prepare_settings = replace(self.prepare_settings, cache_size=self.cache_size_for(image_size))
        self.manifest = prepare(self.prepare_settings)
        self.rows = read_manifest(self.manifest)
        self.train_rows = [r for r in self.rows if r["split"] == "train"]
        self.val_rows = [r for r in self.rows if r["split"] in ("train", "val")]
        self.captioner.check_rows(self.rows)  # every row, before training: a bad one fails now, not mid-epoch
        if self.sampler == "identity_balanced":
            self.balanced_sampler()  # fails now, with the key, if it cannot be filled
        if len(self.train_rows) < self.batch_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_rows)} training images: "
                "lower it so at least one full batch exists"
            )
        return self.rows

    @property
    def num_identities(self) -> int:
        """Identities in the training split (what identity heads are sized by)."""
        return len(self.identity_keys)

    @property
    def identity_keys(self) -> list[str]:
        """The training split's identities in the order heads number them (0 .. n-1: sorted)."""
        return [str(k) for k in sorted({r["identity"] for r in self.train_rows})]

    # with the backbone ------------------------------------------------------------------------
    def attach(self, backbone, eval_batch_size: int) -> None:
        """Build the datasets with the backbone's preprocessing values and tokenizer."""
        size, resize = backbone.image_size, backbone.resize_size
        mean, std = backbone.image_mean, backbone.image_std
        cache = self.prepare_settings.cache_size
        self.collate = CaptionCollator(backbone.text_tokenizer)  # not the model: workers get a copy
        self.eval_batch_size = eval_batch_size
        self.train_set = ManifestImages(
            self.train_rows, self.root, train_transform(size, resize, mean, std, self.augment), cache,
            self.captioner, seed=self.seed,
        )  # fmt: skip
        self.val_set = ManifestImages(
            images_needed(self.val_rows, include_test=False), self.root, eval_transform(size, resize, mean, std), cache
        )

    def _workers(self) -> dict:
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}

    def balanced_sampler(self) -> IdentityBalancedBatchSampler:
        return balanced_sampler_for(self.rows, self.identities_per_batch, self.images_per_identity, self.seed)

    def train_dataloader(self) -> DataLoader:
        common = {"collate_fn": self.collate, "pin_memory": torch.cuda.is_available(), **self._workers()}
        if self.sampler == "identity_balanced":
            return DataLoader(self.train_set, batch_sampler=self.balanced_sampler(), **common)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=EpochSeededSampler(len(self.train_set), self.seed),
            drop_last=True, **common,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False, **self._workers())
