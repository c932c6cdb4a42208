"""Reduce the learning rate when a monitored metric stops improving: ``torch.optim.lr_scheduler.
ReduceLROnPlateau`` as a transform whose state (current LR, best value, counters and its own
settings) lives in the optimizer state, stepped by a pure function of that state and the metric.

Chain it last, after an optimizer built with the same ``lr``: it scales the updates by
``current_lr / lr``, which for every fnloop optimizer equals running it at ``current_lr``.
:func:`plateau_step` feeds it one metric value (the :class:`fnloop.ReduceLROnPlateau` callback
does this after each validation run); :func:`plateau_lr` reads the LR in force.

Example:
    >>> import torch, fnloop.optim as flo
    >>> tx = flo.chain(flo.sgd(lr=0.1), flo.reduce_on_plateau(0.1, factor=0.5, patience=0))
    >>> opt_state = tx.init({"w": torch.zeros(1)})
    >>> for loss in [1.0, 2.0]:
    ...     opt_state = flo.plateau_step(opt_state, loss)
    >>> flo.plateau_lr(opt_state)
    tensor(0.0500, dtype=torch.float64)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from fnloop.errors import ConfigError
from fnloop.optim.base import GradientTransformation

__all__ = ["PlateauConfig", "PlateauState", "reduce_on_plateau", "plateau_step", "plateau_lr"]


class PlateauConfig(NamedTuple):
    """The settings, as 0-d tensors (so the state alone defines the next step)."""

    lr: Tensor
    factor: Tensor
    patience: Tensor
    threshold: Tensor
    relative: Tensor
    maximize: Tensor
    cooldown: Tensor
    min_lr: Tensor
    eps: Tensor


class PlateauState(NamedTuple):
    """The LR in force, the best value seen, torch's counters, and the settings."""

    current_lr: Tensor
    best: Tensor
    num_bad_epochs: Tensor
    cooldown_counter: Tensor
    config: PlateauConfig


def reduce_on_plateau(
    lr: float,
    *,
    mode: str = "min",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_lr: float = 0.0,
    eps: float = 1e-8,
) -> GradientTransformation:
    """The transform; arguments as ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (``lr`` is the
    optimizer's learning rate).

    Example:
        >>> import fnloop.optim as flo
        >>> flo.reduce_on_plateau(0.1, mode="max", patience=3).init({})[0]
        tensor(0.1000, dtype=torch.float64)
    """
    if mode not in ("min", "max"):
        raise ConfigError(f"reduce_on_plateau(mode={mode!r}): accepted values are 'min' and 'max'")
    if threshold_mode not in ("rel", "abs"):
        raise ConfigError(f"reduce_on_plateau(threshold_mode={threshold_mode!r}): accepted values are 'rel' and 'abs'")
    if not 0.0 < factor < 1.0:
        raise ConfigError(f"reduce_on_plateau(factor={factor!r}): the factor must be in (0, 1)")
    for name, value in (("patience", patience), ("cooldown", cooldown)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"reduce_on_plateau({name}={value!r}): accepted values are an int >= 0")
    if lr <= 0 or min_lr < 0:
        raise ConfigError(f"reduce_on_plateau(lr={lr!r}, min_lr={min_lr!r}): lr must be > 0 and min_lr >= 0")

    def init(params: Any) -> PlateauState:
        def f(v: float) -> Tensor:
            return torch.tensor(v, dtype=torch.float64)

        def i(v: int) -> Tensor:
            return torch.tensor(v, dtype=torch.int64)

        config = PlateauConfig(
            f(lr), f(factor), i(patience), f(threshold), torch.tensor(threshold_mode == "rel"),
            torch.tensor(mode == "max"), i(cooldown), f(min_lr), f(eps),
        )
        return PlateauState(f(lr), f(-math.inf if mode == "max" else math.inf), i(0), i(0), config)

    def update(updates: Any, state: PlateauState, params: Any = None) -> tuple[Any, PlateauState]:
        scale = state.current_lr / state.config.lr
        leaves = [u for u in optree.tree_leaves(updates, namespace="fnloop") if isinstance(u, Tensor)]
        if not leaves:
            return updates, state
        scaled = torch._foreach_mul(leaves, scale.to(leaves[0].device, leaves[0].dtype))
        it = iter(scaled)
        return optree.tree_map(lambda u: next(it) if isinstance(u, Tensor) else u, updates, namespace="fnloop"), state

    return GradientTransformation(init, update)


def _step(state: PlateauState, value: Tensor) -> PlateauState:
    """One ``ReduceLROnPlateau.step(value)``, without host reads (``torch.where``)."""
    c = state.config
    value = value.to(torch.float64)
    best = state.best
    rel_min, abs_min = best * (1 - c.threshold), best - c.threshold
    rel_max, abs_max = best * (c.threshold + 1), best + c.threshold
    better = torch.where(
        c.maximize, value > torch.where(c.relative, rel_max, abs_max), value < torch.where(c.relative, rel_min, abs_min)
    )
    best = torch.where(better, value, best)
    bad = torch.where(better, torch.zeros_like(state.num_bad_epochs), state.num_bad_epochs + 1)
    in_cooldown = state.cooldown_counter > 0
    cooldown_counter = torch.where(in_cooldown, state.cooldown_counter - 1, state.cooldown_counter)
    bad = torch.where(in_cooldown, torch.zeros_like(bad), bad)
    reduce = bad > c.patience
    new_lr = torch.clamp(state.current_lr * c.factor, min=c.min_lr)
    lr = torch.where(reduce & (state.current_lr - new_lr > c.eps), new_lr, state.current_lr)
    cooldown_counter = torch.where(reduce, c.cooldown, cooldown_counter)
    bad = torch.where(reduce, torch.zeros_like(bad), bad)
    return PlateauState(lr, best, bad, cooldown_counter, c)


def _is_plateau(node: Any) -> bool:
    return isinstance(node, PlateauState)


def plateau_step(opt_state: Any, value: float | Tensor) -> Any:
    """The optimizer state after every :func:`reduce_on_plateau` in it has seen ``value`` (one
    ``scheduler.step(value)`` of torch). Pure: ``opt_state`` is untouched.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> s = flo.reduce_on_plateau(1.0, patience=0).init({})
        >>> flo.plateau_lr(flo.plateau_step(flo.plateau_step(s, 1.0), 1.0))
        tensor(0.1000, dtype=torch.float64)
    """
    # a Python number as the float64 torch compares (float(metrics)), not through float32
    value = (value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float64)).detach().reshape(())
    found = []

    def visit(node: Any) -> Any:
        if _is_plateau(node):
            found.append(node)
            return _step(node, value.to(node.best.device))
        return node

    out = optree.tree_map(visit, opt_state, is_leaf=_is_plateau, namespace="fnloop", none_is_leaf=True)
    if not found:
        raise ConfigError(
            "plateau_step: the optimizer state holds no reduce_on_plateau transform; build the optimizer as "
            "flo.chain(flo.sgd(lr=...), flo.reduce_on_plateau(lr))"
        )
    return out


def plateau_lr(opt_state: Any) -> Tensor:
    """The learning rate in force of the first :func:`reduce_on_plateau` in ``opt_state``.

    Example:
        >>> import fnloop.optim as flo
        >>> flo.plateau_lr(flo.reduce_on_plateau(0.5).init({}))
        tensor(0.5000, dtype=torch.float64)
    """
    for node in optree.tree_leaves(opt_state, is_leaf=_is_plateau, namespace="fnloop", none_is_leaf=True):
        if _is_plateau(node):
            return node.current_lr
    raise ConfigError("plateau_lr: the optimizer state holds no reduce_on_plateau transform")
