"""Reproducible per-sample augmentation: every training sample is named by a key, and its random augmentation
is drawn from random number generators seeded by that key, not from whatever state a process's generators
are in.

A key is (epoch, rank, index, copy, position): the epoch, the DDP rank that draws the sample, the sample's
index in the data set, which draw of that index it is on this rank this epoch (0, or 1, 2 under repeated
augmentation), and its position in the rank's epoch order. The first four seed the augmentation
(`sample_seed`); the position only addresses the teacher-output cache (`output_cache.py`).

So the same run seed gives the same augmented images whether or not the teacher runs, with any number of
loader workers (each worker seeds per sample, so which worker loads a sample does not matter), and under
DDP. What it costs: seeding three generators per sample (about 20 microseconds, next to decoding an image)
and saving and restoring them once per batch.
"""

import hashlib
import random
import struct
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

STATISTICS_EPOCH = -1  # the key's epoch for the one plain pass of the teacher statistics
VALIDATION_EPOCH = -2  # the key's epoch for the teacher's pass over the validation split (no augmentation)
# The statistics pass is seeded by this, not by the run seed: statistics belong to the teacher and the data,
# and are cached as such (every student seed distils with the same class centres / hash bias).
STATISTICS_SEED = 0
KEY_FIELDS = ("epoch", "rank", "index", "copy", "position")


def sample_seed(run_seed: int, *key: int) -> int:
    """A 64-bit seed from the run seed and a sample's key (epoch, rank, index, copy): a hash, so that nearby
    keys give unrelated streams (seed + index would make sample i of epoch e+1 repeat sample i+1 of e)."""
    packed = struct.pack(f"<{1 + len(key)}q", run_seed, *key)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little")


@contextmanager
def seeded_generators(seed: int, device: torch.device | str | None = None):
    """Python's `random`, numpy's global generator and torch's CPU generator seeded from `seed` inside the
    block (what torchvision, timm's transforms, RandAugment, random erasing and Mixup draw from), and restored
    after it, so that the process's own stream (dropout, a DataLoader's base seed) is untouched. With a CUDA
    `device`, that device's generator too (random erasing of a batch on the GPU draws its noise there)."""
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"
    cuda_state = torch.cuda.get_rng_state(device) if cuda else None
    with preserved_generators():
        seed_generators(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        try:
            yield
        finally:
            if cuda:
                torch.cuda.set_rng_state(cuda_state, device)


@contextmanager
def preserved_generators():
    """Python's `random`, numpy's global generator and torch's CPU generator as they were before the block.
    Saving and restoring numpy's state is the costly part (~100 microseconds; seeding all three, ~20), so a
    batch of samples is seeded one by one inside one such block (`SeededSamples.__getitems__`)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.default_generator.set_state(torch_state)


def seed_generators(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


class KeyedSampler(DistributedSampler):
    """Yields one key (epoch, rank, index, copy, position) per index that `base` yields for this rank.

    `base` is a sampler that already shards by rank (torch's DistributedSampler, timm's RepeatAugSampler) or
    a plain one. This class is declared a DistributedSampler so that Lightning keeps it under DDP instead of
    wrapping it in a second per-rank sampler; it still calls `set_epoch` every epoch, which reaches `base`.
    `fixed_epoch` pins the epoch (the statistics pass)."""

    def __init__(self, base: Sampler, rank: int = 0, num_replicas: int = 1, fixed_epoch: int | None = None):
        # DistributedSampler.__init__ is not called: it would look for a process group. The attributes
        # Lightning reads are set here.
        self.base = base
        self.rank, self.num_replicas = rank, num_replicas
        self.fixed_epoch = fixed_epoch
        self.epoch = fixed_epoch if fixed_epoch is not None else 0
        self.shuffle = bool(getattr(base, "shuffle", False))
        self.dataset = getattr(base, "dataset", None)

    def set_epoch(self, epoch: int) -> None:
        if self.fixed_epoch is not None:
            return
        self.epoch = epoch
        if callable(getattr(self.base, "set_epoch", None)):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int, int, int, int]]:
        draws: dict[int, int] = defaultdict(int)
        for position, index in enumerate(self.base):
            index = int(index)
            yield (self.epoch, self.rank, index, draws[index], position)
            draws[index] += 1

    def __len__(self) -> int:
        return len(self.base)


class SeededSamples(Dataset):
    """`dataset[index]` for a key from `KeyedSampler`, with its augmentation drawn from generators seeded by
    (`seed`, epoch, rank, index, copy); returns (image, target, key) with the key as a 5-long int64 tensor,
    so that a batch carries B x 5 keys. `seed` is the run's (the teacher's own while a teacher is trained)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list:
        """A batch of samples (the DataLoader fetches a batch with this when it exists): each seeded by its
        own key, the process's generators saved once before the batch and restored once after it."""
        with preserved_generators():
            return [self._sample(key) for key in keys]

    def _sample(self, key) -> tuple:
        epoch, rank, index, copy, _position = key
        seed_generators(sample_seed(self.seed, epoch, rank, index, copy))
        image, target = self.dataset[index]
        return image, target, torch.tensor(key, dtype=torch.int64)


def batch_seed(run_seed: int, keys: torch.Tensor) -> int:
    """A seed for a whole batch's random draws (Mixup / CutMix: lambda, the box, which of the two) from its
    samples' keys (B x 5, on the CPU), so that a batch is mixed the same way in every run of the seed."""
    digest = hashlib.blake2b(keys.numpy().tobytes(), digest_size=8, key=struct.pack("<q", run_seed))
    return int.from_bytes(digest.digest(), "little")


def ordered_sampler(length: int) -> Sampler:
    """Indices 0..length-1 in order (the statistics pass)."""
    return range(length)  # a range is an iterable with a length, all a sampler needs to be


def shuffled_sampler(dataset: Dataset, seed: int, rank: int, num_replicas: int) -> DistributedSampler:
    """This rank's share of a fresh permutation per epoch, drawn from (seed + epoch): torch's
    DistributedSampler (padded to equal shards), which needs no process group when rank and size are
    given. One process is rank 0 of 1."""
    return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)


def validation_keys(first_position: int, count: int) -> torch.Tensor:
    """Keys (VALIDATION_EPOCH, 0, index, 0, position) of `count` validation images from `first_position`:
    the validation split is read in order and not augmented, so position = index."""
    positions = torch.arange(first_position, first_position + count, dtype=torch.int64)
    keys = torch.zeros(count, len(KEY_FIELDS), dtype=torch.int64)
    keys[:, 0] = VALIDATION_EPOCH
    keys[:, 2] = positions
    keys[:, 4] = positions
    return keys
