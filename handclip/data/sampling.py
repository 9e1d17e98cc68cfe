"""A shuffling sampler whose order is a pure function of (seed, epoch).

It yields (epoch, index) pairs, so a dataset can seed each sample's augmentation and caption
choice from (seed, epoch, index): the same numbers with any number of workers, and an exact
continuation when a run resumes at an epoch boundary.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSeededSampler(Sampler):
    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.skip = 0  # items of this epoch already trained on (a mid-epoch resume); used once

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = range(self.size)
        skip, self.skip = self.skip, 0
        return iter([(self.epoch, i) for i in list(order)[skip:]])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)


class IdentityBalancedBatchSampler(Sampler):
    """Batches of P identities x K images each (PK sampling), seeded by (seed, epoch).

    Identities with fewer than K images are sampled with repetition; an epoch has as many
    batches as the training set holds full batches. Yields lists of (epoch, index) pairs.
    """

    def __init__(self, identities: list[int], identities_per_batch: int, images_per_identity: int, seed: int = 0):
        from handclip.errors import ConfigError

        self.by_identity: dict[int, list[int]] = {}
        for index, identity in enumerate(identities):
            self.by_identity.setdefault(identity, []).append(index)
        self.p, self.k = identities_per_batch, images_per_identity
        if self.p < 2:
            raise ConfigError(f"data.identities_per_batch={self.p}: a contrastive batch needs at least 2 identities")
        if self.k < 1:
            raise ConfigError(f"data.images_per_identity={self.k} must be at least 1")
        if len(self.by_identity) < self.p:
            raise ConfigError(
                f"data.identities_per_batch={self.p} cannot be filled: the training split has only "
                f"{len(self.by_identity)} identities; lower it to at most {len(self.by_identity)}"
            )
        self.batches = max(1, len(identities) // (self.p * self.k))
        self.skip = 0  # batches of this epoch already trained on (a mid-epoch resume); used once
        # Lightning calls set_epoch on `batch_sampler.sampler`; this object carries the epoch
        self.sampler = EpochSeededSampler(len(identities), seed)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        epoch = self.sampler.epoch
        generator = torch.Generator().manual_seed(self.sampler.seed * 100_003 + epoch + 7)
        keys = sorted(self.by_identity)
        skip, self.skip = self.skip, 0
        for number in range(self.batches):
            batch = []
            for position in torch.randperm(len(keys), generator=generator)[: self.p].tolist():
                images = self.by_identity[keys[position]]
                if len(images) >= self.k:
                    chosen = torch.randperm(len(images), generator=generator)[: self.k].tolist()
                else:
                    chosen = torch.randint(len(images), (self.k,), generator=generator).tolist()
                batch += [(epoch, images[c]) for c in chosen]
            if number >= skip:  # the draws above still happen, so later batches stay the same
                yield batch


def identity_index(rows: list[dict]) -> dict:
    """Each identity of `rows` -> its class number, 0..n-1 in sorted order: how identity heads, their labels, the
    P x K sampler and validation's identity accuracy all number the training identities."""
    return {identity: i for i, identity in enumerate(sorted({r["identity"] for r in rows}))}


def balanced_sampler_for(
    rows: list[dict], identities_per_batch: int, images_per_identity: int, seed: int
) -> IdentityBalancedBatchSampler:
    """The P x K sampler over a manifest's training rows.

    Raises ConfigError when the training split cannot fill it; needs no images or weights.
    """
    train = [r for r in rows if r["split"] == "train"]
    index = identity_index(train)
    return IdentityBalancedBatchSampler([index[r["identity"]] for r in train], identities_per_batch,
                                        images_per_identity, seed)  # fmt: skip
