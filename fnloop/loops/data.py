"""Resolving the data a loop runs over: sources, batch limits, device placement."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import torch

from fnloop.connectors.data import MapSource, as_source, limit_batches
from fnloop.connectors.data_shard import shard_source
from fnloop.connectors.datamodule import resolve_datamodule
from fnloop.connectors.device import to_device
from fnloop.connectors.precision import cast_batch
from fnloop.errors import ConfigError

__all__ = ["stage_data", "make_source", "limited", "batches_on", "data_seed"]

_STAGE_KEYS = {"train": "train_data", "val": "val_data", "test": "test_data", "predict": "predict_data"}
_DM_STAGE = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}


def data_seed(seed: int | None, state: Any) -> int:
    """The seed the data order derives from: ``Trainer(seed=...)`` or the state's RNG key (of
    member 0 for a stacked state: every member sees the same batches).

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> data_seed(None, fl.TrainState.create(torch.nn.Linear(1, 1), flo.sgd(lr=0.1), seed=7)), data_seed(3, None)
        (7, 3)
    """
    return int(seed) if seed is not None else int(state.rng.reshape(-1)[0])  # a stacked state: member 0's


def stage_data(data: Any, datamodule: Any, stage: str, *, fit: bool = False) -> Any:
    """``data`` if given, else the datamodule's data for ``stage``."""
    if data is not None or datamodule is None:
        return data
    resolved = resolve_datamodule(datamodule, "fit" if fit else _DM_STAGE[stage])
    return resolved.get(_STAGE_KEYS[stage])


def make_source(data: Any, *, seed: int, stage: str, no_shuffle: bool = False, parallel: Any = None, shard: bool = True) -> Any:
    """A data source for ``data`` (see :func:`fnloop.connectors.data.as_source`), this rank's
    share of it in a distributed run (unless ``shard=False``: ``use_distributed_sampler``)."""
    source = as_source(data, seed=seed, name=_STAGE_KEYS[stage])
    if no_shuffle and isinstance(source, MapSource) and source.shuffle:
        source = dataclasses.replace(source, shuffle=False)
    if parallel is not None and parallel.distributed and shard:
        source = shard_source(source, rank=parallel.rank, world_size=parallel.world_size)
    return source


def limited(source: Any, epoch: int, limit: Any, stage: str) -> int | None:
    """Batches of ``epoch`` to run under the stage's ``limit_*_batches``."""
    return limit_batches(source.num_batches(epoch), limit, flag=f"limit_{stage}_batches")


def batches_on(
    source: Any, epoch: int, start: int, stop: int | None, device: torch.device, dtype: torch.dtype | None = None
) -> Iterator[Any]:
    """Batches ``start..stop`` of the epoch, moved to ``device`` when they are elsewhere (and
    their floating tensors cast to ``dtype``, the params' dtype under a ``*-true`` precision)."""
    it = source.batches(epoch, start)
    if stop is not None:
        it = itertools.islice(it, max(0, stop - start))
    for batch in it:
        batch = _place(batch, device)
        yield batch if dtype in (None, torch.float32) else cast_batch(batch, dtype)


def _place(batch: Any, device: torch.device) -> Any:
    first = batch if isinstance(batch, torch.Tensor) else None
    if first is None:
        for leaf in _first_leaves(batch):
            first = leaf
            break
    if first is None or first.device == device:
        return batch
    return to_device(batch, device)


def _first_leaves(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (list, tuple)):
        for b in batch:
            yield from _first_leaves(b)
    elif isinstance(batch, dict):
        for b in batch.values():
            yield from _first_leaves(b)


def require(value: Any, what: str, hint: str) -> Any:
    """``value``, or a ConfigError naming what is missing."""
    if value is None:
        raise ConfigError(f"{what} is missing: {hint}")
    return value
