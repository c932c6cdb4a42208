"""The fused paths of the aliases: ``torch.optim``'s foreach kernels, op for op, over the states
of the aliases' chains, so parameters stay bitwise equal to torch.optim's.

A kernel is ``kernel(g, state, p, spec, ops) -> (new p, new state)``: ``g`` and ``p`` are the
gradient and param leaves, ``state`` the chain's tuple of states (trees shaped like the params
are read and rebuilt with the params' treespec ``spec``), ``ops`` the :class:`~fnloop.optim._foreach.StateOps`
of the call: in place into a donated state, out of place while autograd records a graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fnloop.optim import _foreach as fe
from fnloop.optim._learning_rate import advance_lr
from fnloop.optim._scale import ScaleByAdamState, ScaleByRmsState, ScaleByRssState, TraceState
from fnloop.optim.base import Fused, Schedule, addcdiv, addcmul, axpy, host, lerp, take_leaves
from fnloop.tree import tree_flatten, tree_leaves

Leaves = list[torch.Tensor]
Kernel = Callable[[Leaves, tuple[Any, ...], Leaves, Any, fe.StateOps], tuple[Leaves, tuple[Any, ...]]]

__all__ = ["fused", "sgd", "adam", "rmsprop", "adagrad"]


def fused(kernel: Kernel) -> Fused:
    """The fused path ``(grads, opt_state, params, *, donate=False, consume=False) -> (new_params,
    opt_state)`` running ``kernel``; whether autograd records the update is checked once per call."""

    def apply(grads: Any, state: Any, params: Any, *, donate: bool = False, consume: bool = False) -> tuple[Any, Any]:
        p, spec = tree_flatten(params)
        g = take_leaves(grads, spec, consume)
        if fe.records_graph(g, p):
            with fe.recording():
                new_p, state = kernel(g, state, p, spec, fe.GRAPH)
        else:
            new_p, state = kernel(g, state, p, spec, fe.DONATE if donate else fe.PURE)
        return spec.unflatten(new_p), state

    return apply


class _Numbers:
    """The hyperparameters as a kernel reads them at each call (named, so a stacking error names
    them): numbers as given; an injected one (a 0-d tensor of the state, :mod:`fnloop.optim.inject`)
    through :func:`host`, so eager mode runs the plain optimizer's arithmetic on its Python value,
    compiled and batched steps the tensor."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)
        self._values = tuple(values.values())
        self._injected = any(isinstance(v, torch.Tensor) for v in self._values)

    def __call__(self) -> tuple[Any, ...]:
        if not self._injected:
            return self._values
        return tuple(host(v) if isinstance(v, torch.Tensor) else v for v in self._values)


def on(value: Any) -> bool:
    """Whether a hyperparameter switches its part on: a nonzero number, or an injected tensor
    (whatever its value: members of a sweep share one structure)."""
    return isinstance(value, torch.Tensor) or bool(value)


def _put(state: tuple[Any, ...], new: dict[int, Any]) -> tuple[Any, ...]:
    """The chain state ``state`` with the entries at the positions in ``new`` replaced."""
    out = list(state)
    for i, s in new.items():
        out[i] = s
    return tuple(out)


def _signed(g: Leaves, p: Leaves, ops: fe.StateOps, maximize: bool, weight_decay: Any, decay: bool) -> Leaves:
    """torch's first lines: negate the gradients for ``maximize``, add coupled weight decay (``decay``)."""
    if maximize:
        g = fe.neg(g)
        return axpy(g, p, weight_decay, ops.fresh) if decay else g
    return axpy(g, p, weight_decay) if decay else g


def sgd(
    schedule: Schedule,
    *,
    maximize: bool,
    weight_decay: float,
    momentum: Any,
    dampening: float,
    nesterov: bool,
    at: dict[str, int],
) -> Kernel:
    """``torch.optim.SGD``'s ``_multi_tensor_sgd``."""
    numbers = _Numbers(weight_decay=weight_decay, momentum=momentum)
    decay, with_momentum = on(weight_decay), on(momentum)

    def kernel(
        g: Leaves, state: tuple[Any, ...], p: Leaves, spec: Any, ops: fe.StateOps
    ) -> tuple[Leaves, tuple[Any, ...]]:
        lr = state[at["lr"]]
        weight_decay, momentum = numbers()
        g = _signed(g, p, ops, maximize, weight_decay, decay)
        new_state: dict[int, Any] = {}
        if with_momentum:
            tr: TraceState = state[at["trace"]]
            old = spec.flatten_up_to(tr.trace)
            count = tr.count
            if not dampening:  # the zero-initialised buffer gives torch's first step exactly
                new = ops.add_(ops.mul(old, momentum), g)
            else:  # torch copies the gradient into the buffer at the first step (dampening is never injected)
                first = host(count) == 0
                if isinstance(first, torch.Tensor):
                    new = fe.where(first, g, axpy(ops.mul(old, momentum), g, 1 - dampening, ops.fresh))
                else:
                    new = [x.clone() for x in g] if first else axpy(ops.mul(old, momentum), g, 1 - dampening, ops.fresh)
                count = count + 1
            g = axpy(g, new, momentum) if nesterov else new
            new_state[at["trace"]] = TraceState(spec.unflatten(new), count)
        new_p = axpy(p, g, -host(lr.lr), ops)
        new_state[at["lr"]] = advance_lr(schedule, lr)
        return new_p, _put(state, new_state)

    return kernel


def adam(
    schedule: Schedule,
    *,
    maximize: bool,
    weight_decay: float,
    decoupled: bool,
    mask: Any,
    b1: float,
    b2: float,
    eps: float,
    amsgrad: bool,
    at: dict[str, int],
) -> Kernel:
    """``torch.optim.Adam``'s and ``AdamW``'s ``_multi_tensor_adam`` (not capturable)."""
    numbers = _Numbers(weight_decay=weight_decay, b1=b1, b2=b2, eps=eps)
    decay = on(weight_decay)

    def kernel(
        g: Leaves, state: tuple[Any, ...], p: Leaves, spec: Any, ops: fe.StateOps
    ) -> tuple[Leaves, tuple[Any, ...]]:
        lr, s = state[at["lr"]], state[at["adam"]]
        lr_now = host(lr.lr)
        weight_decay, b1, b2, eps = numbers()
        g = _signed(g, p, ops, maximize, weight_decay, decay and not decoupled)
        if decay and decoupled:
            if mask is None:
                p = ops.mul(p, 1 - lr_now * weight_decay)
            else:
                flags = tree_leaves(mask(spec.unflatten(p)) if callable(mask) else mask)
                kept = p if ops.donate else [x.clone() for x in p]  # updated in place below
                p = [ops.mul([x], 1 - lr_now * weight_decay)[0] if f else k for x, k, f in zip(p, kept, flags)]
        count = s.count + 1
        mu = lerp(spec.flatten_up_to(s.mu), g, 1 - b1, ops)
        nu = addcmul(ops.mul(spec.flatten_up_to(s.nu), b2), g, g, 1 - b2, ops.fresh)
        nu_max = ops.maximum(spec.flatten_up_to(s.nu_max), nu) if amsgrad else None
        g.clear()  # the last read of the gradients: when consumed, the denominator reuses their (cache-warm) memory
        c = host(count)
        bias_correction1, bias_correction2 = 1 - b1**c, 1 - b2**c
        root2, step_size = fe.materialize(p, bias_correction2**0.5, -(lr_now / bias_correction1))
        denom = ops.add_(ops.div_(fe.sqrt(nu_max if amsgrad else nu), root2), eps)
        # p is a fresh tensor when decoupled decay ran: update it in place (same kernels as torch)
        new_p = addcdiv(p, mu, denom, step_size, ops.fresh if decay and decoupled else ops)
        new_s = ScaleByAdamState(
            count, spec.unflatten(mu), spec.unflatten(nu), spec.unflatten(nu_max) if amsgrad else None
        )
        return new_p, _put(state, {at["adam"]: new_s, at["lr"]: advance_lr(schedule, lr)})

    return kernel


def rmsprop(
    schedule: Schedule,
    *,
    maximize: bool,
    weight_decay: float,
    momentum: float,
    centered: bool,
    alpha: float,
    eps: float,
    at: dict[str, int],
) -> Kernel:
    """``torch.optim.RMSprop``'s ``_multi_tensor_rmsprop`` (not capturable)."""
    numbers = _Numbers(weight_decay=weight_decay, momentum=momentum, alpha=alpha, eps=eps)
    decay, with_momentum = on(weight_decay), on(momentum)

    def kernel(
        g: Leaves, state: tuple[Any, ...], p: Leaves, spec: Any, ops: fe.StateOps
    ) -> tuple[Leaves, tuple[Any, ...]]:
        lr, s = state[at["lr"]], state[at["rms"]]
        weight_decay, momentum, alpha, eps = numbers()
        g = _signed(g, p, ops, maximize, weight_decay, decay)
        sq = addcmul(ops.mul(spec.flatten_up_to(s.square_avg), alpha), g, g, 1 - alpha, ops.fresh)
        grad_avg = s.grad_avg
        if centered:
            ga = lerp(spec.flatten_up_to(grad_avg), g, 1 - alpha, ops)
            avg = ops.add_(ops.sqrt_(fe.addcmul(sq, ga, ga, -1)), eps)
            grad_avg = spec.unflatten(ga)
        else:
            avg = ops.add_(fe.sqrt(sq), eps)
        lr_now = host(lr.lr)
        new_state = {at["rms"]: ScaleByRmsState(spec.unflatten(sq), grad_avg), at["lr"]: advance_lr(schedule, lr)}
        if with_momentum:
            tr: TraceState = state[at["trace"]]
            buf = ops.addcdiv_(ops.mul(spec.flatten_up_to(tr.trace), momentum), g, avg)
            new_p = axpy(p, buf, -lr_now, ops)
            new_state[at["trace"]] = TraceState(spec.unflatten(buf), tr.count)
        else:
            new_p = addcdiv(p, g, avg, -lr_now, ops)
        return new_p, _put(state, new_state)

    return kernel


def adagrad(
    schedule: Schedule,
    *,
    maximize: bool,
    weight_decay: float,
    lr_decay: float,
    eps: float,
    lr_dtype: torch.dtype | None,
    at: dict[str, int],
) -> Kernel:
    """``torch.optim.Adagrad``'s ``_multi_tensor_adagrad``; with a tensor learning rate (of dtype
    ``lr_dtype``) torch computes the decayed rate in that dtype, and so does this kernel."""
    numbers = _Numbers(weight_decay=weight_decay, lr_decay=lr_decay, eps=eps)
    decay = on(weight_decay)

    def kernel(
        g: Leaves, state: tuple[Any, ...], p: Leaves, spec: Any, ops: fe.StateOps
    ) -> tuple[Leaves, tuple[Any, ...]]:
        lr, s = state[at["lr"]], state[at["rss"]]
        weight_decay, lr_decay, eps = numbers()
        g = _signed(g, p, ops, maximize, weight_decay, decay)
        lr_now = host(lr.lr)
        if lr_dtype is not None:
            lr_now = torch.as_tensor(lr_now).to(lr_dtype)
        minus_clr = -lr_now / (1 + host(lr.count) * lr_decay)
        total = ops.addcmul(spec.flatten_up_to(s.sum), g, g, 1)
        std = ops.add_(fe.sqrt(total), eps)
        new_p = addcdiv(p, fe.mul(g, minus_clr), std, 1.0, ops)
        new_state = {at["rss"]: ScaleByRssState(spec.unflatten(total)), at["lr"]: advance_lr(schedule, lr)}
        if "decay" in at:
            new_state[at["decay"]] = state[at["decay"]]._replace(count=state[at["decay"]].count + 1)
        return new_p, _put(state, new_state)

    return kernel
