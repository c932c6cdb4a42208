"""Several evaluation or prediction loaders: which ones, their names, and the step of each.

``validate``/``test``/``predict`` (and ``fit``'s ``val_data``) accept one loader, a list or
tuple of loaders (DataLoaders, Datasets or :class:`fnloop.connectors.data.DataSource`), or a
dict of any data keyed by name. With several, each runs in turn with its own batch limit, and
every metric name gets a suffix, as Lightning names them:

* a list: ``val/loss/dataloader_idx_0``, ``val/loss/dataloader_idx_1``, ...;
* a dict: ``val/loss/<key>`` (``{"clean": ..., "noisy": ...}`` -> ``val/loss/noisy``).

The step may be one step for every loader, or a list/dict of steps matching the loaders: each
step then knows its ``dataloader_idx`` (its position). Batch hooks receive ``dataloader_idx``.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> ds = TensorDataset(torch.zeros(4, 1))
    >>> [name for name, _ in split_loaders([DataLoader(ds), DataLoader(ds)])]
    ['dataloader_idx_0', 'dataloader_idx_1']
    >>> [name for name, _ in split_loaders({"a": [1, 2]})], split_loaders([(1, 2)])[0][0] is None
    (['a'], True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import DataLoader, Dataset

from fnloop.connectors.data import DataSource
from fnloop.errors import ConfigError

__all__ = ["split_loaders", "suffixed", "step_for"]


def _is_loader(item: Any) -> bool:
    return isinstance(item, (DataLoader, Dataset, DataSource))


def split_loaders(data: Any) -> list[tuple[str | None, Any]]:
    """``[(name, data)]``: one entry named None for a single loader, a named entry per loader
    for a dict or a list of loaders."""
    if isinstance(data, Mapping):
        if not data:
            raise ConfigError("the data is an empty dict: give one loader, or a dict of loaders keyed by name")
        return [(str(key), value) for key, value in data.items()]
    if isinstance(data, (list, tuple)) and data and all(_is_loader(item) for item in data):
        return [(f"dataloader_idx_{i}", item) for i, item in enumerate(data)]
    return [(None, data)]


def suffixed(metrics: Mapping[str, Any], name: str | None) -> dict[str, Any]:
    """Metric names with the loader's name appended (``val/loss`` -> ``val/loss/dataloader_idx_1``).

    Example:
        >>> suffixed({"val/loss": 1.0}, "noisy"), suffixed({"val/loss": 1.0}, None)
        ({'val/loss/noisy': 1.0}, {'val/loss': 1.0})
    """
    if name is None:
        return dict(metrics)
    return {f"{k}/{name}": v for k, v in metrics.items()}


def step_for(step: Any, loaders: list[tuple[str | None, Any]], idx: int, *, what: str) -> Any:
    """The step of loader ``idx``: ``step`` itself, or its entry when it is a list/dict of steps.

    Example:
        >>> step_for(["s0", "s1"], [("dataloader_idx_0", 0), ("dataloader_idx_1", 1)], 1, what="val_step")
        's1'
    """
    if isinstance(step, Mapping):
        names = [name for name, _ in loaders]
        if sorted(map(str, step)) != sorted(n for n in names if n is not None):
            raise ConfigError(
                f"{what}: a dict of steps needs one step per loader; steps for {sorted(map(str, step))}, "
                f"loaders {names}"
            )
        return {str(k): v for k, v in step.items()}[loaders[idx][0]]  # type: ignore[index]
    if isinstance(step, (list, tuple)):
        if len(step) != len(loaders):
            raise ConfigError(f"{what}: {len(step)} steps for {len(loaders)} loaders; give one step per loader, or one step")
        return step[idx]
    return step
