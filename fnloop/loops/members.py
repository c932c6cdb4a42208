"""The steps of a driver run over a stacked state (``Trainer.fit/validate/test`` on ``fl.stack(states)``).

A step from :func:`fnloop.train_step` / :func:`fnloop.eval_step` given with a stacked state is
wrapped in :func:`fnloop.vmap` with its default: every member gets the same batch. This is the
only meaning such a call can have (the plain step cannot run on a stacked state), and it is what
member i sees in a fit of state i alone. To give each member its own slice of every batch, pass
``fl.vmap(step, batch_dim=0)`` yourself. Any other callable cannot be vmapped: the driver asks for
an fnloop step. A step already vmapped over a state that is not stacked is refused as well.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> s = fl.stack([fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1), seed=i) for i in range(2)])
    >>> step = fl.train_step(lambda m, b: m(b).square().mean())
    >>> type(for_state(s, step, what="train_step")).__name__
    'VmappedStep'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fnloop.errors import ConfigError
from fnloop.members import is_stacked

__all__ = ["for_state"]


def _one(state: Any, step: Any, what: str) -> Any:
    from fnloop.ensemble import VmappedStep, vmap
    from fnloop.eval_steps import EvalLike
    from fnloop.step import TrainStep

    stacked = is_stacked(state)
    if isinstance(step, VmappedStep):
        if not stacked:
            raise ConfigError(
                f"{what}: the step is vmapped over members (fl.vmap) but the state is not stacked; pass "
                "fl.stack(states) as the state, or the step without fl.vmap"
            )
        return step
    if not stacked or step is None:
        return step
    if isinstance(step, (TrainStep, EvalLike)):
        return vmap(step)  # one batch for every member
    raise ConfigError(
        f"{what}: the state is stacked ({int(state.step.shape[0])} members) but the step is a "
        f"{type(step).__name__}, which cannot run over members; pass fl.vmap(step) with a step from "
        "fl.train_step/fl.eval_step (batch_dim=0 to give each member its own slice of the batch)"
    )


def for_state(state: Any, step: Any, *, what: str) -> Any:
    """``step`` (or each step of a list/dict of steps) ready for ``state``: vmapped when the
    state is stacked (see the module docstring); ``step`` itself otherwise.

    Raises:
        ConfigError: naming ``what`` when the step cannot run over the members, or is vmapped
            while the state is not stacked.
    """
    if isinstance(step, Mapping):
        return {k: _one(state, v, what) for k, v in step.items()}
    if isinstance(step, (list, tuple)):
        return type(step)(_one(state, s, what) for s in step)
    return _one(state, step, what)
