"""An exponential moving average of the weights, kept in the optimizer state.

``flo.ema_params(tx, decay)`` runs ``tx`` unchanged and, after each update, moves an average of
the new params towards them, with the numerics of ``torch.optim.swa_utils.AveragedModel`` and
``get_ema_multi_avg_fn(decay)``: the first update copies the params, later ones compute
``avg + (1 - decay) * (params - avg)`` (``lerp``). The average lives in ``state.opt_state``, so
checkpoints hold it and a run resumes with it; :func:`averaged_params` reads it back, and
``state.replace(params=flo.averaged_params(state.opt_state))`` is the state to evaluate.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.ema_params(flo.sgd(lr=0.1), decay=0.9))
    >>> state, _ = fl.train_step(lambda m, b: m(b).square().mean())(state, torch.ones(4, 2))
    >>> fl.testing.assert_trees_equal(flo.averaged_params(state.opt_state), state.params)  # first update: a copy
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fnloop.errors import ConfigError
from fnloop.optim import _foreach as fe
from fnloop.optim._find import find_state
from fnloop.optim.base import GradientTransformation, from_apply, fused_apply, host, leaves_like
from fnloop.optim.swa import SwaParamsState
from fnloop.tree import tree_leaves

__all__ = ["EmaParamsState", "ema_params", "averaged_params"]


class EmaParamsState(NamedTuple):
    """``count``: averages taken; ``ema``: the average of the params; ``inner_state``: ``tx``'s."""

    count: torch.Tensor
    ema: Any
    inner_state: Any


def ema_params(inner: GradientTransformation, decay: float) -> GradientTransformation:
    """``inner`` plus an exponential moving average of the params it produces (see the module).

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.ema_params(flo.adamw(lr=1e-3), decay=0.999)
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
        raise ConfigError(f"ema_params: decay must be in [0, 1], got {decay!r}")
    inner_apply = fused_apply(inner)

    def init(params: Any) -> EmaParamsState:
        ema = leaves_like(params, [p.detach().clone() for p in tree_leaves(params)])
        return EmaParamsState(torch.zeros((), dtype=torch.int64), ema, inner.init(params))

    def apply(grads: Any, state: EmaParamsState, params: Any, *, donate: bool = False, consume: bool = False) -> tuple[Any, Any]:
        new_params, inner_state = inner_apply(grads, state.inner_state, params, donate=donate, consume=consume)
        new, old = tree_leaves(new_params), tree_leaves(state.ema)
        first = host(state.count) == 0
        if isinstance(first, torch.Tensor):  # compiling or under torch.func: no branch on a tensor
            avg = fe.where(first, [p.detach() for p in new], fe.lerp(old, new, 1 - decay))
        else:
            avg = [p.detach().clone() for p in new] if first else fe.lerp(old, [p.detach() for p in new], 1 - decay)
        return new_params, EmaParamsState(state.count + 1, leaves_like(state.ema, avg), inner_state)

    return from_apply(init, apply)


def averaged_params(opt_state: Any) -> Any:
    """The averaged params kept inside ``opt_state`` by :func:`ema_params` or by
    :func:`fnloop.optim.swa_params` (the first one found).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> flo.averaged_params(flo.ema_params(flo.sgd(lr=0.1), 0.9).init({"w": torch.ones(1)}))
        {'w': tensor([1.])}
    """
    found = find_state(opt_state, (EmaParamsState, SwaParamsState))
    if found is None:
        raise ConfigError(
            "averaged_params: this optimizer state holds no average "
            "(build the optimizer with flo.ema_params or flo.swa_params)"
        )
    return found.ema if isinstance(found, EmaParamsState) else found.avg
