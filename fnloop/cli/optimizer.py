"""The optimizer of a config: a ``fnloop.optim`` alias by name, its keyword arguments, and an
optional learning rate schedule that becomes its ``lr``.

Example:
    >>> tx = build_optimizer({"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4},
    ...                      "warmup_cosine", {"warmup_steps": 10, "decay_steps": 100})
    >>> type(tx).__name__
    'GradientTransformation'
"""

from __future__ import annotations

import argparse
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import fnloop.optim as flo
from fnloop.errors import ConfigError

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_schedule"]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
"""Optimizer names accepted in ``optimizer.name`` (``fnloop.optim`` aliases)."""

SCHEDULES: tuple[str, ...] = ("constant", "linear", "warmup_cosine", "exponential", "step_lr", "multistep", "one_cycle")
"""Schedule names accepted in ``schedule.name`` (``fnloop.optim`` schedules)."""

_SKIP = {"mask"}  # takes a tree or a function of the params: not expressible in a config


def _params(fn: Callable[..., Any]) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.name not in _SKIP]


@functools.lru_cache(maxsize=None)
def _arg_parser(fn: Callable[..., Any]) -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False)
    parser.add_function_arguments(fn, skip=_SKIP | {"lr"}, fail_untyped=False)
    return parser


def _checked(fn: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``kwargs`` checked against ``fn``'s signature and types (lists become tuples where typed so)."""
    accepted = _params(fn)
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(
                f"{where}.{key} is not an argument of fnloop.optim.{fn.__name__}; accepted keys: {', '.join(accepted)}"
            )
    lr = kwargs.get("lr")
    if isinstance(lr, (str, bool)):  # a number, a tensor or a schedule; checked here so the error names this key
        raise ConfigError(f"{where}.lr={lr!r}: the learning rate must be a number, e.g. {where}.lr: 0.001")
    rest = {k: v for k, v in kwargs.items() if k != "lr"}
    parser = _arg_parser(fn)
    try:
        parsed = parser.parse_object(rest, defaults=False)
    except argparse.ArgumentError as err:
        text = str(err).replace('Parser key "', f'Parser key "{where}.')
        raise ConfigError(f"{where}: {text}") from None
    out = {k: v for k, v in vars(parsed).items() if k in rest}
    if "lr" in kwargs:
        out["lr"] = kwargs["lr"]
    return out


def build_schedule(name: str, init_args: Mapping[str, Any], base_lr: float | None = None) -> Callable[[Any], Any]:
    """The schedule ``fnloop.optim.<name>(**init_args)``; its first argument (the peak or
    starting learning rate) defaults to ``base_lr`` (``optimizer.lr``).

    Raises:
        ConfigError: an unknown name or argument, a bad value, or the first argument given
            both in ``init_args`` and as ``base_lr``.

    Example:
        >>> float(build_schedule("step_lr", {"step_size": 2, "gamma": 0.5}, base_lr=1.0)(4))
        0.25
    """
    if name not in SCHEDULES:
        accepted = ", ".join(SCHEDULES)
        raise ConfigError(f"schedule.name={name!r} is not a fnloop.optim schedule; accepted names: {accepted}")
    fn = getattr(flo, name)
    kwargs = dict(init_args)
    first = _params(fn)[0]
    if base_lr is not None:
        if first in kwargs:
            raise ConfigError(
                f"schedule.init_args.{first} and optimizer.lr both give the learning rate of schedule {name!r}: "
                f"keep one (optimizer.lr is used as {first} when {first} is not given)"
            )
        kwargs[first] = base_lr
    elif first not in kwargs:
        raise ConfigError(f"schedule.init_args.{first} is missing: set it, or set optimizer.lr (used as {first})")
    kwargs = _checked(fn, kwargs, "schedule.init_args")
    try:
        return fn(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"schedule (fnloop.optim.{name}): {err}") from None


def _arguments(
    optimizer: Mapping[str, Any], schedule: str | None, schedule_args: Mapping[str, Any] | None
) -> tuple[str, Callable[..., flo.GradientTransformation], dict[str, Any]]:
    """The optimizer's name, its factory and its checked keyword arguments (the schedule as ``lr``)."""
    if not isinstance(optimizer, Mapping):
        raise ConfigError(f"optimizer={optimizer!r}: give a mapping like {{name: adamw, lr: 0.001}}")
    kwargs = dict(optimizer)
    name = kwargs.pop("name", None)
    if name not in OPTIMIZERS:
        accepted = ", ".join(OPTIMIZERS)
        raise ConfigError(f"optimizer.name={name!r} is not a fnloop.optim optimizer; accepted names: {accepted}")
    fn = getattr(flo, name)
    kwargs = _checked(fn, kwargs, "optimizer")
    if schedule is not None:
        kwargs["lr"] = build_schedule(schedule, schedule_args or {}, kwargs.get("lr"))
    return name, fn, kwargs


def build_optimizer(
    optimizer: Mapping[str, Any],
    schedule: str | None = None,
    schedule_args: Mapping[str, Any] | None = None,
) -> flo.GradientTransformation:
    """The ``fnloop.optim`` optimizer named by ``optimizer["name"]`` with the other entries as
    its keyword arguments; with ``schedule``, the schedule becomes its ``lr``.

    Args:
        optimizer: ``{"name": "adamw", "lr": 1e-3, "weight_decay": 1e-2, ...}`` (config key ``optimizer``).
        schedule: a schedule name (config key ``schedule.name``) or None.
        schedule_args: the schedule's arguments (config key ``schedule.init_args``).

    Raises:
        ConfigError: an unknown optimizer or schedule name, an unknown key or a bad value; the
            message names the config key and the accepted values.

    Example:
        >>> build_optimizer({"name": "sgdd"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fnloop.errors.ConfigError: optimizer.name='sgdd' is not a fnloop.optim optimizer; accepted names: sgd, adam, ...
    """
    name, fn, kwargs = _arguments(optimizer, schedule, schedule_args)
    try:
        return fn(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"optimizer (fnloop.optim.{name}): {err}") from None
