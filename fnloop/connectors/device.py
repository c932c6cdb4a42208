"""Device placement: pure functions from trees (batches, states) and a device to trees, and the
resolution of Lightning's ``accelerator`` / ``devices`` flags to this process's device.

Example:
    >>> import torch, fnloop as fl
    >>> fl.to_device({"x": torch.ones(1)}, "cpu")["x"].device.type
    'cpu'
    >>> resolve_accelerator("auto") in ("cpu", "cuda", "mps")
    True
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from fnloop.errors import ConfigError
from fnloop.tree import tree_map

__all__ = ["to_device", "device_of", "ACCELERATORS", "resolve_accelerator", "parse_devices", "process_device", "state_to_device"]

ACCELERATORS: tuple[str, ...] = ("auto", "cpu", "cuda", "gpu", "mps")


def _move(x: Any, device: torch.device, non_blocking: bool) -> Any:
    if not isinstance(x, torch.Tensor) or x.device == device:
        return x
    if non_blocking and device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()  # a pinned host copy lets the transfer overlap with compute
    return x.to(device, non_blocking=non_blocking)


def to_device(tree: Any, device: torch.device | str, *, non_blocking: bool | None = None) -> Any:
    """Every tensor leaf of ``tree`` on ``device`` (leaves already there are returned as they are).

    ``non_blocking`` defaults to True for a copy from the CPU to a CUDA device, whose source is
    then pinned first (a no-op for a tensor the DataLoader already pinned), so the copy overlaps
    with the work queued before it; it is never needed elsewhere.

    Example:
        >>> import torch, fnloop as fl
        >>> fl.to_device((torch.ones(1), 3), "cpu")[1]
        3
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    nb = device.type == "cuda" if non_blocking is None else non_blocking
    return tree_map(lambda x: _move(x, device, nb), tree)


def state_to_device(state: Any, device: torch.device | str) -> Any:
    """``state`` with its params, buffers and optimizer state on ``device``; the step counter and
    the key stay on the CPU (host-side counters, read without a device sync).

    Example:
        >>> s = fl.TrainState.create(torch.nn.Linear(2, 1), flo.adam(lr=0.1))
        >>> state_to_device(s, "cpu") is s
        True
    """
    device = torch.device(device)
    if device_of(state.params) == device:
        return state
    # 0-d optimizer scalars (counters, learning rates) stay host-side, as torch.optim keeps `step`
    moved = tree_map(lambda x: x if isinstance(x, torch.Tensor) and x.dim() == 0 else _move(x, device, False), state.opt_state)
    return state.replace(params=to_device(state.params, device, non_blocking=False), buffers=to_device(state.buffers, device, non_blocking=False), opt_state=moved)


def device_of(params: Any) -> torch.device:
    """The device of the first tensor in ``params`` (CPU when there is none)."""
    for p in params.values() if isinstance(params, dict) else []:
        return p.device
    return torch.device("cpu")


def resolve_accelerator(accelerator: Any) -> str:
    """``"cpu"``, ``"cuda"`` or ``"mps"`` for an ``accelerator`` flag (``"auto"``: CUDA, then MPS,
    then CPU; ``"gpu"``: CUDA or MPS). A ConfigError when it is unknown or not available here."""
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"Trainer(accelerator={accelerator!r}): accepted values are {', '.join(map(repr, ACCELERATORS))}")
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else ("mps" if mps else "cpu")
    if accelerator == "gpu":
        accelerator = "cuda" if torch.cuda.is_available() or not mps else "mps"
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ConfigError("Trainer(accelerator='cuda'): no CUDA device is available in this process; use accelerator='cpu' or 'auto'")
    if accelerator == "mps" and not mps:
        raise ConfigError("Trainer(accelerator='mps'): MPS is not available on this machine; use accelerator='cpu' or 'auto'")
    return str(accelerator)


def parse_devices(devices: Any, accelerator: str) -> list[int] | int:
    """The ``devices`` flag as a list of device indices (CUDA, MPS) or a process count (CPU).

    ``"auto"``: every CUDA device, else 1; an int ``n``: ``n`` devices (``-1``: all); a list:
    those indices; a string of an int or of a comma-separated list is read as such.

    Example:
        >>> parse_devices(2, "cpu"), parse_devices("auto", "cpu"), parse_devices("3", "cpu")
        (2, 1, 3)
    """
    bad = ConfigError(
        f"Trainer(devices={devices!r}): accepted values are 'auto', an int >= 1 (or -1: all), or a non-empty list of device indices"
    )
    if isinstance(devices, str) and devices != "auto":
        text = devices.strip()
        try:
            devices = [int(t) for t in text.strip("[]").split(",") if t.strip()] if ("," in text or "[" in text) else int(text)
        except ValueError:
            raise bad from None
    available = torch.cuda.device_count() if accelerator == "cuda" else 1
    if devices == "auto":
        return list(range(available)) if accelerator == "cuda" else 1
    if isinstance(devices, bool):
        raise bad
    if isinstance(devices, numbers.Integral):
        if devices == -1:
            devices = available
        if devices < 1:
            raise bad
        return list(range(int(devices))) if accelerator != "cpu" else int(devices)
    if isinstance(devices, (list, tuple)) and devices and all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0 for d in devices):
        return [int(d) for d in devices] if accelerator != "cpu" else len(devices)
    raise bad


def process_device(accelerator: str, devices: list[int] | int, local_rank: int) -> torch.device:
    """This process's device: ``cuda:devices[local_rank]``, ``mps`` or ``cpu``."""
    if accelerator == "cuda":
        index = devices[local_rank] if isinstance(devices, list) and local_rank < len(devices) else local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(f"Trainer(devices=...): CUDA device {index} does not exist here ({torch.cuda.device_count()} visible)")
        return torch.device("cuda", index)
    return torch.device(accelerator)
