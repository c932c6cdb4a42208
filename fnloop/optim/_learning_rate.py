"""The learning-rate transforms: ``scale_by_learning_rate`` (the learning rate in force, a float64
0-d tensor of the state, follows a schedule) and ``scale_by_schedule``.

Example:
    >>> import torch, fnloop.optim as flo
    >>> tx = flo.scale_by_learning_rate(flo.step_lr(0.1, step_size=1, gamma=0.5))
    >>> _, state = tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))
    >>> float(state.lr)
    0.05
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fnloop.errors import ConfigError
from fnloop.optim import _foreach as fe
from fnloop.optim._scale import map_leaves
from fnloop.optim.base import GradientTransformation, LearningRate, Schedule, as_schedule, host, new_count, next_lr

__all__ = [
    "ScaleByScheduleState",
    "scale_by_schedule",
    "ScaleByLearningRateState",
    "scale_by_learning_rate",
]


class ScaleByScheduleState(NamedTuple):
    """``count``: updates done."""

    count: torch.Tensor


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply the updates by ``schedule(count)`` (count: updates done before this one).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.scale_by_schedule(lambda count: 1.0 / (1.0 + count))
        >>> _, s = tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))
        >>> tx.update({"w": torch.ones(1)}, s)[0]
        {'w': tensor([0.5000])}
    """
    if not callable(schedule):
        raise ConfigError(f"scale_by_schedule: schedule must be a callable count -> factor, got {schedule!r}")

    def update(updates: Any, state: ScaleByScheduleState, params: Any = None) -> tuple[Any, ScaleByScheduleState]:
        factor = schedule(host(state.count))
        return map_leaves(updates, lambda u: fe.mul(u, factor)), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(lambda params: ScaleByScheduleState(new_count()), update)


class ScaleByLearningRateState(NamedTuple):
    """``count``: updates done; ``lr``: the learning rate the next update uses."""

    count: torch.Tensor
    lr: torch.Tensor


def init_lr(schedule: Schedule) -> ScaleByLearningRateState:
    """The state of :func:`scale_by_learning_rate` before the first update."""
    return ScaleByLearningRateState(new_count(), schedule(0).to(torch.float64))


def advance_lr(schedule: Schedule, state: ScaleByLearningRateState) -> ScaleByLearningRateState:
    """The state of :func:`scale_by_learning_rate` after one more update."""
    count = state.count + 1
    return ScaleByLearningRateState(count, next_lr(schedule, state.lr, count))


def scale_by_learning_rate(lr: LearningRate, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply the updates by ``-lr`` (``lr`` when ``flip_sign=False``); a schedule is evaluated on
    the transform's own count and the LR in force is kept in the state.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.scale_by_learning_rate(0.5)
        >>> tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))[0]
        {'w': tensor([-0.5000])}
    """
    schedule = as_schedule(lr)
    sign = -1.0 if flip_sign else 1.0

    def update(updates: Any, state: ScaleByLearningRateState, params: Any = None) -> tuple[Any, Any]:
        factor = sign * host(state.lr)
        return map_leaves(updates, lambda u: fe.mul(u, factor)), advance_lr(schedule, state)

    return GradientTransformation(lambda params: init_lr(schedule), update)
