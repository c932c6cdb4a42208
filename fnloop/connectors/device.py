"""Device placement of batches: a pure function from a tree and a device to a tree."""

from __future__ import annotations

from typing import Any

import torch

from fnloop.tree import tree_map

__all__ = ["to_device", "device_of"]


def to_device(tree: Any, device: torch.device | str, *, non_blocking: bool = False) -> Any:
    """Every tensor leaf of ``tree`` on ``device`` (leaves already there are returned as they are).

    Example:
        >>> import torch, fnloop as fl
        >>> fl.to_device({"x": torch.ones(1)}, "cpu")["x"].device.type
        'cpu'
    """
    device = torch.device(device)
    return tree_map(lambda x: x.to(device, non_blocking=non_blocking) if isinstance(x, torch.Tensor) else x, tree)


def device_of(params: Any) -> torch.device:
    """The device of the first tensor in ``params`` (CPU when there is none)."""
    for p in params.values() if isinstance(params, dict) else []:
        return p.device
    return torch.device("cpu")
