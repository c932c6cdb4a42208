"""Rank sharding of every kind of data: disjoint shares (apart from padding) that together cover
the data, the same batch count on every rank, and a clear error for what cannot be split."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import fnloop as fl
from fnloop.connectors.data import as_source
from fnloop.connectors.data_shard import ShardedIterableSource, shard_source
from fnloop.connectors.strategy import Parallel
from fnloop.loops.data import make_source


class Sized:
    """A re-iterable with a length that is not a Sequence."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(range(self.n))


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(10))


def _all(source, epoch=0):
    return [b if isinstance(b, int) else b[0].tolist() for b in source.batches(epoch)]


@pytest.mark.parametrize("data", [list(range(7)), Sized(7), tuple(range(8))], ids=["list", "sized", "tuple"])
@pytest.mark.parametrize("world", [2, 3])
def test_iterables_shard_with_equal_counts(data, world):
    shares = [shard_source(as_source(data), rank=r, world_size=world) for r in range(world)]
    counts = {s.num_batches(0) for s in shares}
    assert counts == {-(-len(data) // world)}
    seen = [b for s in shares for b in _all(s)]
    assert sorted(set(seen)) == list(range(len(data)))  # every batch, the padding wraps around
    assert len(seen) == len(shares) * counts.pop()
    assert all(isinstance(s, ShardedIterableSource) for s in shares)


def test_sharded_iterable_resumes_mid_epoch():
    share = shard_source(as_source(list(range(9))), rank=1, world_size=2)
    assert list(share.batches(0)) == [1, 3, 5, 7, 0]
    assert list(share.batches(0, start=3)) == [7, 0]


def test_map_sources_shard_like_distributed_sampler():
    ds = TensorDataset(torch.arange(11))
    loader = DataLoader(ds, batch_size=2, shuffle=True)
    shares = [make_source(loader, seed=3, stage="train", parallel=Parallel(rank=r, world_size=2)) for r in range(2)]
    assert [s.num_batches(0) for s in shares] == [3, 3]
    indices = [i for s in shares for b in _all(s) for i in b]
    assert sorted(set(indices)) == list(range(11)) and len(indices) == 12  # one sample padded


def test_unsized_iterable_cannot_be_sharded_silently():
    with pytest.raises(fl.ConfigError, match="no length.*use_distributed_sampler=False"):
        make_source(DataLoader(Stream(), batch_size=2), seed=0, stage="train", parallel=Parallel(rank=0, world_size=2))
    # the user shards it: nothing is changed
    src = make_source(DataLoader(Stream(), batch_size=2), seed=0, stage="train", parallel=Parallel(rank=0, world_size=2), shard=False)
    assert len(list(src.batches(0))) == 5


def test_a_single_process_reads_everything():
    src = make_source(list(range(5)), seed=0, stage="train", parallel=Parallel())
    assert list(src.batches(0)) == [0, 1, 2, 3, 4]
