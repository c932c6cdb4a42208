"""Optimizers with the numerics of their ``torch.optim`` counterparts (foreach implementation).

Each alias is a ``chain`` of the small transforms of :mod:`fnloop.optim._scale`, whose ``update``
is the optax-style meaning, and carries a ``fused`` path that runs torch.optim's foreach kernels
op for op over the same state (:mod:`fnloop.optim._kernels`): a train step gets bitwise
torch.optim's parameters. Each alias takes torch.optim's argument names and defaults; ``lr`` is a
float, a one-element tensor or a schedule. The learning rate in force is a float64 0-d tensor of
the state, so a changing learning rate never recompiles a step.

Example:
    >>> import torch, fnloop.optim as flo
    >>> tx = flo.adamw(lr=1e-3, weight_decay=0.01)
    >>> params = {"w": torch.ones(2)}
    >>> updates, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
    >>> updates["w"]
    tensor([-0.0010, -0.0010])
    >>> [type(s).__name__ for s in state]
    ['ScaleByAdamState', 'EmptyState', 'ScaleByLearningRateState']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fnloop.errors import ConfigError
from fnloop.optim import _kernels
from fnloop.optim._learning_rate import scale_by_learning_rate, scale_by_schedule
from fnloop.optim._scale import check_number, scale, scale_by_adam, scale_by_rms, scale_by_rss, trace
from fnloop.optim.base import GradientTransformation, LearningRate, as_schedule, chain
from fnloop.optim.transforms import add_decayed_weights

__all__ = ["sgd", "adam", "adamw", "rmsprop", "adagrad"]


def _chain(*parts: tuple[str, GradientTransformation] | None) -> tuple[GradientTransformation, dict[str, int]]:
    """The chain of the given ``(name, transform)`` parts (None: left out) and each name's position."""
    kept = [part for part in parts if part is not None]
    return chain(*(t for _, t in kept)), {name: i for i, (name, _) in enumerate(kept)}


def _prologue(maximize: bool, weight_decay: Any) -> tuple[tuple[str, GradientTransformation] | None, ...]:
    """torch.optim's first two steps: ascend for ``maximize``, add coupled L2 weight decay."""
    return (
        ("maximize", scale(-1.0)) if maximize else None,
        ("weight_decay", add_decayed_weights(weight_decay)) if _kernels.on(weight_decay) else None,
    )


def sgd(
    lr: LearningRate = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Stochastic gradient descent, as ``torch.optim.SGD`` (momentum, dampening, nesterov, L2 decay,
    ``maximize``): ``chain(scale(-1)?, add_decayed_weights?, trace?, scale_by_learning_rate)``.

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    """
    schedule = as_schedule(lr)
    momentum = check_number("momentum", momentum, opt="sgd")
    dampening = check_number("dampening", dampening, opt="sgd")
    weight_decay = check_number("weight_decay", weight_decay, opt="sgd")
    if nesterov and not isinstance(momentum, torch.Tensor) and (momentum <= 0 or dampening != 0):
        raise ConfigError("sgd: nesterov=True requires momentum > 0 and dampening = 0")
    tx, at = _chain(
        *_prologue(maximize, weight_decay),
        ("trace", trace(momentum, dampening=dampening, nesterov=nesterov)) if _kernels.on(momentum) else None,
        ("lr", scale_by_learning_rate(schedule)),
    )
    kernel = _kernels.sgd(
        schedule,
        maximize=maximize,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        at=at,
    )
    return tx._replace(fused=_kernels.fused(kernel))


def _adam(
    opt: str,
    lr: LearningRate,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    mask: Callable[[Any], Any] | Any | None = None,
) -> GradientTransformation:
    schedule = as_schedule(lr)
    b1 = check_number("betas[0]", betas[0], high=1.0, opt=opt)
    b2 = check_number("betas[1]", betas[1], high=1.0, opt=opt)
    eps = check_number("eps", eps, opt=opt)
    weight_decay = check_number("weight_decay", weight_decay, opt=opt)
    decay = ("decoupled", add_decayed_weights(weight_decay, mask)) if _kernels.on(weight_decay) and decoupled else None
    tx, at = _chain(
        *_prologue(maximize, 0.0 if decoupled else weight_decay),
        ("adam", scale_by_adam(b1, b2, eps, amsgrad=amsgrad)),
        decay,
        ("lr", scale_by_learning_rate(schedule)),
    )
    kernel = _kernels.adam(
        schedule,
        maximize=maximize,
        weight_decay=weight_decay,
        decoupled=decoupled,
        mask=mask,
        b1=b1,
        b2=b2,
        eps=eps,
        amsgrad=amsgrad,
        at=at,
    )
    return tx._replace(fused=_kernels.fused(kernel))


def adam(
    lr: LearningRate = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Adam, as ``torch.optim.Adam`` (coupled L2 ``weight_decay``, ``amsgrad``, ``maximize``):
    ``chain(scale(-1)?, add_decayed_weights?, scale_by_adam, scale_by_learning_rate)``.

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.adam(lr=1e-3, amsgrad=True)
    """
    return _adam("adam", lr, betas, eps, weight_decay, amsgrad, maximize, decoupled=False)


def adamw(
    lr: LearningRate = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    mask: Callable[[Any], Any] | Any | None = None,
) -> GradientTransformation:
    """AdamW, as ``torch.optim.AdamW`` (decoupled weight decay):
    ``chain(scale(-1)?, scale_by_adam, add_decayed_weights?, scale_by_learning_rate)``.

    Args:
        mask: a tree of bools like the params (or a function params -> that tree, such as
            ``flo.ndim_mask(2)``); weight decay applies only where it is True (e.g. not to biases).

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.adamw(lr=flo.warmup_cosine(1e-3, warmup_steps=100, decay_steps=10_000), weight_decay=0.01)
    """
    return _adam("adamw", lr, betas, eps, weight_decay, amsgrad, maximize, decoupled=True, mask=mask)


def rmsprop(
    lr: LearningRate = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """RMSprop, as ``torch.optim.RMSprop`` (momentum, centered, L2 decay, ``maximize``):
    ``chain(scale(-1)?, add_decayed_weights?, scale_by_rms, trace?, scale_by_learning_rate)``.

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.rmsprop(lr=1e-2, momentum=0.9, centered=True)
    """
    schedule = as_schedule(lr)
    alpha = check_number("alpha", alpha, opt="rmsprop")
    eps = check_number("eps", eps, opt="rmsprop")
    weight_decay = check_number("weight_decay", weight_decay, opt="rmsprop")
    momentum = check_number("momentum", momentum, opt="rmsprop")
    tx, at = _chain(
        *_prologue(maximize, weight_decay),
        ("rms", scale_by_rms(alpha, eps, centered=centered)),
        ("trace", trace(momentum)) if _kernels.on(momentum) else None,
        ("lr", scale_by_learning_rate(schedule)),
    )
    kernel = _kernels.rmsprop(
        schedule,
        maximize=maximize,
        weight_decay=weight_decay,
        momentum=momentum,
        centered=centered,
        alpha=alpha,
        eps=eps,
        at=at,
    )
    return tx._replace(fused=_kernels.fused(kernel))


def adagrad(
    lr: LearningRate = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Adagrad, as ``torch.optim.Adagrad`` (``lr_decay``, L2 decay, initial accumulator, ``maximize``):
    ``chain(scale(-1)?, add_decayed_weights?, scale_by_rss, scale_by_schedule?, scale_by_learning_rate)``,
    where ``lr_decay`` scales the step ``k`` (from 0) by ``1 / (1 + k * lr_decay)``.

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.adagrad(lr=1e-2, lr_decay=1e-3)
    """
    schedule = as_schedule(lr)
    lr_decay = check_number("lr_decay", lr_decay, opt="adagrad")
    weight_decay = check_number("weight_decay", weight_decay, opt="adagrad")
    initial_accumulator_value = check_number("initial_accumulator_value", initial_accumulator_value, opt="adagrad")
    eps = check_number("eps", eps, opt="adagrad")
    tx, at = _chain(
        *_prologue(maximize, weight_decay),
        ("rss", scale_by_rss(initial_accumulator_value, eps)),
        ("decay", scale_by_schedule(lambda count: 1 / (1 + count * lr_decay))) if _kernels.on(lr_decay) else None,
        ("lr", scale_by_learning_rate(schedule)),
    )
    lr_dtype = lr.dtype if isinstance(lr, torch.Tensor) else None
    kernel = _kernels.adagrad(
        schedule, maximize=maximize, weight_decay=weight_decay, lr_decay=lr_decay, eps=eps, lr_dtype=lr_dtype, at=at
    )
    return tx._replace(fused=_kernels.fused(kernel))
