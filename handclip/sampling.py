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
        return iter([(self.epoch, i) for i in order])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)
