"""Stored activations of the frozen prefix of the image tower, memory-mapped from the data cache.

An `ActivationStore` is one array `[views, images, tokens, width]` (float16 by default, float32 on
request) in `DERIVED/activations/<key digest>.npy` (the dataset's folder of derived files under the
cache, `handclip.data.prepare.derived_folder`), beside a `.json` with the key it was made under:
the backbone, a hash of the prefix weights, the number of prefix groups, the image list, the
resized source, the transform (with its sizes and normalisation) and the views. Any change gives
another file, so a changed setting never reads stale activations. A store is filled once, under a
file lock (a second process waits, then reads it), into a temporary file that replaces the final
name only when complete: an interrupted fill leaves nothing half written. Later runs with the same
key (a resumed run, a sweep repeated or extended, the same depth under another learning rate or
loss) open it read-only; each distinct k is one store.

Training view v of image i is the training transform seeded by (run seed, v, i), the same seeding
as epoch v of an uncached run; each epoch draws one of the V views per image.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from handclip.data.sampling import sample_seed
from handclip.io import atomic_path, remove_dead_leftovers, write_text_atomic

DTYPES = {"float16": np.float16, "float32": np.float32}


def store_dir(derived: str | Path) -> Path:
    return Path(derived) / "activations"


def images_digest(images: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(images).encode()).hexdigest()[:20]


class ActivationStore:
    """One memory-mapped array of prefix activations, made once for its key and then only read."""

    def __init__(self, directory: str | Path, key: Mapping, views: int, count: int, dtype: str = "float16"):
        if dtype not in DTYPES:
            raise ValueError(f"activation dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        self.key = {**dict(key), "views": views, "count": count, "dtype": dtype}
        text = json.dumps(self.key, sort_keys=True, default=str)
        self.digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        self.path = Path(directory) / f"{self.digest}.npy"
        self.views, self.count, self.dtype = views, count, DTYPES[dtype]
        self.array: np.ndarray | None = None
        self.filled_now = False  # True when this process computed it

    def exists(self) -> bool:
        return self.path.is_file()

    def ensure(
        self, compute: Callable[[int, Sequence[int]], torch.Tensor], batch_size: int, desc: str = "caching"
    ) -> ActivationStore:
        """Open the store, filling it first if no process has (or anew if it is damaged): `compute(view, indices)`
        gives hidden states."""
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one process fills a store; another asking for the same one waits here, then finds it filled
        with FileLock(str(self.path.with_suffix(".lock"))):
            remove_dead_leftovers(self.path.parent, self.path.name)  # fills killed half-way
            problem = self.damage() if self.exists() else None
            if problem:
                print(f"stored activations {self.path} are damaged ({problem}): computing them again", flush=True)
                self.path.unlink()
            if not self.exists():
                self._fill(compute, batch_size, desc)
                self.filled_now = True
        self.array = np.load(self.path, mmap_mode="r")
        return self

    def _fill(self, compute, batch_size: int, desc: str) -> None:
        """Compute every view of every image into a temporary file, with the checksum of what was written; put in
        place whole when complete."""
        from tqdm.auto import tqdm

        with atomic_path(self.path) as temporary:
            array, checksum = None, hashlib.blake2b(digest_size=16)
            progress = tqdm(total=self.views * self.count, desc=desc, unit="img", leave=False)
            for view in range(self.views):
                for start in range(0, self.count, batch_size):
                    indices = list(range(start, min(start + batch_size, self.count)))
                    hidden = compute(view, indices).detach().float().cpu().numpy().astype(self.dtype)
                    if array is None:
                        shape = (self.views, self.count, *hidden.shape[1:])
                        array = np.lib.format.open_memmap(temporary, "w+", self.dtype, shape)
                    array[view, indices[0] : indices[-1] + 1] = hidden
                    checksum.update(np.ascontiguousarray(hidden).tobytes())  # the bytes in file order
                    progress.update(len(indices))
            progress.close()
            array.flush()
            del array
            description = {**self.key, "checksum": checksum.hexdigest()}
            write_text_atomic(self.path.with_suffix(".json"), json.dumps(description, indent=2, default=str))

    def damage(self) -> str | None:
        """What is wrong with the store on disk (cut short, another shape, bytes that do not match the checksum taken
        when it was filled), or None: read whole, once per run."""
        try:
            saved = json.loads(self.path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return "its description (.json) is missing or unreadable"
        if "checksum" not in saved:
            return "it was made without a checksum, by an older HandCLIP"
        try:
            array = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as error:  # a truncated file: "mmap length is greater than file size"
            return f"it cannot be opened: {error}"
        if array.shape[:2] != (self.views, self.count) or array.dtype != self.dtype:
            return f"it holds {array.shape[:2]} views x images of {array.dtype}, not {(self.views, self.count)}"
        checksum = hashlib.blake2b(digest_size=16)
        for view in range(self.views):
            for start in range(0, self.count, 256):
                checksum.update(np.ascontiguousarray(array[view, start : start + 256]).tobytes())
        if checksum.hexdigest() != saved["checksum"]:
            return "its bytes do not match the checksum taken when it was filled"
        return None

    def __getstate__(self) -> dict:
        # loader workers open the file themselves (a pickled memmap would be a full in-memory copy)
        return {**self.__dict__, "array": None}

    def _opened(self) -> np.ndarray:
        if self.array is None:
            self.array = np.load(self.path, mmap_mode="r")
        return self.array

    def hidden(self, view: int, index: int) -> torch.Tensor:
        """Hidden states of one image view, as float32."""
        return torch.from_numpy(np.asarray(self._opened()[view, index], dtype=np.float32))

    def batch(self, view: int, indices: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._opened()[view, list(indices)], dtype=np.float32))


class CachedTrainingViews(Dataset):
    """Training items with stored hidden states instead of pixels: each epoch draws one of V views.

    Captions, identities and indices are exactly those of `ManifestImages` (same seeding).
    """

    def __init__(self, images, store: ActivationStore):
        self.images, self.store = images, store  # images: the ManifestImages the views were made from

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        row = self.images.rows[index]
        item = {"identity": self.images.identity_index[row["identity"]], "index": index}
        view, rng = 0, None
        if epoch is not None:
            seed = sample_seed(self.images.seed, epoch, index)
            rng = random.Random(seed)
            if self.store.views > 1:
                view = random.Random(seed ^ 0x5EED).randrange(self.store.views)
        item["hidden"] = self.store.hidden(view, index)
        return self.images.described(item, row, rng)


class CachedImages(Dataset):
    """Evaluation items: the stored hidden states of images picked from an evaluation store by name."""

    def __init__(self, store: ActivationStore, positions: Sequence[int]):
        self.store, self.positions = store, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> dict:
        return {"hidden": self.store.hidden(0, self.positions[index]), "index": index}


def stored_batches(store: ActivationStore, positions: Sequence[int], batch_size: int, flip: bool = False):
    """Batches `{"hidden"}` of the stored images at `positions`, in order (what `extract_features` reads); with
    `flip`, each also holds its `mirrored` batch: view 1 of an evaluation store holds the mirrored images."""
    for start in range(0, len(positions), batch_size):
        chosen = positions[start : start + batch_size]
        yield {"hidden": store.batch(0, chosen), **({"mirrored": {"hidden": store.batch(1, chosen)}} if flip else {})}
