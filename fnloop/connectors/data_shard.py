"""Rank sharding of any data source: every rank reads its own part, with the same batch count.

* A :class:`MapSource` shards its epoch order (``DistributedSampler``'s rule: pad by wrapping).
* An :class:`IterableSource` with a length (a list of batches, a sized re-iterable) becomes a
  :class:`ShardedIterableSource`: rank ``r`` takes batches ``r, r + world, ...`` and the last ones
  wrap around to the first, so every rank runs ``ceil(n / world)`` batches.
* An iterable without a length cannot give every rank the same count: a ConfigError says what
  to pass instead (never silently duplicated data).

Example:
    >>> from fnloop.connectors.data_sources import IterableSource
    >>> src = shard_source(IterableSource([0, 1, 2, 3, 4]), rank=1, world_size=2)
    >>> src.num_batches(0), list(src.batches(0))
    (3, [1, 3, 0])
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

from fnloop.connectors.data_sources import IterableSource, MapSource, batch_size_of
from fnloop.errors import ConfigError

__all__ = ["ShardedIterableSource", "shard_source"]


class ShardedIterableSource:
    """One rank's share of a sized :class:`IterableSource`: batches ``rank::world_size`` of each
    pass, padded by wrapping to ``ceil(n / world_size)`` batches."""

    def __init__(self, source: IterableSource, *, rank: int, world_size: int) -> None:
        self.source = source
        self.rank = rank
        self.world_size = world_size
        self.resumable = source.resumable
        self.name = source.name

    def __repr__(self) -> str:
        return f"ShardedIterableSource({self.source!r}, rank={self.rank}, world_size={self.world_size})"

    def num_batches(self, epoch: int) -> int:
        n = self.source.num_batches(epoch)
        assert n is not None
        return math.ceil(n / self.world_size)

    def _indices(self, epoch: int) -> list[int]:
        n = self.source.num_batches(epoch) or 0
        total = self.num_batches(epoch) * self.world_size
        return [i % n for i in range(self.rank, total, self.world_size)] if n else []

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        wanted = self._indices(epoch)[start:]
        if isinstance(self.source.iterable, Sequence):
            seq = self.source.iterable
            return (seq[i] for i in wanted)
        return _pick(self.source, epoch, wanted)

    def batch_size_of(self, batch: Any) -> int:
        return batch_size_of(batch)


def _pick(source: IterableSource, epoch: int, wanted: list[int]) -> Iterator[Any]:
    """The batches at ``wanted`` positions of a pass, in order; the wrapped ones (positions
    lower than the first) from a second pass."""
    if not wanted:
        return
    split = next((j for j in range(1, len(wanted)) if wanted[j] < wanted[j - 1]), len(wanted))
    for part in (wanted[:split], wanted[split:]):
        if part:
            keep = set(part)
            for i, batch in zip(itertools.count(), source.batches(epoch)):
                if i in keep:
                    yield batch
                if i >= part[-1]:
                    break


def shard_source(source: Any, *, rank: int, world_size: int) -> Any:
    """``source`` as rank ``rank`` of ``world_size`` reads it (``source`` itself when alone).

    Raises:
        ConfigError: an iterable without a length (it cannot be split into equal shares).
    """
    if world_size == 1:
        return source
    if isinstance(source, MapSource):
        return dataclasses.replace(source, rank=rank, world_size=world_size)
    if isinstance(source, IterableSource):
        if source.num_batches(0) is None:
            raise ConfigError(
                f"{source.name}: {type(source.iterable).__name__} has no length, so it cannot be sharded across "
                f"{world_size} ranks with the same number of batches each. Pass a map-style Dataset (or a DataLoader "
                "over one), a list of batches, or shard it yourself (one part per rank, equal lengths) and set "
                "Trainer(use_distributed_sampler=False)"
            )
        return ShardedIterableSource(source, rank=rank, world_size=world_size)
    raise ConfigError(
        f"{type(source).__name__}: a custom DataSource is not sharded by fnloop; shard it by rank yourself and set "
        "Trainer(use_distributed_sampler=False)"
    )
