"""Data order and augmentation seeds: what makes a resumed run see exactly the samples the uninterrupted one saw.

The order of samples in epoch ``e`` is a permutation seeded by ``(seed, e)``, and each sample's augmentation is
seeded by ``(seed, e, index)`` in a forked RNG, so neither depends on how many steps ran before, and data loading
never consumes the global random stream that dropout uses.

Layer: engine. Imports: torch, config and data.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import TrainConfig
from ..data import Batch, collate


class EpochSampler(Sampler[int]):
    """A deterministic, resumable, optionally sharded sampler.

    Epoch ``e`` visits a permutation seeded by ``(seed, e)`` (or the natural order when ``shuffle`` is off), padded
    to a multiple of the number of processes and split round-robin as ``DistributedSampler`` does. ``skip`` drops
    the first indices of this process's share, to resume mid-epoch.

    With ``groups`` (one id per sample, e.g. :func:`aspect_ratio_groups`), each run of ``batch_size`` indices
    comes from one group: the share is streamed into per-group buckets and a bucket is emitted when full, as
    detectron2's aspect-ratio grouping does; what is left at the end follows in stream order. A padded batch is as
    large as its largest image on each side, so mixing landscape and portrait images nearly doubles the pixels
    the model computes on. With a single group the order is exactly the ungrouped one.
    """

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        groups: Sequence[int] | None = None,
        batch_size: int = 1,
    ) -> None:
        if groups is not None and len(groups) != size:
            raise ValueError(f"groups has {len(groups)} entries for {size} samples")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.groups, self.batch_size = groups, batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = math.ceil(self.size / self.world_size) * self.world_size
        order += order[: total - len(order)]
        share = order[self.rank : total : self.world_size]
        return share if self.groups is None else _grouped(share, self.groups, self.batch_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip :])

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size) - self.skip


class SeededDataset(Dataset):
    """Seeds each sample's random augmentation with ``(seed, epoch, index)`` inside a forked RNG.

    The global RNGs (torch and Python's ``random``) are left as they were, so data loading never changes the
    random stream that dropout and the rest of training see, in the main process or in workers.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed)
                random.seed(item_seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)


def _grouped(order: list[int], groups: Sequence[int], batch_size: int) -> list[int]:
    """``order`` rearranged so that each full batch comes from one group (see :class:`EpochSampler`)."""
    buckets: dict[int, list[int]] = {}  # group -> positions in ``order`` (a padded share may repeat an index)
    out: list[int] = []
    for position, index in enumerate(order):
        bucket = buckets.setdefault(groups[index], [])
        bucket.append(position)
        if len(bucket) == batch_size:
            out += [order[p] for p in bucket]
            bucket.clear()
    out += [order[p] for p in sorted(itertools.chain.from_iterable(buckets.values()))]
    return out


def aspect_ratio_groups(dataset: Dataset) -> list[int] | None:
    """0 for landscape (width ≥ height), 1 for portrait, per sample, from the stored image sizes (no pixels read);
    None when the dataset does not tell its images' sizes (``image_size(index) -> (height, width)``)."""
    size_of = getattr(dataset, "image_size", None)
    if not callable(size_of):
        return None
    groups = []
    for index in range(len(dataset)):
        height, width = size_of(index)
        groups.append(0 if width >= height else 1)
    return groups


def batches_per_epoch(sampler: EpochSampler, train: TrainConfig) -> int:
    """Batches each process trains on per epoch: whole updates of ``train.grad_accum_steps`` micro-batches, at
    most ``train.max_steps_per_epoch`` updates (0: no cap)."""
    batches = len(sampler) // train.batch_size
    if train.max_steps_per_epoch:
        batches = min(batches, train.max_steps_per_epoch * train.grad_accum_steps)
    if batches < train.grad_accum_steps:
        raise ValueError(
            f"the training split has {sampler.size} images: fewer than one update of {train.batch_size} × "
            f"{train.grad_accum_steps} per process; lower train.batch_size or train.grad_accum_steps"
        )
    return batches - batches % train.grad_accum_steps


def epoch_updates(
    dataset: SeededDataset,
    sampler: EpochSampler,
    train: TrainConfig,
    *,
    epoch: int,
    skip: int,
    count: int,
    num_workers: int = 0,
) -> Iterator[list[Batch]]:
    """Batches ``skip`` to ``skip + count`` of ``epoch`` for this process, grouped by update (lists of
    ``train.grad_accum_steps`` micro-batches)."""
    sampler.set_epoch(epoch, skip=skip * train.batch_size)
    dataset.epoch = epoch
    loader = DataLoader(
        dataset,
        batch_size=train.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(train.seed + epoch),  # keeps the global RNG untouched
        persistent_workers=False,
        drop_last=True,
    )
    group: list[Batch] = []
    for batch in itertools.islice(loader, count):
        group.append(batch)
        if len(group) == train.grad_accum_steps:
            yield group
            group = []
