"""Stochastic weight averaging: an equal average of the params kept in the optimizer state, and
the learning rate of ``torch.optim.swa_utils.SWALR``, as pure functions of that state.

``flo.swa_params(tx)`` runs ``tx`` unchanged and holds an average of the params beside its state
(``SwaParamsState``: the number averaged and the average), so checkpoints hold it and a run
resumes with it. :func:`swa_average` folds the current params into it, with the numerics of
``AveragedModel.update_parameters`` (the first call copies, later ones compute
``avg + (params - avg) / (n + 1)``, the default ``avg_fn`` of torch and Lightning);
:func:`fnloop.optim.averaged_params` reads it back. :func:`swalr` is the learning rate SWALR sets
at each of its steps, and :func:`with_learning_rates` puts learning rates into the optimizer state
(``ScaleByLearningRateState.lr``, the LR in force). The
:class:`fnloop.callbacks.StochasticWeightAveraging` callback drives all of them once per epoch.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.swa_params(flo.sgd(lr=0.1)))
    >>> opt_state = flo.swa_average(state.opt_state, state.params)
    >>> int(flo.swa_state(opt_state).n_averaged)
    1
    >>> flo.learning_rates(flo.with_learning_rates(opt_state, [flo.swalr(0.1, 0.05, 1, anneal_epochs=2)]))
    [tensor(0.0750, dtype=torch.float64)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from fnloop.errors import ConfigError
from fnloop.optim._find import find_state
from fnloop.optim.base import GradientTransformation, fused_apply
from fnloop.tree import tree_map

__all__ = [
    "SwaParamsState",
    "swa_params",
    "swa_state",
    "swa_avg_fn",
    "swa_update",
    "swa_average",
    "swalr",
    "learning_rates",
    "with_learning_rates",
]

AvgFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SwaParamsState(NamedTuple):
    """``n_averaged``: params averaged so far (int64 0-d); ``avg``: their average, shaped like the
    params ``tx`` was built for; ``inner_state``: ``tx``'s state."""

    n_averaged: torch.Tensor
    avg: Any
    inner_state: Any


def swa_params(inner: GradientTransformation) -> GradientTransformation:
    """``inner`` unchanged, plus room for a weight average in its state (see the module).

    Its updates, fused path and numerics are ``inner``'s; only :func:`swa_average` changes the
    average, so a train step costs nothing more.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.swa_params(flo.sgd(lr=0.1, momentum=0.9))
        >>> s = tx.init({"w": torch.ones(2)})
        >>> int(s.n_averaged), s.avg
        (0, {'w': tensor([1., 1.])})
    """
    if not isinstance(inner, GradientTransformation):
        got = type(inner).__name__
        raise ConfigError(f"swa_params(inner=...): expected a GradientTransformation (flo.sgd(...)), got {got}")
    inner_apply = fused_apply(inner)

    def init(params: Any) -> SwaParamsState:
        avg = tree_map(lambda p: p.detach().clone(), params)
        return SwaParamsState(torch.zeros((), dtype=torch.int64), avg, inner.init(params))

    def update(updates: Any, state: SwaParamsState, params: Any = None) -> tuple[Any, SwaParamsState]:
        updates, inner_state = inner.update(updates, state.inner_state, params)
        return updates, state._replace(inner_state=inner_state)

    def fused(
        grads: Any, state: SwaParamsState, params: Any, *, donate: bool = False, consume: bool = False
    ) -> tuple[Any, Any]:
        new_params, inner_state = inner_apply(grads, state.inner_state, params, donate=donate, consume=consume)
        return new_params, state._replace(inner_state=inner_state)

    return GradientTransformation(init, update, fused)


def swa_state(opt_state: Any) -> SwaParamsState:
    """The :class:`SwaParamsState` inside ``opt_state`` (a ``ConfigError`` when there is none).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> int(flo.swa_state(flo.swa_params(flo.adam()).init({"w": torch.ones(1)})).n_averaged)
        0
    """
    found = find_state(opt_state, SwaParamsState)
    if found is None:
        raise ConfigError(
            "the optimizer state holds no weight average: build the optimizer as flo.swa_params(flo.sgd(lr=...)) "
            "(any optimizer inside flo.swa_params)"
        )
    return found  # type: ignore[no-any-return]


def swa_avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
    """The equal average: ``averaged + (current - averaged) / (num_averaged + 1)``, the default
    ``avg_fn`` of ``AveragedModel`` (``get_swa_avg_fn``) and of Lightning's callback.

    Example:
        >>> import torch
        >>> swa_avg_fn(torch.tensor([1.0]), torch.tensor([4.0]), torch.tensor(2))
        tensor([2.])
    """
    return averaged + (current - averaged) / (num_averaged + 1)


def swa_update(avg: Any, params: Any, n: int | torch.Tensor, *, avg_fn: AvgFn | None = None) -> Any:
    """The average of ``n`` params ``avg`` with ``params`` folded in (new tensors): a copy of
    ``params`` when ``n == 0``, else ``avg_fn(avg, params, n)`` leaf by leaf (``avg_fn`` takes
    ``(averaged, current, num_averaged)``, as in torch and Lightning; default :func:`swa_avg_fn`).

    Example:
        >>> import torch
        >>> swa_update({"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, 1)
        {'w': tensor([2.])}
    """
    count = n if isinstance(n, torch.Tensor) else torch.tensor(int(n), dtype=torch.int64)
    if int(count) == 0:
        return tree_map(lambda p: p.detach().clone(), params)
    fn = avg_fn or swa_avg_fn
    return tree_map(lambda a, p: fn(a.detach(), p.detach().to(a.device), count.to(a.device)).detach(), avg, params)


def _map_nodes(node: Any, pred: Callable[[Any], bool], fn: Callable[[Any], Any]) -> Any:
    """``node`` with every sub-node for which ``pred`` holds replaced by ``fn(sub-node)``, in the
    order :func:`fnloop.optim.learning_rate` searches (dict values, list and tuple items)."""
    if pred(node):
        return fn(node)
    if isinstance(node, dict):
        return type(node)({k: _map_nodes(v, pred, fn) for k, v in node.items()}) if node else node
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_map_nodes(v, pred, fn) for v in node))
    if isinstance(node, (list, tuple)):
        return type(node)(_map_nodes(v, pred, fn) for v in node)
    return node


def swa_average(opt_state: Any, params: Any, *, avg_fn: AvgFn | None = None) -> Any:
    """The optimizer state with ``params`` folded into its average (:func:`swa_update`) and the
    count raised by one: one ``AveragedModel.update_parameters(model)``. Pure.

    ``params`` may hold more entries than the average (frozen params): those are left out.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> s = flo.swa_params(flo.sgd(lr=0.1)).init({"w": torch.zeros(1)})
        >>> s = flo.swa_average(flo.swa_average(s, {"w": torch.ones(1)}), {"w": torch.full((1,), 3.0)})
        >>> flo.averaged_params(s)
        {'w': tensor([2.])}
    """
    swa_state(opt_state)

    def fold(node: SwaParamsState) -> SwaParamsState:
        mine = {k: params[k] for k in node.avg} if isinstance(node.avg, dict) and isinstance(params, dict) else params
        avg = swa_update(node.avg, mine, node.n_averaged, avg_fn=avg_fn)
        return SwaParamsState(node.n_averaged + 1, avg, node.inner_state)

    return _map_nodes(opt_state, lambda n: isinstance(n, SwaParamsState), fold)


def _cos(t: float) -> float:
    return (1 - math.cos(math.pi * t)) / 2


def swalr(lr: float, swa_lr: float, step: int, *, anneal_epochs: int = 10, anneal_strategy: str = "cos") -> float:
    """The learning rate ``torch.optim.swa_utils.SWALR`` sets at its step ``step`` (0: when it is
    built, then one step per epoch) when the LR in force is ``lr``: it anneals towards
    ``swa_lr`` over ``anneal_epochs`` steps ("cos" or "linear"), then stays there. The same
    float arithmetic as torch, so the values are equal bitwise.

    Example:
        >>> steps = [(0.1, 0), (0.1, 1), (0.075, 2)]  # (the LR in force, SWALR's step)
        >>> [round(swalr(lr, 0.05, k, anneal_epochs=2, anneal_strategy="linear"), 6) for lr, k in steps]
        [0.1, 0.075, 0.05]
    """
    anneal = _cos if anneal_strategy == "cos" else (lambda t: t)
    if anneal_epochs == 0:
        step = max(1, step)
    prev_alpha = anneal(max(0, min(1, (step - 1) / max(1, anneal_epochs))))
    start = swa_lr if prev_alpha == 1 else (lr - prev_alpha * swa_lr) / (1 - prev_alpha)
    alpha = anneal(max(0, min(1, step / max(1, anneal_epochs))))
    return swa_lr * alpha + start * (1 - alpha)  # type: ignore[no-any-return]


def _has_lr(node: Any) -> bool:
    named = isinstance(node, tuple) and hasattr(node, "_fields") and "lr" in node._fields
    return named and isinstance(node.lr, torch.Tensor)


def learning_rates(opt_state: Any) -> list[torch.Tensor]:
    """Every learning rate in force in ``opt_state`` (one per ``scale_by_learning_rate``, e.g. one
    per group of ``flo.multi_transform``), first the one :func:`fnloop.optim.learning_rate` reads.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> flo.learning_rates(flo.sgd(lr=0.5).init({"w": torch.ones(1)}))
        [tensor(0.5000, dtype=torch.float64)]
    """
    if _has_lr(opt_state):
        return [opt_state.lr]
    if isinstance(opt_state, dict):
        children: Any = opt_state.values()
    else:
        children = opt_state if isinstance(opt_state, (list, tuple)) else ()
    return [lr for child in children if not isinstance(child, torch.Tensor) for lr in learning_rates(child)]


def with_learning_rates(opt_state: Any, lrs: Sequence[float]) -> Any:
    """``opt_state`` with its learning rates (in :func:`learning_rates` order) set to ``lrs``: the
    next update uses them. An optimizer built with a constant ``lr`` keeps them; one built with
    a schedule recomputes its LR after each update. Pure.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> s = flo.with_learning_rates(flo.sgd(lr=0.5).init({"w": torch.ones(1)}), [0.25])
        >>> float(flo.learning_rate(s))
        0.25
    """
    count = len(learning_rates(opt_state))
    if count != len(lrs):
        raise ConfigError(f"with_learning_rates: {len(lrs)} learning rate(s) given for {count} in the optimizer state")
    it = iter(lrs)

    def put(node: Any) -> Any:
        return node._replace(lr=torch.tensor(float(next(it)), dtype=node.lr.dtype, device=node.lr.device))

    return _map_nodes(opt_state, _has_lr, put)
