"""Recompute the BatchNorm running statistics of a state with one pass over data, as
``torch.optim.swa_utils.update_bn`` does for a module: after weight averaging, the running
statistics collected along the way belong to no weights the model has.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    >>> state = fl.TrainState.create(model, flo.sgd(lr=0.1))
    >>> new = fl.update_bn(state, [torch.randn(8, 3) for _ in range(3)])
    >>> int(new.buffers["1.num_batches_tracked"]), int(state.buffers["1.num_batches_tracked"])
    (3, 0)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from fnloop.bind import bind
from fnloop.errors import ConfigError

__all__ = ["update_bn", "batch_norm_names", "default_bn_forward"]


def batch_norm_names(module: torch.nn.Module) -> list[str]:
    """Names (as in ``named_modules``) of the BatchNorm layers of ``module`` that keep running
    statistics.

    Example:
        >>> import torch
        >>> batch_norm_names(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
        ['1']
    """
    return [n for n, m in module.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def default_bn_forward(model: Any, batch: Any) -> Any:
    """torch's rule: call the model on the batch, or on its first element when it is a list or a tuple.

    Example:
        >>> default_bn_forward(len, ([1, 2, 3], "label"))
        3
    """
    return model(batch[0] if isinstance(batch, (list, tuple)) else batch)


def _reset(buffers: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """New buffers with the statistics of the layers ``names`` reset (``reset_running_stats``)."""
    out = dict(buffers)
    for name in names:
        prefix = f"{name}." if name else ""
        out[prefix + "running_mean"] = torch.zeros_like(buffers[prefix + "running_mean"])
        out[prefix + "running_var"] = torch.ones_like(buffers[prefix + "running_var"])
        if prefix + "num_batches_tracked" in buffers:
            out[prefix + "num_batches_tracked"] = torch.zeros_like(buffers[prefix + "num_batches_tracked"])
    return out


def update_bn(
    state: Any,
    data: Any,
    /,
    *,
    forward: Callable[[Any, Any], Any] | None = None,
    epoch: int = 0,
) -> Any:
    """``state`` with the running statistics of its BatchNorm layers recomputed: reset
    (mean 0, variance 1, count 0), then one pass over ``data`` in train mode with
    ``momentum=None``, so each statistic is the plain average over the batches
    (``torch.optim.swa_utils.update_bn``). Pure: ``state`` and its template are untouched; a state
    without such layers comes back as it is.

    Args:
        state: a :class:`fnloop.TrainState`.
        data: what ``Trainer.fit`` accepts as data (a list of batches, a DataLoader, a
            DataSource, ...); its batches go to the params' device.
        forward: ``forward(model, batch)`` runs the model (bound to the state's weights) on a
            batch; default: torch's rule, ``model(batch[0])`` for a tuple or list, else ``model(batch)``.
        epoch: the epoch whose order a shuffled source follows.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> state = fl.TrainState.create(torch.nn.BatchNorm1d(2), flo.sgd(lr=0.1))
        >>> fl.update_bn(state, [(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), None)]).buffers["running_mean"]
        tensor([2., 0.])
    """
    from fnloop import execution, rng
    from fnloop.connectors.data import as_source
    from fnloop.connectors.device import device_of
    from fnloop.loops.data import batches_on
    from fnloop.loops.ranks import params_dtype

    if forward is not None and not callable(forward):
        raise ConfigError(f"update_bn(forward={forward!r}): expected a function (model, batch) -> output")
    execution.check_state(state, "update_bn")
    names = batch_norm_names(state.module)
    if not names:
        return state
    buffers = _reset(state.buffers, names)
    work = copy.deepcopy(state.module).train()  # a private copy (meta tensors): the template stays as it is
    for name in names:
        work.get_submodule(name).momentum = None  # a cumulative average
    source = as_source(data, seed=int(state.rng), name="update_bn(data)")
    run = forward or default_bn_forward
    device, dtype = device_of(state.params), params_dtype(state)
    seeded = rng.seeded(execution.state_seed(state.rng, state.step), execution.cuda_devices(state.params))
    with torch.no_grad(), seeded, bind(work, state.params, buffers) as model:
        for batch in batches_on(source, epoch, 0, None, device, dtype):
            run(model, batch)
    return state.replace(buffers=buffers)
