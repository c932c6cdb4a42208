"""The data connector: turn what the user passes as data into a deterministic :class:`DataSource`.

Everything a training run reads goes through :func:`as_source`. Map-style data (a ``Dataset``,
or a ``DataLoader`` over one with a sequential or random sampler) becomes a
:class:`MapSource`, whose order is a pure function of ``(seed, epoch, rank, world_size)``:
it resumes mid-epoch exactly and shards across processes like ``DistributedSampler``. Any
other re-iterable becomes an :class:`IterableSource`.

The order helpers (:func:`mix_seed`, :func:`epoch_order`, :func:`shard`,
:func:`limit_batches`), the sources and the data module helpers are re-exported here.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(TensorDataset(torch.arange(8)), batch_size=2, shuffle=True)
    >>> src = as_source(loader, seed=0, rank=1, world_size=2)
    >>> type(src).__name__, src.num_batches(epoch=0)
    ('MapSource', 2)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from fnloop.connectors.data_order import epoch_order, limit_batches, mix_seed, shard
from fnloop.connectors.data_sources import DataSource, IterableSource, MapSource, ResumeWarning, batch_size_of
from fnloop.connectors.datamodule import DataModule, resolve_datamodule
from fnloop.errors import ConfigError

__all__ = [
    "mix_seed",
    "epoch_order",
    "shard",
    "limit_batches",
    "ResumeWarning",
    "DataSource",
    "MapSource",
    "IterableSource",
    "batch_size_of",
    "from_dataloader",
    "as_source",
    "DataModule",
    "resolve_datamodule",
]

_FORWARDED = ("worker_init_fn", "multiprocessing_context", "timeout")


def _is_map_style(dataset: Any) -> bool:
    return (
        isinstance(dataset, Dataset)
        and not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__len__")
    )


def _is_permutation_sampler(sampler: Any) -> bool:
    if type(sampler) is SequentialSampler:
        return True
    if type(sampler) is RandomSampler:
        return not sampler.replacement and sampler.num_samples == len(sampler.data_source)
    return False


def from_dataloader(
    loader: DataLoader, *, seed: int, rank: int = 0, world_size: int = 1, name: str = "data"
) -> DataSource:
    """A ``DataLoader`` as a data source, deterministic and resumable when it can be.

    A loader over a map-style dataset whose sampler is a ``SequentialSampler`` or a
    ``RandomSampler`` (without replacement or ``num_samples``), batched by a plain
    ``BatchSampler``, becomes a :class:`MapSource` with the loader's ``batch_size``,
    ``drop_last``, ``collate_fn``, ``num_workers``, ``pin_memory``, ``worker_init_fn``,
    ``multiprocessing_context`` and ``timeout``, and ``shuffle=True`` for a ``RandomSampler``
    (the order then comes from ``seed``, not from the sampler's generator). Any other loader
    (iterable dataset, custom sampler or batch sampler, ``batch_size=None``) becomes an
    :class:`IterableSource` over the loader itself, which fnloop does not shard; ``name`` is
    how its messages call it.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> src = from_dataloader(DataLoader(TensorDataset(torch.arange(5)), batch_size=2), seed=0)
        >>> [b[0].tolist() for b in src.batches(0)]
        [[0, 1], [2, 3], [4]]
    """
    batch_sampler = loader.batch_sampler
    if not (
        _is_map_style(loader.dataset)
        and type(batch_sampler) is BatchSampler
        and _is_permutation_sampler(batch_sampler.sampler)
    ):
        return IterableSource(loader, name=name)
    extra = {k: getattr(loader, k) for k in _FORWARDED if getattr(loader, k, None) is not None}
    if loader.num_workers > 0 and loader.prefetch_factor is not None:
        extra["prefetch_factor"] = loader.prefetch_factor
    return MapSource(
        loader.dataset,
        batch_size=batch_sampler.batch_size,
        shuffle=type(batch_sampler.sampler) is RandomSampler,
        drop_last=batch_sampler.drop_last,
        collate_fn=loader.collate_fn,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        loader_kwargs=extra,
    )


def as_source(
    data: Any,
    *,
    batch_size: int | None = None,
    shuffle: bool | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    name: str = "train_data",
) -> DataSource:
    """Turn ``data`` into a :class:`DataSource`.

    Accepted:

    * a map-style ``Dataset``: :class:`MapSource` with ``batch_size`` (default 1), ``shuffle``
      (default False), ``drop_last``, sharded by ``rank`` / ``world_size``;
    * an ``IterableDataset``: batched by a ``DataLoader`` of ``batch_size`` (default 1) into an
      :class:`IterableSource`; it must shard itself across ranks;
    * a ``DataLoader``: :func:`from_dataloader`;
    * a :class:`DataSource`: returned as is;
    * a list or tuple of batches, or any re-iterable of batches: :class:`IterableSource`.

    ``batch_size``, ``shuffle`` and ``drop_last=True`` configure a Dataset only; with any other
    kind of data they raise a ``ConfigError`` (set them on the DataLoader instead).

    Args:
        data: the data.
        batch_size: samples per batch for a Dataset.
        shuffle: shuffle a Dataset every epoch.
        seed: the run seed the order derives from.
        rank: this process's rank.
        world_size: number of processes.
        drop_last: drop the last incomplete batch of a Dataset.
        name: the argument's name, used in error messages.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> as_source(TensorDataset(torch.zeros(10, 2)), batch_size=4).num_batches(0)
        3
        >>> as_source([(torch.zeros(2),)]).resumable
        True
    """
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        if not hasattr(data, "__len__"):
            raise ConfigError(
                f"{name}: the map-style Dataset {type(data).__name__} has no __len__; define __len__ "
                "or pass an IterableDataset or a DataLoader."
            )
        return MapSource(
            data,
            batch_size=1 if batch_size is None else batch_size,
            shuffle=bool(shuffle),
            drop_last=drop_last,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
    if isinstance(data, IterableDataset):
        if shuffle:
            raise ConfigError(
                f"{name}: shuffle=True cannot apply to the IterableDataset {type(data).__name__}; "
                "shuffle inside the dataset or pass a map-style Dataset."
            )
        loader = DataLoader(data, batch_size=1 if batch_size is None else batch_size, drop_last=drop_last)
        return IterableSource(loader, name=name)
    given = {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last or None}
    misplaced = [f"{k}={v!r}" for k, v in given.items() if v is not None]
    if misplaced and _is_source_like(data):
        raise ConfigError(
            f"{name}: {', '.join(misplaced)} only applies when {name} is a Dataset; {name} is a "
            f"{type(data).__name__}, so set these on it (e.g. DataLoader(batch_size=..., shuffle=...))."
        )
    if isinstance(data, DataLoader):
        return from_dataloader(data, seed=seed, rank=rank, world_size=world_size, name=name)
    if isinstance(data, DataSource):
        return data
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping, Iterator)):
        return IterableSource(data, name=name)
    if isinstance(data, Iterator):
        return IterableSource(data, name=name)  # raises the one-shot iterator error
    raise ConfigError(
        f"{name} of type {type(data).__name__} is not data fnloop can read. Pass a map-style "
        "torch Dataset (with batch_size=...), an IterableDataset, a DataLoader, a DataSource, a "
        "list of batches or any re-iterable of batches."
    )


def _is_source_like(data: Any) -> bool:
    return isinstance(data, (DataLoader, DataSource)) or (
        isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping))
    )
