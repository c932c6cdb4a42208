"""Data sources: one protocol for map-style datasets and plain iterables of batches.

A :class:`DataSource` yields the batches of an epoch from any batch index on. A
:class:`MapSource` computes its order with :func:`~fnloop.connectors.data_order.epoch_order`
and :func:`~fnloop.connectors.data_order.shard`, so it resumes mid-epoch exactly without
reading the skipped samples. An :class:`IterableSource` wraps any re-iterable of batches;
unless it is a list or tuple it can only resume by reading the skipped batches again, which
it says once with a :class:`ResumeWarning`.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> src = MapSource(TensorDataset(torch.arange(6)), batch_size=4)
    >>> src.num_batches(0), [b[0].tolist() for b in src.batches(0)]
    (2, [[0, 1, 2, 3], [4, 5]])
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from fnloop.connectors.data_order import epoch_order, mix_seed, shard
from fnloop.errors import ConfigError
from fnloop.tree import tree_leaves

__all__ = ["ResumeWarning", "DataSource", "MapSource", "IterableSource", "batch_size_of"]


class ResumeWarning(UserWarning):
    """A data source cannot start mid-epoch without reading the batches before the start."""


@runtime_checkable
class DataSource(Protocol):
    """The batches of every epoch, resumable from any batch index when ``resumable`` is True."""

    resumable: bool

    def num_batches(self, epoch: int) -> int | None: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]: ...

    def batch_size_of(self, batch: Any) -> int: ...


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: dim 0 of its first leaf that has at least one dimension.

    Example:
        >>> import torch
        >>> batch_size_of({"x": torch.zeros(8, 3), "y": torch.zeros(8)})
        8
    """
    for leaf in tree_leaves(batch):
        shape = getattr(leaf, "shape", None)
        if shape is not None and len(shape) >= 1:
            return int(shape[0])
    raise ConfigError(
        f"Cannot tell the batch size of a batch of type {type(batch).__name__}: it has no tensor "
        "leaf with a batch dimension. Put a tensor whose first dimension is the batch in each "
        "batch, or pass a DataSource whose batch_size_of(batch) knows the batch layout."
    )


def _check_start(start: Any) -> int:
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ConfigError(f"batches(epoch, start): start must be an int >= 0 (a batch index), got {start!r}.")
    return start


def _tensor_batches(
    tensors: Sequence[torch.Tensor], chunks: list[torch.Tensor]
) -> Iterator[list[torch.Tensor]]:
    for idx in chunks:
        yield [t[idx] for t in tensors]


def _loader_batches(loader: DataLoader) -> Iterator[Any]:
    yield from loader


@dataclasses.dataclass(frozen=True, eq=False)
class MapSource:
    """Batches of a map-style dataset in a deterministic, sharded, resumable order.

    The order of epoch ``e`` is ``shard(epoch_order(len(dataset), seed=seed, epoch=e,
    shuffle=shuffle), rank=rank, world_size=world_size)`` cut into batches of ``batch_size``
    (``drop_last`` drops this rank's last incomplete batch; ``shard_drop_last`` drops the tail
    that does not divide by ``world_size`` instead of padding by wrap-around). Samples are
    loaded through a ``DataLoader`` with a ``batch_sampler``, so ``num_workers``, ``pin_memory``
    and ``collate_fn`` work as usual; its worker seed comes from ``mix_seed(seed, epoch, rank)``
    and not from the global RNG. A ``TensorDataset`` with the default collate and no workers
    is indexed directly (``t[idx]``), which gives the same values much faster.

    Random transforms inside ``__getitem__`` are outside this order: they resume exactly only
    if they draw from a seed of their own (e.g. the sample index).

    Args:
        dataset: object with ``__len__`` and ``__getitem__``.
        batch_size: samples per batch (>= 1).
        shuffle: permute the samples every epoch.
        drop_last: drop the last incomplete batch.
        collate_fn: list of samples -> batch (default ``default_collate``).
        seed: the run seed.
        rank: this process's rank.
        world_size: number of processes.
        num_workers: ``DataLoader`` worker processes.
        pin_memory: ``DataLoader`` ``pin_memory``.
        shard_drop_last: ``shard(drop_last=...)``.
        loader_kwargs: more ``DataLoader`` options (``worker_init_fn``, ``timeout``...).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> src = MapSource(TensorDataset(torch.arange(10)), batch_size=3, shuffle=True, seed=1)
        >>> [b[0].tolist() for b in src.batches(0, start=3)] == [b[0].tolist() for b in src.batches(0)][3:]
        True
    """

    dataset: Any
    _: dataclasses.KW_ONLY
    batch_size: int = 1
    shuffle: bool = False
    drop_last: bool = False
    collate_fn: Callable[[list[Any]], Any] | None = None
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    pin_memory: bool = False
    shard_drop_last: bool = False
    loader_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    resumable = True

    def __post_init__(self) -> None:
        if not (hasattr(self.dataset, "__len__") and hasattr(self.dataset, "__getitem__")):
            raise ConfigError(
                f"MapSource: dataset of type {type(self.dataset).__name__} is not map-style (it needs "
                "__len__ and __getitem__); wrap an iterable of batches in IterableSource instead."
            )
        for name in ("batch_size", "world_size", "rank", "num_workers", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"MapSource: {name} must be an int, got {value!r}.")
        if self.batch_size < 1:
            raise ConfigError(f"MapSource: batch_size must be >= 1, got {self.batch_size}.")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"MapSource: need world_size >= 1 and 0 <= rank < world_size, got rank={self.rank}, "
                f"world_size={self.world_size}."
            )
        if self.num_workers < 0:
            raise ConfigError(f"MapSource: num_workers must be >= 0, got {self.num_workers}.")

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, in order (int64).

        Example:
            >>> MapSource(list(range(5)), world_size=2, rank=1).indices(0)
            tensor([1, 3, 0])
        """
        order = epoch_order(len(self.dataset), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        return shard(order, rank=self.rank, world_size=self.world_size, drop_last=self.shard_drop_last)

    def batch_indices(self, epoch: int) -> list[torch.Tensor]:
        """This rank's batches of ``epoch`` as index tensors.

        Example:
            >>> [b.tolist() for b in MapSource(list(range(5)), batch_size=2).batch_indices(0)]
            [[0, 1], [2, 3], [4]]
        """
        indices = self.indices(epoch)
        if indices.numel() == 0:
            return []
        chunks = list(torch.split(indices, self.batch_size))
        if self.drop_last and chunks and chunks[-1].numel() < self.batch_size:
            chunks.pop()
        return chunks

    def num_batches(self, epoch: int) -> int:
        """Batches per epoch on this rank (the same on every rank).

        Example:
            >>> MapSource(list(range(5)), batch_size=2, drop_last=True).num_batches(0)
            2
        """
        n = len(self.dataset)
        per_rank = n // self.world_size if self.shard_drop_last else math.ceil(n / self.world_size)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """The batches of ``epoch`` from batch index ``start`` on; skipped samples are never read.

        Example:
            >>> src = MapSource(list(range(5)), batch_size=2)
            >>> [b.tolist() for b in src.batches(0, start=1)]
            [[2, 3], [4]]
        """
        chunks = self.batch_indices(epoch)[_check_start(start):]
        if (
            type(self.dataset) is TensorDataset
            and self.collate_fn in (None, default_collate)
            and self.num_workers == 0
            and not self.pin_memory
        ):
            return _tensor_batches(self.dataset.tensors, chunks)
        generator = torch.Generator()
        generator.manual_seed(mix_seed(self.seed, epoch, self.rank))
        loader = DataLoader(
            self.dataset,
            batch_sampler=[c.tolist() for c in chunks],
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
            **dict(self.loader_kwargs),
        )
        return _loader_batches(loader)

    def batch_size_of(self, batch: Any) -> int:
        """Samples in ``batch`` (see :func:`batch_size_of`).

        Example:
            >>> import torch
            >>> MapSource([0]).batch_size_of(torch.zeros(3))
            3
        """
        return batch_size_of(batch)


class IterableSource:
    """Any re-iterable of batches: a list of batches, a ``DataLoader`` over an ``IterableDataset``...

    Each epoch calls ``iter(iterable)`` again. A ``Sequence`` (list, tuple) is resumable by
    indexing; any other iterable resumes at batch ``start`` by reading and discarding the
    ``start`` batches before it, and warns once per source with a :class:`ResumeWarning`. The
    source does no sharding: with several processes the iterable must give each rank its own
    data. A one-shot iterator (a generator, ``iter(x)``) is rejected with a ``ConfigError``
    because a second epoch would silently be empty: pass ``list(gen)`` or a re-iterable.

    Args:
        iterable: the batches.
        name: how error and warning messages call this data (``"train_data"``).

    Example:
        >>> src = IterableSource([[1, 2], [3, 4], [5]])
        >>> src.resumable, src.num_batches(0), list(src.batches(0, start=1))
        (True, 3, [[3, 4], [5]])
    """

    def __init__(self, iterable: Iterable[Any], *, name: str = "data") -> None:
        if isinstance(iterable, Iterator):
            raise ConfigError(
                f"{name} is a one-shot iterator ({type(iterable).__name__}): it is exhausted after one "
                "epoch. Pass a re-iterable instead: a list of batches (list(it)), a map-style Dataset, a "
                "DataLoader, or an object whose __iter__ returns a fresh iterator."
            )
        if not isinstance(iterable, Iterable) or isinstance(iterable, (str, bytes, Mapping)):
            raise ConfigError(
                f"{name} of type {type(iterable).__name__} is not an iterable of batches; pass a list of "
                "batches, a DataLoader or any re-iterable."
            )
        self.iterable = iterable
        self.name = name
        self.resumable = isinstance(iterable, Sequence)
        self._warned = False

    def __repr__(self) -> str:
        kind = type(self.iterable).__name__
        return f"IterableSource({kind}, name={self.name!r}, resumable={self.resumable})"

    def num_batches(self, epoch: int) -> int | None:
        """``len(iterable)``, or None when it has no length.

        Example:
            >>> IterableSource(range(3)).num_batches(0), IterableSource({1, 2}).num_batches(0)
            (3, 2)
        """
        try:
            return len(self.iterable)  # type: ignore[arg-type]
        except (TypeError, NotImplementedError):
            return None

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """The batches of one pass from index ``start`` on (re-reading earlier ones if it must).

        Example:
            >>> list(IterableSource(((1,), (2,))).batches(0, start=1))
            [(2,)]
        """
        start = _check_start(start)
        if self.resumable:
            seq: Sequence[Any] = self.iterable  # type: ignore[assignment]
            return (seq[i] for i in range(start, len(seq)))
        if start > 0 and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.name} ({type(self.iterable).__name__}) cannot resume mid-epoch exactly: to start "
                f"epoch {epoch} at batch {start}, batches 0 to {start - 1} are read again and discarded "
                "(not trained on twice); if the iterable does not give the same batches in the same order "
                "on every pass, the resumed epoch differs from the interrupted one. To resume exactly, "
                "pass a map-style Dataset (with __len__ and __getitem__) or a list of batches.",
                ResumeWarning,
                stacklevel=2,
            )
        return itertools.islice(iter(self.iterable), start, None)

    def batch_size_of(self, batch: Any) -> int:
        """Samples in ``batch`` (see :func:`batch_size_of`).

        Example:
            >>> import torch
            >>> IterableSource([]).batch_size_of((torch.zeros(2, 5), torch.zeros(2)))
            2
        """
        return batch_size_of(batch)
