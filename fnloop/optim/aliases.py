"""Optimizers with the numerics of their ``torch.optim`` counterparts (foreach implementation).

Each alias takes torch.optim's argument names and defaults; ``lr`` is a float or a schedule.
The state holds ``count`` (updates done, int64 CPU 0-d tensor) and ``lr`` (the learning rate the
next update uses, float64 0-d tensor), so a changing learning rate never recompiles a step.

Example:
    >>> import torch, fnloop.optim as flo
    >>> tx = flo.adamw(lr=1e-3, weight_decay=0.01)
    >>> params = {"w": torch.ones(2)}
    >>> updates, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
    >>> updates["w"]
    tensor([-0.0010, -0.0010])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fnloop.errors import ConfigError
from fnloop.optim import _foreach as fe
from fnloop.optim.base import (
    GradientTransformation,
    LearningRate,
    addcdiv,
    as_schedule,
    axpy,
    from_apply,
    host,
    leaves_like,
    new_count,
    take_leaves,
    next_lr,
)
from fnloop.tree import tree_flatten, tree_leaves

__all__ = ["SGDState", "AdamState", "RMSpropState", "AdagradState", "sgd", "adam", "adamw", "rmsprop", "adagrad"]


def _check(name: str, value: float, *, low: float = 0.0, high: float | None = None, opt: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ConfigError(f"{opt}: {name} must be a number {bound}, got {value!r}")
    return float(value)


def _zeros(params: Any) -> Any:
    return leaves_like(params, [torch.zeros_like(p) for p in tree_leaves(params)])


def _fused(
    init: Callable[[Any], Any], step: Callable[[list[torch.Tensor], Any, list[torch.Tensor], Any], tuple[list[torch.Tensor], Any]]
) -> GradientTransformation:
    """A transform from ``step(grad leaves, state, param leaves, treespec, ops) -> (new param leaves, state)``;
    state trees shaped like the params are read and rebuilt with the params' treespec, and new
    state tensors are produced with ``ops`` (in place into a donated old state, else out of place)."""

    def apply(grads: Any, state: Any, params: Any, *, donate: bool = False, consume: bool = False) -> tuple[Any, Any]:
        p, spec = tree_flatten(params)
        new_params, state = step(take_leaves(grads, spec, consume), state, p, spec, fe.DONATE if donate else fe.PURE)
        return spec.unflatten(new_params), state

    return from_apply(init, apply)


class SGDState(NamedTuple):
    count: torch.Tensor
    lr: torch.Tensor
    momentum_buffer: Any


def sgd(
    lr: LearningRate = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> GradientTransformation:
    """Stochastic gradient descent, as ``torch.optim.SGD`` (momentum, dampening, nesterov, L2 decay).

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    """
    schedule = as_schedule(lr)
    momentum = _check("momentum", momentum, opt="sgd")
    dampening = _check("dampening", dampening, opt="sgd")
    weight_decay = _check("weight_decay", weight_decay, opt="sgd")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ConfigError("sgd: nesterov=True requires momentum > 0 and dampening = 0")

    def init(params: Any) -> SGDState:
        return SGDState(new_count(), schedule(0).to(torch.float64), _zeros(params) if momentum else None)

    def step(g: list[torch.Tensor], state: SGDState, p: list[torch.Tensor], spec: Any, ops: fe.StateOps) -> tuple[list[torch.Tensor], SGDState]:
        if weight_decay:
            g = fe.add(g, p, alpha=weight_decay)
        buf = state.momentum_buffer
        if momentum:
            old = spec.flatten_up_to(buf)
            if not dampening:  # the zero-initialised buffer gives torch's first step exactly
                new = fe.add_(ops.mul(old, momentum), g)
            else:  # torch copies the gradient into the buffer at the first step
                first = host(state.count) == 0
                if isinstance(first, torch.Tensor):
                    new = fe.where(first, g, fe.add_(ops.mul(old, momentum), g, alpha=1 - dampening))
                else:
                    new = [x.clone() for x in g] if first else fe.add_(ops.mul(old, momentum), g, alpha=1 - dampening)
            g = fe.add(g, new, alpha=momentum) if nesterov else new
            buf = spec.unflatten(new)
        new_p = axpy(p, g, -host(state.lr), ops)
        count = state.count + 1
        return new_p, SGDState(count, next_lr(schedule, state.lr, count), buf)

    return _fused(init, step)


class AdamState(NamedTuple):
    count: torch.Tensor
    lr: torch.Tensor
    mu: Any
    nu: Any
    nu_max: Any


def _adam(
    opt: str,
    lr: LearningRate,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    decoupled: bool,
    mask: Callable[[Any], Any] | Any | None = None,
) -> GradientTransformation:
    schedule = as_schedule(lr)
    b1 = _check("betas[0]", betas[0], high=1.0, opt=opt)
    b2 = _check("betas[1]", betas[1], high=1.0, opt=opt)
    eps = _check("eps", eps, opt=opt)
    weight_decay = _check("weight_decay", weight_decay, opt=opt)

    def init(params: Any) -> AdamState:
        return AdamState(
            new_count(), schedule(0).to(torch.float64), _zeros(params), _zeros(params), _zeros(params) if amsgrad else None
        )

    def step(g: list[torch.Tensor], state: AdamState, p: list[torch.Tensor], spec: Any, ops: fe.StateOps) -> tuple[list[torch.Tensor], AdamState]:
        lr_now = host(state.lr)
        if weight_decay and decoupled:
            if mask is None:
                p = ops.mul(p, 1 - lr_now * weight_decay)
            else:
                flags = tree_leaves(mask(spec.unflatten(p)) if callable(mask) else mask)
                kept = p if ops.donate else [x.clone() for x in p]  # updated in place below
                p = [ops.mul([x], 1 - lr_now * weight_decay)[0] if f else k for x, k, f in zip(p, kept, flags)]
        elif weight_decay:
            g = fe.add(g, p, alpha=weight_decay)
        count = state.count + 1
        mu = ops.lerp(spec.flatten_up_to(state.mu), g, 1 - b1)
        nu = fe.addcmul_(ops.mul(spec.flatten_up_to(state.nu), b2), g, g, 1 - b2)
        nu_max = ops.maximum(spec.flatten_up_to(state.nu_max), nu) if amsgrad else None
        g.clear()  # the last read of the gradients: when consumed, the denominator reuses their (cache-warm) memory
        c = host(count)
        bias_correction1, bias_correction2 = 1 - b1**c, 1 - b2**c
        root2, step_size = fe.materialize(p, bias_correction2**0.5, -(lr_now / bias_correction1))
        denom = fe.add_(fe.div_(fe.sqrt(nu_max if amsgrad else nu), root2), eps)
        # p is a fresh tensor when decoupled decay ran: update it in place (same kernels as torch)
        new_p = addcdiv(p, mu, denom, step_size, fe.DONATE if weight_decay and decoupled else ops)
        new_state = AdamState(
            count,
            next_lr(schedule, state.lr, count),
            spec.unflatten(mu),
            spec.unflatten(nu),
            spec.unflatten(nu_max) if amsgrad else None,
        )
        return new_p, new_state

    return _fused(init, step)


def adam(
    lr: LearningRate = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
) -> GradientTransformation:
    """Adam, as ``torch.optim.Adam`` (coupled L2 ``weight_decay``, ``amsgrad``).

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.adam(lr=1e-3, amsgrad=True)
    """
    return _adam("adam", lr, betas, eps, weight_decay, amsgrad, decoupled=False)


def adamw(
    lr: LearningRate = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    mask: Callable[[Any], Any] | Any | None = None,
) -> GradientTransformation:
    """AdamW, as ``torch.optim.AdamW`` (decoupled weight decay).

    Args:
        mask: a tree of bools like the params (or a function params -> that tree, such as
            ``flo.ndim_mask(2)``); weight decay applies only where it is True (e.g. not to biases).

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.adamw(lr=flo.warmup_cosine(1e-3, warmup_steps=100, decay_steps=10_000), weight_decay=0.01)
    """
    return _adam("adamw", lr, betas, eps, weight_decay, amsgrad, decoupled=True, mask=mask)


class RMSpropState(NamedTuple):
    count: torch.Tensor
    lr: torch.Tensor
    square_avg: Any
    momentum_buffer: Any
    grad_avg: Any


def rmsprop(
    lr: LearningRate = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
) -> GradientTransformation:
    """RMSprop, as ``torch.optim.RMSprop`` (momentum, centered, L2 decay).

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.rmsprop(lr=1e-2, momentum=0.9, centered=True)
    """
    schedule = as_schedule(lr)
    alpha = _check("alpha", alpha, opt="rmsprop")
    eps = _check("eps", eps, opt="rmsprop")
    weight_decay = _check("weight_decay", weight_decay, opt="rmsprop")
    momentum = _check("momentum", momentum, opt="rmsprop")

    def init(params: Any) -> RMSpropState:
        return RMSpropState(
            new_count(),
            schedule(0).to(torch.float64),
            _zeros(params),
            _zeros(params) if momentum else None,
            _zeros(params) if centered else None,
        )

    def step(g: list[torch.Tensor], state: RMSpropState, p: list[torch.Tensor], spec: Any, ops: fe.StateOps) -> tuple[list[torch.Tensor], RMSpropState]:
        if weight_decay:
            g = fe.add(g, p, alpha=weight_decay)
        sq = fe.addcmul_(ops.mul(spec.flatten_up_to(state.square_avg), alpha), g, g, 1 - alpha)
        grad_avg = state.grad_avg
        if centered:
            ga = ops.lerp(spec.flatten_up_to(grad_avg), g, 1 - alpha)
            avg = fe.add_(fe.sqrt_(fe.addcmul(sq, ga, ga, -1)), eps)
            grad_avg = spec.unflatten(ga)
        else:
            avg = fe.add_(fe.sqrt(sq), eps)
        buf = state.momentum_buffer
        lr_now = host(state.lr)
        if momentum:
            new_buf = fe.addcdiv_(ops.mul(spec.flatten_up_to(buf), momentum), g, avg)
            new_p = axpy(p, new_buf, -lr_now, ops)
            buf = spec.unflatten(new_buf)
        else:
            new_p = addcdiv(p, g, avg, -lr_now, ops)
        count = state.count + 1
        new_state = RMSpropState(count, next_lr(schedule, state.lr, count), spec.unflatten(sq), buf, grad_avg)
        return new_p, new_state

    return _fused(init, step)


class AdagradState(NamedTuple):
    count: torch.Tensor
    lr: torch.Tensor
    sum: Any


def adagrad(
    lr: LearningRate = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
) -> GradientTransformation:
    """Adagrad, as ``torch.optim.Adagrad`` (``lr_decay``, L2 decay, initial accumulator).

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.adagrad(lr=1e-2, lr_decay=1e-3)
    """
    schedule = as_schedule(lr)
    lr_decay = _check("lr_decay", lr_decay, opt="adagrad")
    weight_decay = _check("weight_decay", weight_decay, opt="adagrad")
    initial_accumulator_value = _check("initial_accumulator_value", initial_accumulator_value, opt="adagrad")
    eps = _check("eps", eps, opt="adagrad")

    def init(params: Any) -> AdagradState:
        acc = [torch.full_like(p, initial_accumulator_value) for p in tree_leaves(params)]
        return AdagradState(new_count(), schedule(0).to(torch.float64), leaves_like(params, acc))

    def step(g: list[torch.Tensor], state: AdagradState, p: list[torch.Tensor], spec: Any, ops: fe.StateOps) -> tuple[list[torch.Tensor], AdagradState]:
        count = state.count + 1
        if weight_decay:
            g = fe.add(g, p, alpha=weight_decay)
        minus_clr = -host(state.lr) / (1 + (host(count) - 1) * lr_decay)
        total = ops.addcmul(spec.flatten_up_to(state.sum), g, g, 1)
        std = fe.add_(fe.sqrt(total), eps)
        new_p = addcdiv(p, fe.mul(g, minus_clr), std, 1.0, ops)
        new_state = AdagradState(count, next_lr(schedule, state.lr, count), spec.unflatten(total))
        return new_p, new_state

    return _fused(init, step)
