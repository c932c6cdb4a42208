"""Connectors: stateless functions and frozen configs between the driver and the outside world.

The data connector's public names are re-exported here; see :mod:`fnloop.connectors.data`.
"""

from __future__ import annotations

from fnloop.connectors.data import (
    DataModule,
    DataSource,
    IterableSource,
    MapSource,
    ResumeWarning,
    as_source,
    batch_size_of,
    epoch_order,
    from_dataloader,
    limit_batches,
    mix_seed,
    resolve_datamodule,
    shard,
)

__all__ = [
    "DataModule",
    "DataSource",
    "IterableSource",
    "MapSource",
    "ResumeWarning",
    "as_source",
    "batch_size_of",
    "epoch_order",
    "from_dataloader",
    "limit_batches",
    "mix_seed",
    "resolve_datamodule",
    "shard",
]
from fnloop.connectors import signals as signals  # noqa: E402
