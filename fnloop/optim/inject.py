"""Hyperparameters as tensors of the optimizer state (optax's ``inject_hyperparams``), so that the
states of a sweep differ only in tensor values: they stack (:func:`fnloop.stack`) and run as one
batched step (:func:`fnloop.vmap`), one compiled graph under :func:`fnloop.compile`.

``inject_hyperparams(flo.adamw)(lr=3e-3, weight_decay=0.01)`` is AdamW whose ``lr`` and
``weight_decay`` are float64 0-d tensors in ``opt_state.hyperparams``; every other argument stays a
Python value of the optimizer (static). What can be injected, for fnloop's aliases:

* ``lr`` as a number, or the float parameters of a schedule from :mod:`fnloop.optim.schedules`
  (``lr.peak_lr``, ``lr.end_lr``, ``lr.init_lr`` of ``warmup_cosine``; ``lr.gamma`` of
  ``exponential``/``step_lr``/``multistep``; ``lr.start_lr``/``lr.end_lr`` of ``linear``;
  ``lr.max_lr``, ``lr.div_factor``, ``lr.final_div_factor`` of ``one_cycle``); step counts stay static;
* ``weight_decay``, ``momentum``, ``betas`` (as ``betas.0`` and ``betas.1``), ``eps``, ``alpha``
  (rmsprop), ``lr_decay`` (adagrad).

``dampening`` and ``initial_accumulator_value`` are always static (they decide what the first step
does), and so are the names in ``static_args``. An injected ``momentum`` or ``weight_decay`` keeps
its part of the optimizer even at 0.0, so members sweeping 0.0 and 0.9 share one structure.

Numerics: in eager mode the kernels read each injected value back as its Python number, so one
member's parameters equal the plain optimizer's bitwise. Compiled or batched, the values are
float64 tensors: equal to the plain optimizer to float32 rounding (about 1e-7 relative).

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> tx = flo.inject_hyperparams(flo.sgd)(lr=0.1, momentum=0.9)
    >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), tx)
    >>> {k: float(v) for k, v in state.opt_state.hyperparams.items()}
    {'lr': 0.1, 'momentum': 0.9}
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from fnloop.errors import ConfigError
from fnloop.optim import _schedule_impl as si
from fnloop.optim._learning_rate import ScaleByLearningRateState
from fnloop.optim.base import GradientTransformation, from_apply, fused_apply, host

__all__ = ["InjectHyperparamsState", "inject_hyperparams", "is_injected", "hyperparams", "set_hyperparams"]

# the float fields of each schedule that may be tensors (the others decide its shape)
_SCHEDULE_FIELDS: dict[type, tuple[str, ...]] = {
    si._Linear: ("start_lr", "end_lr"),
    si._WarmupCosine: ("peak_lr", "end_lr", "init_lr"),
    si._Exponential: ("lr", "gamma"),
    si._StepLR: ("lr", "gamma"),
    si._MultiStep: ("lr", "gamma"),
    si._OneCycle: ("max_lr", "div_factor", "final_div_factor"),
}
_ALWAYS_STATIC = frozenset({"dampening", "initial_accumulator_value"})
_NONE = "this optimizer state holds no injected hyperparameters"


class InjectHyperparamsState(NamedTuple):
    """``hyperparams``: name -> float64 0-d tensor (the values in force); ``inner_state``: the
    optimizer's own state."""

    hyperparams: dict[str, torch.Tensor]
    inner_state: Any


@dataclasses.dataclass(frozen=True, repr=False)
class _LrInState(si._Constant):
    """The constant learning rate of an injected optimizer: the state holds it, never this."""

    _name = "lr_in_state"

    def _value(self, k: torch.Tensor) -> torch.Tensor:
        raise ConfigError("an injected learning rate is read from opt_state.hyperparams['lr']")


_LR_IN_STATE = _LrInState(0.0)


def _is_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number(name: str, value: Any) -> float:
    out = float(value.detach().item() if isinstance(value, torch.Tensor) else value)
    if not math.isfinite(out):
        raise ConfigError(f"inject_hyperparams: {name}={value!r} is not accepted; pass a finite number")
    return out


def _split(kwargs: dict[str, Any], static: frozenset[str]) -> dict[str, float]:
    """The injected values by name: numbers, ``name.i`` for sequences of numbers (betas),
    ``lr.field`` for the float fields of an fnloop schedule."""
    out: dict[str, float] = {}
    for name, value in kwargs.items():
        if name in static:
            continue
        if _is_number(value):
            out[name] = _number(name, value)
        elif isinstance(value, (tuple, list)) and value and all(_is_number(v) for v in value):
            out.update({f"{name}.{i}": _number(f"{name}[{i}]", v) for i, v in enumerate(value)})
        elif isinstance(value, si._Constant):
            out[name] = value.lr
        elif type(value) in _SCHEDULE_FIELDS:
            out.update({f"{name}.{f}": float(getattr(value, f)) for f in _SCHEDULE_FIELDS[type(value)]})
    return out


class _Injected:
    """The optimizer built by ``inject_hyperparams(factory)(**kwargs)``: ``factory`` and its static
    arguments are its structure; the injected values (``initial``) are data that ``init`` puts in
    the state, so optimizers that differ only in them stack (see ``__fnloop_structure__``)."""

    def __init__(self, factory: Callable[..., GradientTransformation], kwargs: dict[str, Any], static: frozenset[str]):
        factory(**kwargs)  # the plain optimizer's checks, with its messages
        self.factory = factory
        self.initial = _split(kwargs, static)
        roots = {name.split(".")[0] for name in self.initial}
        self.static = {k: v for k, v in kwargs.items() if k not in roots}
        # injected numbers and constant schedules: numbers (the learning rate's is kept in its state)
        plain = {k for k in roots if _is_number(kwargs[k]) or isinstance(kwargs[k], si._Constant)}
        self.constant_lr = {k for k in plain if not _is_number(kwargs[k]) or k == "lr"}
        self.templates = {k: v for k, v in kwargs.items() if k in roots - plain}

    def __fnloop_structure__(self) -> Any:
        blank = {
            k: dataclasses.replace(v, **{f: 0.0 for f in _SCHEDULE_FIELDS[type(v)]}) if type(v) in _SCHEDULE_FIELDS else len(v)
            for k, v in self.templates.items()
        }
        return {"factory": self.factory, "static": self.static, "injected": sorted(self.initial), "schedules": blank}

    def build(self, values: dict[str, Any], *, evaluate: bool) -> GradientTransformation:
        """The optimizer with ``values``: tensors stay tensors (read by the kernels); schedule
        fields are read with :func:`host` (their Python numbers in eager mode); a constant
        learning rate is the state's (``evaluate``: the initial value, for ``init``)."""
        kwargs = dict(self.static)
        for name in self.constant_lr:
            kwargs[name] = self.initial[name] if evaluate else _LR_IN_STATE
        for name, template in self.templates.items():
            if type(template) in _SCHEDULE_FIELDS:
                fields = _SCHEDULE_FIELDS[type(template)]
                kwargs[name] = dataclasses.replace(template, **{f: _read(values[f"{name}.{f}"]) for f in fields})
            else:
                kwargs[name] = tuple(values[f"{name}.{i}"] for i in range(len(template)))
        for name, value in values.items():
            if "." not in name and name not in self.constant_lr:
                kwargs[name] = value
        return self.factory(**kwargs)

    def init(self, params: Any) -> InjectHyperparamsState:
        values = {k: torch.tensor(v, dtype=torch.float64) for k, v in self.initial.items()}
        return InjectHyperparamsState(values, self.build(values, evaluate=True).init(params))

    def apply(
        self, grads: Any, state: InjectHyperparamsState, params: Any, *, donate: bool = False, consume: bool = False
    ) -> tuple[Any, InjectHyperparamsState]:
        values = state.hyperparams
        inner_state = state.inner_state
        for name in self.constant_lr:  # the learning rate in force is the injected one
            inner_state = _with_lr(inner_state, values[name].clone())
        inner = self.build(values, evaluate=False)
        new_params, inner_state = fused_apply(inner)(grads, inner_state, params, donate=donate, consume=consume)
        return new_params, InjectHyperparamsState(values, inner_state)


def _read(value: Any) -> Any:
    return host(value) if isinstance(value, torch.Tensor) else value


def _with_lr(node: Any, lr: torch.Tensor) -> Any:
    if isinstance(node, ScaleByLearningRateState):
        return node._replace(lr=lr)
    if type(node) is tuple:
        return tuple(_with_lr(x, lr) for x in node)
    return node


def inject_hyperparams(
    factory: Callable[..., GradientTransformation], *, static_args: Sequence[str] = ()
) -> Callable[..., GradientTransformation]:
    """``factory`` (an optimizer such as ``flo.adamw``) with its numeric keyword arguments kept as
    float64 0-d tensors in the state, ``opt_state.hyperparams[name]``.

    The optimizer's ``init`` puts the values given to it in the state; its updates read them from
    there, so a changed value never rebuilds or recompiles anything, and states that differ only
    in these values stack (a sweep, :func:`fnloop.sweep`). Arguments must be passed by keyword;
    those not passed keep the factory's defaults, as static values.

    Args:
        factory: an fnloop alias (``flo.sgd``, ``flo.adam``, ``flo.adamw``, ``flo.rmsprop``,
            ``flo.adagrad``) or any factory whose optimizer accepts 0-d tensors for the injected
            arguments.
        static_args: names kept static although numeric.

    Returns:
        ``(**kwargs) -> GradientTransformation`` whose state is an :class:`InjectHyperparamsState`.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> schedule = flo.warmup_cosine(1e-3, warmup_steps=10, decay_steps=100)
        >>> tx = flo.inject_hyperparams(flo.adamw)(lr=schedule, betas=(0.9, 0.99))
        >>> sorted(tx.init({"w": torch.ones(2)}).hyperparams)
        ['betas.0', 'betas.1', 'lr.end_lr', 'lr.init_lr', 'lr.peak_lr']
    """
    if not callable(factory):
        raise ConfigError(f"inject_hyperparams: expected an optimizer factory such as flo.adamw, got {factory!r}")
    static = frozenset(static_args) | _ALWAYS_STATIC

    def make(**kwargs: Any) -> GradientTransformation:
        injected = _Injected(factory, kwargs, static)
        return from_apply(injected.init, injected.apply)

    make.__name__ = f"inject_hyperparams({getattr(factory, '__name__', 'factory')})"
    return make


def set_hyperparams(opt_state: Any, /, **values: float | torch.Tensor) -> Any:
    """``opt_state`` (or one holding an :class:`InjectHyperparamsState`) with new injected values.

    Each value is a number or a tensor of the stored one's shape (``[N]`` in a stacked state).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> s = flo.inject_hyperparams(flo.sgd)(lr=0.1).init({"w": torch.ones(1)})
        >>> float(flo.set_hyperparams(s, lr=0.5).hyperparams["lr"])
        0.5
    """
    if isinstance(opt_state, InjectHyperparamsState):
        new = dict(opt_state.hyperparams)
        for name, value in values.items():
            if name not in new:
                raise ConfigError(f"set_hyperparams: {name!r} is not injected; injected: {sorted(new)}")
            old = new[name]
            new[name] = torch.as_tensor(value, dtype=old.dtype).expand(old.shape).clone()
        return opt_state._replace(hyperparams=new)
    if type(opt_state) is tuple:
        return tuple(set_hyperparams(s, **values) if _holds(s) else s for s in opt_state)
    raise ConfigError(f"set_hyperparams: {_NONE} (use flo.inject_hyperparams)")


def _holds(node: Any) -> bool:
    return isinstance(node, InjectHyperparamsState) or (type(node) is tuple and any(_holds(x) for x in node))


def _find(node: Any) -> InjectHyperparamsState | None:
    if isinstance(node, InjectHyperparamsState):
        return node
    for child in node if type(node) is tuple else ():
        found = _find(child)
        if found is not None:
            return found
    return None


def hyperparams(opt_state: Any, /) -> dict[str, torch.Tensor]:
    """The injected hyperparameters of an optimizer state (``[N]`` tensors in a stacked state).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> s = flo.inject_hyperparams(flo.adam)(lr=0.1, eps=1e-6).init({"w": torch.ones(1)})
        >>> sorted(flo.hyperparams(s))
        ['eps', 'lr']
    """
    found = _find(opt_state)
    if found is None:
        raise ConfigError(f"hyperparams: {_NONE} (use flo.inject_hyperparams)")
    return dict(found.hyperparams)


def is_injected(tx: GradientTransformation) -> bool:
    """Whether ``tx`` was built by :func:`inject_hyperparams`.

    Example:
        >>> import fnloop.optim as flo
        >>> flo.is_injected(flo.inject_hyperparams(flo.sgd)(lr=0.1)), flo.is_injected(flo.sgd(lr=0.1))
        (True, False)
    """
    return isinstance(getattr(tx.init, "__self__", None), _Injected)
