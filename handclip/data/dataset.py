"""Torch datasets over manifest rows: image tensor, caption and identity index."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from handclip.data.images import load_rgb
from handclip.data.sampling import identity_index, sample_seed
from handclip.errors import DataError


def leave_signals_to_the_main_process(worker_id: int) -> None:
    """A loader worker's `worker_init_fn`: Ctrl-C and SIGTERM are ignored in the worker.

    A terminal's Ctrl-C (and a SLURM or container stop) reaches every process of the group: a worker
    that died of it would take the batch in flight with it, and the main process, which stops
    between batches and saves a resumable checkpoint, would crash instead. The main process shuts
    its workers down itself; a worker whose main process is gone exits on its own.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ManifestImages(Dataset):
    """Images of manifest rows, read from the resized cache when there is one."""

    def __init__(
        self,
        rows: Sequence[dict],
        root: str | Path,
        transform: Callable,
        cache: str | Path | None = None,
        captioner: Callable | None = None,
        seed: int = 0,
        memory_bytes: int = 0,
        labels: Callable[[dict], torch.Tensor] | None = None,
    ):
        self.rows = list(rows)
        # with a deterministic transform (no epoch given), each image's tensor is kept after its first read when all
        # of them fit in `memory_bytes`: validation reads the same images every epoch, with the same result
        self.memory_bytes = memory_bytes
        self._kept: dict[int, torch.Tensor] | None = None
        self.root = Path(root)
        self.image_root = Path(cache) if cache else self.root  # resized copies (PrepareSettings.image_cache)
        self.transform = transform
        self.captioner = captioner
        self.labels = labels  # a row's classes of the data's prompt tasks (PromptLabels), for a term that keeps them
        self.identity_index = identity_index(self.rows)  # identities as 0..n-1 in sorted order
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        # EpochSeededSampler yields (epoch, index): augmentation and caption are then seeded
        # per sample, the same with any number of workers and after a resume
        epoch, index = key if isinstance(key, tuple) else (None, key)
        row = self.rows[index]
        if epoch is None and self._kept is not None and index in self._kept:
            return self._item(self._kept[index], row, index, None)
        path = self.image_root / row["image"]
        try:
            image = load_rgb(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            if self.image_root != self.root:  # a damaged cached copy: prepare makes a missing one anew
                raise DataError(f"cannot read the cached copy {path}: {error}; delete it and start again, which "
                                f"makes it anew from {self.root / row['image']}") from None  # fmt: skip
            raise DataError(f"cannot read image {path}: {error}; replace or remove it (with data.cache_size > 0 "
                            "prepare leaves unreadable images out, counted)") from None  # fmt: skip
        if epoch is None:
            pixels, rng = self.transform(image), None
            self._keep(index, pixels)
        else:
            seed = sample_seed(self.seed, epoch, index)
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only, which is what fork_rng restores: torch.manual_seed would also queue a
                # seeding of each accelerator not yet started (CUDA, XPU, MTIA), formatting a stack trace for
                # each, once per image: about 12% of a CPU demo run's time, for nothing
                torch.random.default_generator.manual_seed(seed)
                pixels = self.transform(image)
            rng = random.Random(seed)
        return self._item(pixels, row, index, rng)

    def _item(self, pixels: torch.Tensor, row: dict, index: int, rng: random.Random | None) -> dict:
        item = {"pixel_values": pixels, "identity": self.identity_index[row["identity"]], "index": index}
        return self.described(item, row, rng)

    def described(self, item: dict, row: dict, rng: random.Random | None) -> dict:
        """`item` with what the row says in words: its caption, and its prompt tasks' classes."""
        if self.captioner is not None:
            item["caption"] = self.captioner(row, rng)
        if self.labels is not None:
            item["labels"] = self.labels(row)
        return item

    def _keep(self, index: int, pixels: torch.Tensor) -> None:
        if self._kept is None:
            if pixels.nelement() * pixels.element_size() * len(self.rows) > self.memory_bytes:
                return  # all of them would not fit: none is kept
            self._kept = {}
        self._kept[index] = pixels


class PromptLabels:
    """A row's class index in each prompt task ({task: (column, class values, prompts)}), -1 where it has none."""

    def __init__(self, tasks: dict):
        self.columns = [(column, {value: i for i, value in enumerate(values)}) for column, values, _ in tasks.values()]

    def __call__(self, row: dict) -> torch.Tensor:
        return torch.tensor([classes.get(str(row.get(column, "")), -1) for column, classes in self.columns])


class CaptionCollator:
    """Stacks images and tokenizes the batch's captions with the backbone's `tokenize`."""

    def __init__(self, tokenize: Callable[[list[str]], dict]):
        self.tokenize = tokenize

    def __call__(self, items: list[dict]) -> dict:
        images = "hidden" if "hidden" in items[0] else "pixel_values"  # stored activations or pixels
        batch = {
            images: torch.stack([i[images] for i in items]),
            "identities": torch.tensor([i["identity"] for i in items]),
            "index": torch.tensor([i["index"] for i in items]),
        }
        if "labels" in items[0]:
            batch["labels"] = torch.stack([i["labels"] for i in items])
        if "caption" in items[0]:
            tokens = self.tokenize([i["caption"] for i in items])
            batch["input_ids"] = tokens["input_ids"]
            batch["attention_mask"] = tokens["attention_mask"]
        return batch
