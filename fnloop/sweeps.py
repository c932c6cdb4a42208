"""``fl.sweep``: the stacked state of a hyperparameter sweep, N runs that :func:`fnloop.vmap` trains
as one batched step (one compiled graph under :func:`fnloop.compile`).

Each member is ``TrainState.create(module, make(**values_i), seed=seed_i)`` with the optimizer's
hyperparameters injected (:func:`fnloop.optim.inject_hyperparams`), so the members differ only in
tensor values and stack. A list gives one value per member; anything else is shared by all.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.sweep(torch.nn.Linear(3, 1), flo.adamw, lr=[1e-3, 3e-3, 1e-2], weight_decay=0.01)
    >>> flo.hyperparams(state.opt_state)["lr"].tolist()
    [0.001, 0.003, 0.01]
    >>> fl.sweep_values(state)[1]
    {'lr': 0.003, 'weight_decay': 0.01}
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fnloop.errors import ConfigError
from fnloop.optim.base import GradientTransformation
from fnloop.optim.inject import hyperparams, inject_hyperparams, is_injected
from fnloop.stacking import stack
from fnloop.state import TrainState

__all__ = ["sweep", "sweep_members", "sweep_values"]


def sweep_members(grid: bool = False, /, **values: Any) -> list[dict[str, Any]]:
    """The keyword arguments of each member: lists are swept, other values shared.

    Lists are zipped (all of one length), or with ``grid=True`` crossed (every combination, the
    last argument varying fastest).

    Example:
        >>> import fnloop as fl
        >>> fl.sweep_members(lr=[0.1, 0.2], momentum=0.9)
        [{'lr': 0.1, 'momentum': 0.9}, {'lr': 0.2, 'momentum': 0.9}]
        >>> len(fl.sweep_members(True, lr=[0.1, 0.2], weight_decay=[0.0, 0.1, 0.2]))
        6
    """
    swept = {k: v for k, v in values.items() if isinstance(v, list)}
    for name, column in swept.items():
        if not column:
            raise ConfigError(f"sweep: {name}=[] has no value; give a list of at least one value")
    if not swept:
        return [dict(values)]
    if grid:
        rows = [dict(zip(swept, combo)) for combo in itertools.product(*swept.values())]
    else:
        sizes = {k: len(v) for k, v in swept.items()}
        if len(set(sizes.values())) > 1:
            raise ConfigError(
                f"sweep: the swept lists have different lengths {sizes}; give lists of one length "
                "(zipped member by member) or pass grid=True for every combination"
            )
        rows = [dict(zip(swept, combo)) for combo in zip(*swept.values())]
    return [{k: row.get(k, v) for k, v in values.items()} for row in rows]


def sweep(
    module: torch.nn.Module,
    make: Callable[..., GradientTransformation],
    /,
    *,
    seed: int | Sequence[int] = 0,
    grid: bool = False,
    params: Mapping[str, torch.Tensor] | None = None,
    init_from: Mapping[str, torch.Tensor] | None = None,
    **values: Any,
) -> TrainState:
    """The stacked state of a sweep over the optimizer's hyperparameters.

    Args:
        module: the model, as for :meth:`TrainState.create`.
        make: an optimizer factory: an alias (``flo.adamw``: its numeric arguments are injected)
            or ``flo.inject_hyperparams(factory, static_args=...)``.
        seed: one seed for every member (the same initial weights: a fair comparison), or one
            per member.
        grid: cross the swept lists instead of zipping them (see :func:`sweep_members`).
        params, init_from: as for :meth:`TrainState.create`.
        **values: the optimizer's arguments; a list is swept, one value per member (``lr``,
            ``weight_decay``, ``momentum``, ``betas``, ``eps``, a schedule's rates, ...).

    Returns:
        The stacked state (``N`` members), for ``fl.vmap(step)`` and ``Trainer.fit``; member i's
        values are ``fl.sweep_values(state)[i]``.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> state = fl.sweep(torch.nn.Linear(2, 1), flo.sgd, lr=[0.1, 0.01], momentum=[0.0, 0.9])
        >>> flo.hyperparams(state.opt_state)["momentum"].tolist()
        [0.0, 0.9]
    """
    members = sweep_members(grid, **values)
    seeds = [seed] * len(members) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(members):
        raise ConfigError(
            f"sweep: seed has {len(seeds)} values for {len(members)} members; give one int or one per member"
        )
    probe = make(**members[0])
    factory = make if is_injected(probe) else inject_hyperparams(make)
    start = dict(params) if params else None
    states = [
        TrainState.create(module, factory(**kwargs), seed=s, params=start, init_from=init_from)
        for kwargs, s in zip(members, seeds)
    ]
    return stack(states)


def sweep_values(state: TrainState) -> list[dict[str, float]]:
    """Each member's injected hyperparameters, as numbers (``betas.0`` for ``betas[0]``,
    ``lr.peak_lr`` for a schedule's rate).

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> fl.sweep_values(fl.sweep(torch.nn.Linear(2, 1), flo.sgd, lr=[0.1, 0.2]))
        [{'lr': 0.1}, {'lr': 0.2}]
    """
    values = hyperparams(state.opt_state)
    if any(v.ndim != 1 for v in values.values()):
        raise ConfigError("sweep_values: expected a stacked state (fl.sweep, fl.stack); its hyperparameters are not [N]")
    n = len(next(iter(values.values())))
    return [{k: float(v[i]) for k, v in values.items()} for i in range(n)]
