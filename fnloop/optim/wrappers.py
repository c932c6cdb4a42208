"""Transforms that wrap another one: gradient accumulation, non-finite skipping, moving averages.

Example:
    >>> import fnloop.optim as flo
    >>> tx = flo.multi_steps(flo.apply_if_finite(flo.adamw(lr=1e-3)), every_k=4)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fnloop.errors import ConfigError
from fnloop.optim import _foreach as fe
from fnloop.optim.base import Fused, GradientTransformation, from_apply, fused_apply, host, leaves_like, new_count
from fnloop.tree import tree_flatten, tree_leaves

__all__ = ["MultiStepsState", "multi_steps", "multi_steps_flush", "ApplyIfFiniteState", "apply_if_finite", "EmaState", "ema"]


def _zeros(tree: Any) -> Any:
    return leaves_like(tree, [torch.zeros_like(x) for x in tree_leaves(tree)])


def _select(cond: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``cond`` else ``old``, leaf by leaf, for tensor leaves (other leaves from ``new``)."""
    new_leaves, spec = tree_flatten(new)
    old_leaves = tree_leaves(old)
    out = [torch.where(cond, n, o) if isinstance(n, torch.Tensor) else n for n, o in zip(new_leaves, old_leaves)]
    return spec.unflatten(out)


class MultiStepsState(NamedTuple):
    """``mini_step``: micro-batches accumulated so far; ``grad_acc``: their gradient sum."""

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    grad_acc: Any
    inner_state: Any


def multi_steps(inner: GradientTransformation, every_k: int) -> GradientTransformation:
    """Gradient accumulation: sum the gradients of ``every_k`` micro-batches and apply ``inner`` to
    their mean on the last one; the other calls return zero updates.

    With a mean loss, ``every_k`` micro-batches of size ``b`` give the step of one batch of size
    ``every_k * b``. In eager mode the branch is taken on the host-side counter; while compiling
    both branches are traced and selected with ``torch.where`` (no graph break, no recompilation).
    :func:`multi_steps_flush` applies a partial accumulation.

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.multi_steps(flo.sgd(lr=0.1), every_k=4)
    """
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ConfigError(f"multi_steps: every_k must be an int >= 1, got {every_k!r}")

    def init(params: Any) -> MultiStepsState:
        return MultiStepsState(new_count(), new_count(), _zeros(params), inner.init(params))

    return from_apply(init, _Accumulate(fused_apply(inner), every_k))


class _Accumulate:
    """The fused path of :func:`multi_steps` (a callable), and its :meth:`flush`."""

    def __init__(self, inner_apply: Fused, every_k: int) -> None:
        self.inner_apply = inner_apply
        self.every_k = every_k

    def __call__(
        self, grads: Any, state: MultiStepsState, params: Any, *, donate: bool = False, consume: bool = False
    ) -> tuple[Any, MultiStepsState]:
        every_k, inner_apply = self.every_k, self.inner_apply
        if every_k == 1:
            new_params, inner_state = inner_apply(grads, state.inner_state, params, donate=donate, consume=consume)
            return new_params, state._replace(gradient_step=state.gradient_step + 1, inner_state=inner_state)
        mini = host(state.mini_step)
        acc = (fe.add_ if donate else fe.add)(tree_leaves(state.grad_acc), tree_leaves(grads))
        if not isinstance(mini, torch.Tensor):  # eager: branch on the host-side counter
            if mini < every_k - 1:
                return params, state._replace(mini_step=state.mini_step + 1, grad_acc=leaves_like(state.grad_acc, acc))
            mean = leaves_like(grads, fe.div(acc, float(every_k)))
            new_params, inner_state = inner_apply(mean, state.inner_state, params, donate=donate, consume=True)
            zero = torch.zeros_like(state.mini_step)
            cleared = leaves_like(state.grad_acc, [a.zero_() for a in acc]) if donate else _zeros(state.grad_acc)
            return new_params, MultiStepsState(zero, state.gradient_step + 1, cleared, inner_state)
        emit = state.mini_step == every_k - 1
        mean = leaves_like(grads, fe.div(acc, float(every_k)))
        new_params, inner_state = inner_apply(mean, state.inner_state, params)
        new_state = MultiStepsState(
            torch.where(emit, torch.zeros_like(state.mini_step), state.mini_step + 1),
            torch.where(emit, state.gradient_step + 1, state.gradient_step),
            leaves_like(state.grad_acc, fe.where(emit, [torch.zeros_like(a) for a in acc], acc)),
            _select(emit, inner_state, state.inner_state),
        )
        return _select(emit, new_params, params), new_state

    def flush(self, state: MultiStepsState, params: Any) -> tuple[Any, MultiStepsState]:
        """See :func:`multi_steps_flush`."""
        if int(state.mini_step) == 0:
            return params, state
        mean = leaves_like(params, fe.div(tree_leaves(state.grad_acc), float(self.every_k)))
        new_params, inner_state = self.inner_apply(mean, state.inner_state, params, consume=True)
        zero = torch.zeros_like(state.mini_step)
        return new_params, MultiStepsState(zero, state.gradient_step + 1, _zeros(state.grad_acc), inner_state)


def multi_steps_flush(tx: GradientTransformation, opt_state: MultiStepsState, params: Any) -> tuple[Any, MultiStepsState]:
    """Apply a partial accumulation of :func:`multi_steps` now: the inner transform steps on the
    gradient sum divided by ``every_k`` (as Lightning does at the end of an epoch whose batch count
    is not a multiple of ``every_k``); nothing happens when no micro-batch is pending. Eager only.

    Returns:
        ``(new_params, new_opt_state)``.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.multi_steps(flo.sgd(lr=1.0), every_k=4)
        >>> p = {"w": torch.zeros(1)}
        >>> p, s = flo.fused_apply(tx)({"w": torch.ones(1)}, tx.init(p), p)
        >>> flo.multi_steps_flush(tx, s, p)[0]
        {'w': tensor([-0.2500])}
    """
    fused = getattr(tx, "fused", None)
    if not isinstance(fused, _Accumulate):
        raise ConfigError("multi_steps_flush: tx is not a transform built by fnloop.optim.multi_steps")
    return fused.flush(opt_state, params)


class ApplyIfFiniteState(NamedTuple):
    """``notfinite_count``: consecutive skipped updates; ``total_notfinite``: all skipped updates."""

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: Any


def apply_if_finite(inner: GradientTransformation) -> GradientTransformation:
    """Skip an update whose gradients hold a NaN or an infinity: the update is zero and ``inner``'s
    state is left unchanged. Decided with ``torch.where`` (no host sync); skips are counted.

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.apply_if_finite(flo.adam(lr=1e-3))
    """

    def init(params: Any) -> ApplyIfFiniteState:
        leaves = tree_leaves(params)
        device = leaves[0].device if leaves else None
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return ApplyIfFiniteState(zero, torch.ones((), dtype=torch.bool, device=device), zero.clone(), inner.init(params))

    inner_apply = fused_apply(inner)

    def apply(
        grads: Any, state: ApplyIfFiniteState, params: Any, *, donate: bool = False, consume: bool = False
    ) -> tuple[Any, ApplyIfFiniteState]:
        # the old state is kept for the select below: never donated to the inner transform
        finite = fe.all_finite(tree_leaves(grads))
        new_params, inner_state = inner_apply(grads, state.inner_state, params, consume=consume)
        new_state = ApplyIfFiniteState(
            torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1),
            finite,
            state.total_notfinite + (~finite).to(torch.int64),
            _select(finite, inner_state, state.inner_state),
        )
        return _select(finite, new_params, params), new_state

    return from_apply(init, apply)


class EmaState(NamedTuple):
    count: torch.Tensor
    ema: Any


def ema(decay: float, debias: bool = True) -> GradientTransformation:
    """Replace the updates by their exponential moving average (optax's ``ema``); with ``debias``
    the average is divided by ``1 - decay**count``.

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.chain(flo.ema(0.9), flo.sgd(lr=0.1))
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ConfigError(f"ema: decay must be in [0, 1), got {decay!r}")

    def init(params: Any) -> EmaState:
        return EmaState(new_count(), _zeros(params))

    def update(updates: Any, state: EmaState, params: Any = None) -> tuple[Any, EmaState]:
        count = state.count + 1
        avg = fe.lerp(tree_leaves(state.ema), tree_leaves(updates), 1 - decay)
        out = avg
        if debias:
            c = host(count)
            out = fe.div(avg, 1 - decay**c)
        return leaves_like(updates, out), EmaState(count, leaves_like(state.ema, avg))

    return GradientTransformation(init, update)
