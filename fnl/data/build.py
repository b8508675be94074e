"""Data loaders: an infinite, seeded, shuffled training stream and a sequential test stream, each sharded across
processes when torch.distributed is initialized. Batches are plain lists of model input dicts."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from fnl.config import CfgNode, ConfigError
from fnl.data.catalog import load_split
from fnl.data.densepose_coco import DatasetError
from fnl.data.mapper import DatasetMapper


def distributed_rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def get_dataset_dicts(root: str, splits: list[str] | tuple[str, ...], filter_empty: bool = False) -> list[dict]:
    """Dataset dicts of the splits under ``root``, concatenated; with ``filter_empty``, only images that have at
    least one non-crowd annotation."""
    dataset_dicts = [d for split in splits for d in load_split(root, split)]
    if filter_empty:
        dataset_dicts = [d for d in dataset_dicts if any(not a["iscrowd"] for a in d["annotations"])]
    if not dataset_dicts:
        raise DatasetError(f"splits {list(splits)} under {root} have no images"
                           + (" with non-crowd annotations" if filter_empty else ""))
    return dataset_dicts


class MappedDataset(Dataset):
    """Applies a mapper to dataset dicts. A key is an index, or ``(index, draw)`` from :class:`TrainingSampler`:
    the draw number seeds the augmentation of that sample, so a run is reproducible whatever NUM_WORKERS is."""

    def __init__(self, dataset_dicts: list[dict], mapper: DatasetMapper, seed: int = 0) -> None:
        self.dataset_dicts = dataset_dicts
        self.mapper = mapper
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset_dicts)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, draw = key if isinstance(key, tuple) else (key, key)
        return self.mapper(self.dataset_dicts[index], np.random.default_rng([self.seed, draw]))


class TrainingSampler(Sampler):
    """Endless ``(index, draw)`` stream: a fresh seeded permutation per epoch; process ``rank`` of ``world_size``
    takes every ``world_size``-th draw, so the processes see disjoint samples of one global stream. ``start``
    global draws are skipped: a resumed run continues the stream where the interrupted one stopped."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None, start: int = 0) -> None:
        if size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        default_rank, default_size = distributed_rank_and_size()
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = default_rank if rank is None else rank
        self.world_size = default_size if world_size is None else world_size
        self.start = start

    def _global_stream(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seed)
        while True:
            yield from (rng.permutation(self.size) if self.shuffle else range(self.size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        stream = enumerate(self._global_stream())
        for draw, index in itertools.islice(stream, self.start + self.rank, None, self.world_size):
            yield int(index), draw


class InferenceSampler(Sampler):
    """Each index once, in order; process ``rank`` takes a contiguous shard."""

    def __init__(self, size: int, rank: int | None = None, world_size: int | None = None) -> None:
        default_rank, default_size = distributed_rank_and_size()
        rank = default_rank if rank is None else rank
        world_size = default_size if world_size is None else world_size
        shard = math.ceil(size / world_size)
        self.indices = range(min(rank * shard, size), min((rank + 1) * shard, size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def list_collate(batch: list[dict]) -> list[dict]:
    """Images differ in size: a batch stays a list (the model pads)."""
    return list(batch)


def build_train_loader(cfg: CfgNode, dataset_dicts: list[dict] | None = None, start_iter: int = 0) -> DataLoader:
    """Endless loader over DATASETS.TRAIN under DATASETS.ROOT; each process gets SOLVER.IMS_PER_BATCH / world_size
    images per batch. ``start_iter``: the batches of the iterations before it are skipped (``--resume``)."""
    rank, world_size = distributed_rank_and_size()
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by the number of "
                          f"processes ({world_size})")
    if dataset_dicts is None:
        dataset_dicts = get_dataset_dicts(cfg.DATASETS.ROOT, cfg.DATASETS.TRAIN,
                                          filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    dataset = MappedDataset(dataset_dicts, DatasetMapper(cfg, is_train=True), seed=cfg.SEED)
    sampler = TrainingSampler(len(dataset), seed=cfg.SEED, rank=rank, world_size=world_size,
                              start=start_iter * cfg.SOLVER.IMS_PER_BATCH)
    batch_sampler = BatchSampler(sampler, cfg.SOLVER.IMS_PER_BATCH // world_size, drop_last=True)
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=list_collate,
                      num_workers=cfg.DATALOADER.NUM_WORKERS, generator=torch.Generator().manual_seed(cfg.SEED))


def build_test_loader(cfg: CfgNode, split: str, dataset_dicts: list[dict] | None = None) -> DataLoader:
    """One image per batch, in file order, of ``split`` under DATASETS.ROOT (its first TEST.MAX_IMAGES images when
    that is > 0)."""
    if dataset_dicts is None:
        dataset_dicts = get_dataset_dicts(cfg.DATASETS.ROOT, [split])
    if cfg.TEST.MAX_IMAGES > 0:
        dataset_dicts = dataset_dicts[: cfg.TEST.MAX_IMAGES]
    dataset = MappedDataset(dataset_dicts, DatasetMapper(cfg, is_train=False), seed=cfg.SEED)
    return DataLoader(dataset, sampler=InferenceSampler(len(dataset)), batch_size=1, collate_fn=list_collate,
                      num_workers=cfg.DATALOADER.NUM_WORKERS)
