"""Run a template module with a state's params and buffers, without touching either.

``TrainState.module`` is a structural copy of the user's module on the meta device, and it is
never changed. A step binds the state's tensors into :func:`working_copy` of it (one per thread
and train/eval mode) for the duration of one call and puts the meta tensors back after, so two
threads stepping states that share a template never see each other's weights or mode.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
    >>> with fl.bind(state.module, state.params, state.buffers) as model:
    ...     out = model(torch.ones(3, 2))
    >>> out.shape
    torch.Size([3, 1])
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["Bound", "bind", "slots", "working_copy"]

# (owner module, attribute name, "_parameters" | "_buffers", key in params/buffers)
Slot = tuple[torch.nn.Module, str, str, str]
_SLOTS: weakref.WeakKeyDictionary[torch.nn.Module, list[Slot]] = weakref.WeakKeyDictionary()


def slots(module: torch.nn.Module) -> list[Slot]:
    """Where every parameter and buffer of ``module`` lives (tied weights map to one key)."""
    cached = _SLOTS.get(module)
    if cached is not None:
        return cached
    out: list[Slot] = []
    for kind, named in (("_parameters", module.named_parameters), ("_buffers", module.named_buffers)):
        canonical: dict[int, str] = {}
        for name, tensor in named(remove_duplicate=False):
            key = canonical.setdefault(id(tensor), name)
            owner_name, _, attr = name.rpartition(".")
            out.append((module.get_submodule(owner_name), attr, kind, key))
    _SLOTS[module] = out
    return out


_LOCAL = threading.local()


def working_copy(template: torch.nn.Module, training: bool) -> torch.nn.Module:
    """This thread's copy of ``template`` in train (``training=True``) or eval mode.

    Steps bind weights into the copy, never into ``template``; the copy holds meta tensors between
    calls, so it costs no weight memory. Made once per template, thread and mode.

    Example:
        >>> import torch
        >>> t = torch.nn.Dropout(0.5)
        >>> c = working_copy(t, False)
        >>> c is not t, c.training, t.training, working_copy(t, False) is c
        (True, False, True, True)
    """
    copies = getattr(_LOCAL, "copies", None)
    if copies is None:
        copies = _LOCAL.copies = weakref.WeakKeyDictionary()
    pair = copies.get(template)
    if pair is None:
        pair = copies[template] = [None, None]
    work = pair[training]
    if work is None:
        work = pair[training] = copy.deepcopy(template).train(training)
    return work


class Bound:
    """The module bound to a state's tensors: callable like the module, plus ``.params`` and
    ``.buffers``; other attributes come from the module (submodules run bound too)."""

    def __init__(self, module: torch.nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]):
        self.module = module
        self.params = params
        self.buffers = buffers

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


@contextlib.contextmanager
def bind(
    module: torch.nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]
) -> Iterator[Bound]:
    """Bind ``params`` and ``buffers`` into ``module`` inside the ``with`` block.

    Example:
        >>> import torch, fnloop as fl
        >>> m = torch.nn.Linear(1, 1, device="meta")
        >>> with fl.bind(m, {"weight": torch.ones(1, 1), "bias": torch.zeros(1)}, {}) as model:
        ...     model(torch.full((1, 1), 2.0))
        tensor([[2.]])
    """
    table = slots(module)
    saved = [owner.__dict__[kind][attr] for owner, attr, kind, _ in table]
    try:
        for owner, attr, kind, key in table:
            owner.__dict__[kind][attr] = (params if kind == "_parameters" else buffers)[key]
        yield Bound(module, params, buffers)
    finally:
        for (owner, attr, kind, _), tensor in zip(table, saved):
            owner.__dict__[kind][attr] = tensor
