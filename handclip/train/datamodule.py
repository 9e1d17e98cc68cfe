"""The data module: validates the `data:` settings, prepares the dataset, serves the loaders.

Built from `conf/data/*.yaml` by its `_target_`; the constructor only checks settings (no I/O),
so a bad value is refused before anything heavy. The dataset itself is `data.source`, a
`handclip.data.sources.DataSource` named by its own `_target_`; the flat loader, sampler and cache
settings are gathered into the small `Batches`, `Loading` and `Caches` objects. Then, in order:

    datamodule.prepare(image_size)   # synthetic data on first use, the split manifest, the image cache
    datamodule.attach(backbone)      # datasets with the backbone's preprocessing values and tokenizer
    trainer.fit(module, datamodule)  # loaders
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from handclip.checks import flag, integer, one_of
from handclip.data.activations import DTYPES
from handclip.data.captions import Captioner
from handclip.data.dataset import CaptionCollator, ManifestImages, PromptLabels, leave_signals_to_the_main_process
from handclip.data.images import BAD_IMAGE_POLICIES
from handclip.data.prepare import PrepareSettings, prepare, read_manifest
from handclip.data.sampling import (
    EpochSeededSampler,
    IdentityBalancedBatchSampler,
    balanced_sampler_for,
    identity_index,
)
from handclip.data.sources import DataSource
from handclip.data.transforms import check_augment, eval_transform, train_transform
from handclip.errors import ConfigError
from handclip.eval.protocol import images_needed

SAMPLERS = ("random", "identity_balanced")
# validation reads the same images every epoch: their tensors are kept in memory when all of them fit in this much
# (per loader process); read again otherwise. The same numbers either way
VALIDATION_MEMORY_BYTES = 1 << 30
# keys of the layout before data sources: where each went
MOVED = {
    "seed": "data.draw (it seeds the split and, for synthetic data, the people drawn)",
    "root": "data.source.root", "aspect": "data.source.aspect", "no_accessories": "data.source.no_accessories",
    "csv": "data.source.csv", "synthetic": "data.source (identities, image_size; data=synthetic)",
    "format": "data.source._target_ (data=hands11k, hd, captions, synthetic or imagefolder)",
}  # fmt: skip


def loader_workers(value: int | str) -> int:
    """data.num_workers; `auto`: every CPU core but one for the main process, at most 16."""
    if value == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(0, min(cores - 1, 16))
    if isinstance(value, str):
        raise ConfigError(f"data.num_workers={value!r} must be auto or an integer from 0 to 256")
    return integer("data.num_workers", value, 0, 256)


@dataclass
class Batches:
    """How training batches are drawn: `batch_size` pairs at random, or P identities x K images."""

    batch_size: int
    sampler: str
    identities_per_batch: int  # identity_balanced: P
    images_per_identity: int  # identity_balanced: K

    def __post_init__(self):
        integer("data.batch_size", self.batch_size, 1, 1_000_000)
        if self.batch_size < 2:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is too small: a contrastive loss needs at least 2 pairs per batch"
            )
        one_of("data.sampler", self.sampler, SAMPLERS)
        if self.sampler == "identity_balanced":
            p = integer("data.identities_per_batch", self.identities_per_batch, 2, 1_000_000)
            k = integer("data.images_per_identity", self.images_per_identity, 1, 1_000_000)
            if p * k != self.batch_size:
                raise ConfigError(
                    f"data.batch_size={self.batch_size} must equal data.identities_per_batch x "
                    f"data.images_per_identity = {p} x {k} = {p * k} with data.sampler=identity_balanced"
                )


@dataclass
class Loading:
    """How images reach the model: loader processes, the resized cache, what a bad image does."""

    num_workers: int | str  # auto: CPU cores - 1 (at most 16)
    cache_size: int | str  # shortest edge of the resized cache; auto: 1.15 x the model's input; 0: none
    on_bad_image: str
    # where what is derived from a dataset goes, one folder per dataset folder (None: $HANDCLIP_CACHE/data)
    cache_root: str | None = None

    def __post_init__(self):
        self.num_workers = loader_workers(self.num_workers)
        self.cache_size = 0 if self.cache_size in (None, False) else self.cache_size
        if self.cache_size != "auto":
            integer("data.cache_size", self.cache_size, 0, 100_000, hint=" (0: no cache, auto, or a size in pixels)")
        one_of("data.on_bad_image", self.on_bad_image, BAD_IMAGE_POLICIES)
        if self.cache_root is not None and (not isinstance(self.cache_root, (str, Path)) or not str(self.cache_root)):
            raise ConfigError(f"data.cache_root={self.cache_root!r} must be a folder (default: ${{paths.cache}}/data)")

    def cache_size_for(self, image_size: int) -> int:
        """The resized cache's shortest edge; `auto` is a little above the model's input for crops."""
        return int(round(image_size * 1.15)) if self.cache_size == "auto" else int(self.cache_size)


@dataclass
class Caches:
    """Stored activations of the frozen prefix of the image tower (handclip.data.activations)."""

    activation_cache: bool
    cached_views: int  # with augmentation: views per training image stored; each epoch draws one
    activation_dtype: str

    def __post_init__(self):
        flag("data.activation_cache", self.activation_cache)
        integer("data.cached_views", self.cached_views, 1, 1000)
        one_of("data.activation_dtype", self.activation_dtype, DTYPES)


SETTINGS = {group: [f.name for f in dataclasses.fields(group)] for group in (Batches, Loading, Caches)}
KNOWN = ["name", "source", "draw", "runs", "run_seed", "captions", "augment", *sum(SETTINGS.values(), [])]


def _check_keys(settings: Mapping[str, Any]) -> None:
    """Every flat data setting is one of the groups' (a key of the old layout says where it went)."""
    for key, value in settings.items():
        if key in MOVED and value is not None:  # `seed: null` stays in conf/ only to answer data.seed=N
            raise ConfigError(f"data.{key} was renamed: use {MOVED[key]}")
        if key not in KNOWN and key not in MOVED:
            near = difflib.get_close_matches(key, KNOWN, n=1)
            raise ConfigError(f"data.{key} is not a setting{f' (did you mean data.{near[0]}?)' if near else ''}; "
                              f"settings are {', '.join(KNOWN)}")  # fmt: skip
    required = [f.name for group in SETTINGS for f in dataclasses.fields(group) if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in settings]
    if missing:
        raise ConfigError(f"data.{missing[0]} is missing: conf/data/loader/default.yaml gives every data setting")


class HandDataModule(L.LightningDataModule):
    """Training pairs (image, caption, identity) and the validation images, from a split manifest.

    `source` reads and splits the dataset; `draw` seeds the split (and a synthetic source's people);
    `run_seed` the batch order, augmentation and caption choice. The other settings are those of
    `Batches`, `Loading` and `Caches`, plus the caption templates and the augmentation.
    """

    def __init__(
        self, *, name: str, source: DataSource, draw: int, runs: int, run_seed: int,
        captions: Sequence[str], augment: Mapping[str, Any] | None, **settings: Any,
    ):  # fmt: skip
        super().__init__()
        self.name = name
        _check_keys(settings)
        groups = (group(**{k: settings[k] for k in keys if k in settings}) for group, keys in SETTINGS.items())
        self.batches, self.loading, self.caches = groups
        self.captioner = Captioner(captions)
        self.augment = check_augment(augment)
        self.seed = integer("data.run_seed", run_seed, hint=" (it follows the run's seed)")  # batches, augmentation
        self.prepare_settings = PrepareSettings(source, draw, runs, on_bad_image=self.loading.on_bad_image,
                                                cache_root=self.loading.cache_root).check()  # fmt: skip
        self.source, self.draw = self.prepare_settings.source, self.prepare_settings.draw
        # what the run, the caches and the evaluator read
        self.batch_size, self.sampler = self.batches.batch_size, self.batches.sampler
        self.num_workers = self.loading.num_workers
        self.activation_cache, self.cached_views = self.caches.activation_cache, self.caches.cached_views
        self.activation_dtype = self.caches.activation_dtype
        self.rows: list[dict] = []
        self.manifest: Path | None = None
        # (loss terms that need identities, the evaluation feature): refused on data without identities
        self.expected: tuple[Sequence[str], str, Sequence[str]] | None = None

    @property
    def root(self) -> Path:
        """The folder of this draw's data (a synthetic source has one per draw and setting); only read."""
        return self.prepare_settings.folder

    @property
    def derived(self) -> Path:
        """The folder of what is derived from this draw's data (manifests, resized images, activations)."""
        return self.prepare_settings.derived

    def check_root(self) -> None:
        """The dataset folder exists (or will be generated)."""
        problem = self.source.missing(self.draw)
        if problem:
            raise ConfigError(problem)

    # before weights ---------------------------------------------------------------------------
    def prepare(self, image_size: int, training: bool = True) -> list[dict]:
        """Data of this draw (generated if the source makes it), the manifest and the image cache; the rows.
        Checks the sampler can be filled (`training`; an evaluation draws no training batches)."""
        self.source.make(self.draw)
        self.prepare_settings = dataclasses.replace(self.prepare_settings,
                                                    cache_size=self.loading.cache_size_for(image_size))  # fmt: skip
        self.manifest = prepare(self.prepare_settings)
        # the manifest's images as they are on disk now: a store of anything computed from them keys on it
        self.content_digest = json.loads(self.manifest.with_suffix(".json").read_text())["images_sha256"]
        self.rows = read_manifest(self.manifest)
        self.train_rows = [r for r in self.rows if r["split"] == "train"]
        self.val_rows = [r for r in self.rows if r["split"] in ("train", "val")]
        self.captioner.check_rows(self.rows)  # every row, before training: a bad one fails now, not mid-epoch
        if self.expected is not None:
            self.check_retrieval(*self.expected)
        if not training:
            return self.rows
        if self.sampler == "identity_balanced":
            self.balanced_sampler()  # fails now, with the key, if it cannot be filled
        if len(self.train_rows) < self.batch_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_rows)} training images: "
                "lower it so at least one full batch exists"
            )
        return self.rows

    @property
    def retrieval(self) -> bool:
        """Whether the data has no identities and follows the image-text retrieval protocol
        (`handclip.eval.protocol`)."""
        from handclip.eval.protocol import is_retrieval

        return is_retrieval(self.rows)

    @property
    def galleries(self) -> dict[str, str]:
        """What each evaluation's gallery is, in the data's words (the source's, or the retrieval protocol's)."""
        from handclip.eval.protocol import RETRIEVAL_GALLERIES

        return dict(RETRIEVAL_GALLERIES) if self.retrieval else self.source.galleries

    def check_retrieval(self, terms: Sequence[str], feature: str, identity_only: Sequence[str] = ()) -> None:
        """Refuse, naming the key, what needs identities on data without them: a loss term that learns or compares
        identities (`terms`: their names), or an evaluation feature outside the joint space captions are scored
        in. A run's are set by its configuration (`expect`) and checked as soon as the data is read."""
        if not self.retrieval:
            return
        why = ("this data has no identities (no identity has two images: each image is its own), so it follows the "
               "image-text retrieval protocol")  # fmt: skip
        if terms:
            raise ConfigError(f"loss.terms.{terms[0]} learns or compares identities, but {why}: use loss=clip or "
                              "loss=siglip, or give the data an identity column")  # fmt: skip
        if feature != "projected":
            raise ConfigError(f"eval.feature={feature}: {why}, which scores captions against images in the joint "
                              "embedding space: use eval.feature=projected")  # fmt: skip
        if identity_only:  # evaluation options that compare images of one identity
            raise ConfigError(f"{identity_only[0]}: {why}, which has no identity to re-rank by or to verify: leave "
                              f"it unset, or give the data an identity column")  # fmt: skip

    @property
    def num_identities(self) -> int:
        """Identities in the training split (what identity heads are sized by)."""
        return len(self.identity_keys)

    @property
    def identity_keys(self) -> list[str]:
        """The training split's identities in the order heads number them (0 .. n-1: sorted)."""
        return [str(k) for k in identity_index(self.train_rows)]

    # with the backbone ------------------------------------------------------------------------
    def prompt_tasks(self, named: bool = False) -> dict[str, tuple[str, list[str], list[str]]]:
        """{task: (manifest column, class values, their prompts)} of the source's zero-shot tasks whose classes the
        training images hold two or more of (those classes, sorted): what a loss term that keeps them trains on. A
        task the training images hold one class of is left out: trained on, it would teach the model to answer that
        class whatever it sees (on the demo's dorsal-right split, the aspect fell to chance). With `named`, every
        task with two classes or more named (a template without named classes: those the training images hold),
        whatever the training images show: what a distillation from the starting model keeps."""
        tasks = {}
        for task, (column, prompts) in self.source.prompts().items():
            seen = sorted({v for v in (str(r.get(column, "")) for r in self.train_rows) if v and v in prompts})
            classes = ([str(v) for v in prompts] or seen) if named else seen
            if len(classes) >= 2:
                tasks[task] = (column, classes, [prompts[c] for c in classes])
        return tasks

    def attach(self, backbone, eval_batch_size: int, labels: bool = False) -> None:
        """Build the datasets with the backbone's preprocessing values and tokenizer; with `labels`, each training
        item carries its classes of the prompt tasks (`prompt_tasks`)."""
        size, resize = backbone.image_size, backbone.resize_size
        mean, std = backbone.image_mean, backbone.image_std
        cache = self.prepare_settings.image_cache
        self.collate = CaptionCollator(backbone.text_tokenizer)  # not the model: workers get a copy
        self.eval_batch_size = eval_batch_size
        self.train_set = ManifestImages(
            self.train_rows, self.root, train_transform(size, resize, mean, std, self.augment), cache,
            self.captioner, seed=self.seed, labels=PromptLabels(self.prompt_tasks()) if labels else None,
        )  # fmt: skip
        self.val_set = ManifestImages(
            images_needed(self.val_rows, include_test=False), self.root, eval_transform(size, resize, mean, std), cache,
            memory_bytes=VALIDATION_MEMORY_BYTES,
        )  # fmt: skip

    def training_features(self, backbone, batch_size: int) -> torch.Tensor:
        """The backbone's projected embeddings of the training images as evaluation sees them (no augmentation),
        in the order of the training items' `index`."""
        from handclip.eval.protocol import extract_image_features

        view = ManifestImages(self.train_rows, self.root, eval_transform(backbone.image_size, backbone.resize_size,
                              backbone.image_mean, backbone.image_std), self.prepare_settings.image_cache)  # fmt: skip
        return extract_image_features(backbone, view, batch_size)

    def _workers(self) -> dict:
        workers = self.num_workers
        return {"num_workers": workers, "persistent_workers": workers > 0,
                "worker_init_fn": leave_signals_to_the_main_process if workers else None}  # fmt: skip

    def balanced_sampler(self) -> IdentityBalancedBatchSampler:
        batches = self.batches
        return balanced_sampler_for(self.rows, batches.identities_per_batch, batches.images_per_identity, self.seed)

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
