"""The small transforms the optimizers are chains of, each with the arithmetic of its part of a
``torch.optim`` optimizer: ``scale``, ``trace`` (momentum), ``scale_by_adam``, ``scale_by_rms`` and
``scale_by_rss`` (the learning-rate transforms are in :mod:`fnloop.optim._learning_rate`).

Their ``update`` is the meaning of each part (pure, out of place); the aliases in
:mod:`fnloop.optim.aliases` add a fused path with torch.optim's exact kernels over the same state.

Example:
    >>> import torch, fnloop.optim as flo
    >>> tx = flo.chain(flo.scale_by_adam(), flo.scale_by_learning_rate(1e-3))
    >>> params = {"w": torch.ones(2)}
    >>> tx.update({"w": torch.ones(2)}, tx.init(params), params)[0]["w"]
    tensor([-0.0010, -0.0010])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fnloop.errors import ConfigError
from fnloop.optim import _foreach as fe
from fnloop.optim.base import EmptyState, GradientTransformation, host, leaves_like, new_count
from fnloop.tree import tree_leaves

__all__ = [
    "scale",
    "TraceState",
    "trace",
    "ScaleByAdamState",
    "scale_by_adam",
    "ScaleByRmsState",
    "scale_by_rms",
    "ScaleByRssState",
    "scale_by_rss",
]


def check_number(name: str, value: Any, *, opt: str, low: float = 0.0, high: float | None = None) -> Any:
    """``value`` as a float in ``[low, high)``; else a ConfigError naming ``opt``'s argument ``name``.

    A 0-d tensor passes unchanged: an injected hyperparameter (:mod:`fnloop.optim.inject`), whose
    values were checked as numbers when it was injected.
    """
    if isinstance(value, torch.Tensor):
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value < low
        or (high is not None and value >= high)
    ):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ConfigError(f"{opt}: {name} must be a number {bound}, got {value!r}")
    return float(value)


def zeros_like_tree(tree: Any, fill: float = 0.0) -> Any:
    """A tree like ``tree`` whose leaves are new tensors filled with ``fill``."""
    return leaves_like(tree, [torch.full_like(x, fill) for x in tree_leaves(tree)])


def map_leaves(updates: Any, fn: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> Any:
    return leaves_like(updates, fn(tree_leaves(updates)))


def scale(factor: float) -> GradientTransformation:
    """Multiply the updates by ``factor`` (``scale(-1.0)`` turns a descent into an ascent).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> flo.scale(-1.0).update({"w": torch.ones(1)}, flo.EmptyState())[0]
        {'w': tensor([-1.])}
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise ConfigError(f"scale: factor must be a number, got {factor!r}")
    factor = float(factor)

    def update(updates: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        return map_leaves(updates, fe.neg if factor == -1.0 else lambda u: fe.mul(u, factor)), state

    return GradientTransformation(lambda params: EmptyState(), update)


class TraceState(NamedTuple):
    """``trace``: the momentum buffer; ``count``: updates done (only with ``dampening``)."""

    trace: Any
    count: torch.Tensor | None


def trace(decay: float, *, dampening: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Momentum, as ``torch.optim.SGD``'s: ``trace = decay * trace + (1 - dampening) * updates``
    (the first update, with ``dampening``, sets the trace to the updates); the result is the
    trace, or ``updates + decay * trace`` with ``nesterov``.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.trace(0.9)
        >>> u, s = tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))
        >>> tx.update({"w": torch.ones(1)}, s)[0]
        {'w': tensor([1.9000])}
    """
    decay = check_number("momentum", decay, opt="trace")
    dampening = check_number("dampening", dampening, opt="trace")

    def init(params: Any) -> TraceState:
        return TraceState(zeros_like_tree(params), new_count() if dampening else None)

    def update(updates: Any, state: TraceState, params: Any = None) -> tuple[Any, TraceState]:
        u, old = tree_leaves(updates), tree_leaves(state.trace)
        new = fe.add(fe.mul(old, decay), u, alpha=1 - dampening)
        count = state.count
        if dampening:
            first = host(count) == 0
            if isinstance(first, torch.Tensor):
                new = fe.where(first, u, new)
            elif first:
                new = [x.clone() for x in u]
            count = count + 1
        out = fe.add(u, new, alpha=decay) if nesterov else new
        return leaves_like(updates, out), TraceState(leaves_like(state.trace, new), count)

    return GradientTransformation(init, update)


class ScaleByAdamState(NamedTuple):
    """``count``: updates done; ``mu``, ``nu``: the first and second moments; ``nu_max``: the
    running maximum of ``nu`` (with ``amsgrad``)."""

    count: torch.Tensor
    mu: Any
    nu: Any
    nu_max: Any


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, amsgrad: bool = False
) -> GradientTransformation:
    """Adam's direction: ``(mu / (1 - b1**t)) / (sqrt(nu / (1 - b2**t)) + eps)``, with the moments
    of ``torch.optim.Adam`` (``amsgrad`` uses the running maximum of ``nu``).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.scale_by_adam()
        >>> tx.update({"w": torch.full((1,), 3.0)}, tx.init({"w": torch.ones(1)}))[0]
        {'w': tensor([1.])}
    """
    b1 = check_number("b1", b1, high=1.0, opt="scale_by_adam")
    b2 = check_number("b2", b2, high=1.0, opt="scale_by_adam")
    eps = check_number("eps", eps, opt="scale_by_adam")

    def init(params: Any) -> ScaleByAdamState:
        return ScaleByAdamState(
            new_count(), zeros_like_tree(params), zeros_like_tree(params), zeros_like_tree(params) if amsgrad else None
        )

    def update(updates: Any, state: ScaleByAdamState, params: Any = None) -> tuple[Any, ScaleByAdamState]:
        g = tree_leaves(updates)
        count = state.count + 1
        mu = fe.lerp(tree_leaves(state.mu), g, 1 - b1)
        nu = fe.addcmul(fe.mul(tree_leaves(state.nu), b2), g, g, 1 - b2)
        nu_max = fe.maximum(tree_leaves(state.nu_max), nu) if amsgrad else None
        c = host(count)
        denom = fe.add(fe.div(fe.sqrt(nu_max if amsgrad else nu), (1 - b2**c) ** 0.5), eps)
        out = fe.div(fe.div(mu, denom), 1 - b1**c)
        new_state = ScaleByAdamState(
            count,
            leaves_like(state.mu, mu),
            leaves_like(state.nu, nu),
            leaves_like(state.nu_max, nu_max) if amsgrad else None,
        )
        return leaves_like(updates, out), new_state

    return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    """``square_avg``: the moving average of squared updates; ``grad_avg``: of the updates (centered)."""

    square_avg: Any
    grad_avg: Any


def scale_by_rms(alpha: float = 0.99, eps: float = 1e-8, *, centered: bool = False) -> GradientTransformation:
    """RMSprop's direction, as ``torch.optim.RMSprop``'s: ``updates / (sqrt(square_avg) + eps)``,
    or with ``centered`` ``updates / (sqrt(square_avg - grad_avg**2) + eps)``.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.scale_by_rms(alpha=0.75)
        >>> tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))[0]
        {'w': tensor([2.])}
    """
    alpha = check_number("alpha", alpha, opt="scale_by_rms")
    eps = check_number("eps", eps, opt="scale_by_rms")

    def init(params: Any) -> ScaleByRmsState:
        return ScaleByRmsState(zeros_like_tree(params), zeros_like_tree(params) if centered else None)

    def update(updates: Any, state: ScaleByRmsState, params: Any = None) -> tuple[Any, ScaleByRmsState]:
        g = tree_leaves(updates)
        sq = fe.addcmul(fe.mul(tree_leaves(state.square_avg), alpha), g, g, 1 - alpha)
        grad_avg = state.grad_avg
        if centered:
            ga = fe.lerp(tree_leaves(grad_avg), g, 1 - alpha)
            avg = fe.add(fe.sqrt(fe.addcmul(sq, ga, ga, -1)), eps)
            grad_avg = leaves_like(grad_avg, ga)
        else:
            avg = fe.add(fe.sqrt(sq), eps)
        return leaves_like(updates, fe.div(g, avg)), ScaleByRmsState(leaves_like(state.square_avg, sq), grad_avg)

    return GradientTransformation(init, update)


class ScaleByRssState(NamedTuple):
    """``sum``: the sum of squared updates (Adagrad's accumulator)."""

    sum: Any


def scale_by_rss(initial_accumulator_value: float = 0.0, eps: float = 1e-10) -> GradientTransformation:
    """Adagrad's direction, as ``torch.optim.Adagrad``'s: ``updates / (sqrt(sum) + eps)`` where
    ``sum`` accumulates the squared updates from ``initial_accumulator_value``.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.scale_by_rss()
        >>> tx.update({"w": torch.full((1,), 2.0)}, tx.init({"w": torch.ones(1)}))[0]
        {'w': tensor([1.])}
    """
    initial_accumulator_value = check_number("initial_accumulator_value", initial_accumulator_value, opt="scale_by_rss")
    eps = check_number("eps", eps, opt="scale_by_rss")

    def init(params: Any) -> ScaleByRssState:
        return ScaleByRssState(zeros_like_tree(params, initial_accumulator_value))

    def update(updates: Any, state: ScaleByRssState, params: Any = None) -> tuple[Any, ScaleByRssState]:
        g = tree_leaves(updates)
        total = fe.addcmul(tree_leaves(state.sum), g, g, 1)
        out = fe.div(g, fe.add(fe.sqrt(total), eps))
        return leaves_like(updates, out), ScaleByRssState(leaves_like(state.sum, total))

    return GradientTransformation(init, update)
