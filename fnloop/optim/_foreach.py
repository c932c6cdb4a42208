"""Out-of-place multi-tensor ops: one kernel launch per leaf list, falling back to a per-leaf
loop under ``torch.func`` transforms (``vmap`` has no batching rule for ``_foreach`` ops).

Every function takes and returns lists of tensors and never mutates its inputs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

Tensors = Sequence[torch.Tensor]


_recording = 0  # > 0 while an update records an autograd graph (see `recording`)
per_leaf = False  # True while fnloop.vmap compiles or runs a compiled batched step: leaves are batched there


def _fallback(xs: Tensors) -> bool:
    """Per-leaf ops: under torch.func transforms, while recording an autograd graph, inside a
    compiled batched step, and for empty lists (no foreach kernel for those)."""
    return not xs or per_leaf or _recording > 0 or (not torch.compiler.is_compiling() and _is_wrapped(xs[0]))


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Run the ops of this block leaf by leaf: for an update that records an autograd graph
    (:func:`records_graph`). The backward formulas of torch's foreach kernels are not reliable
    (``_foreach_addcdiv``'s fails on leaves of different shapes); the per-leaf ops are, and give
    the same values. A process-wide switch: a plain update running meanwhile in another thread
    also goes leaf by leaf, slower but with the same results.
    """
    global _recording
    _recording += 1
    try:
        yield
    finally:
        _recording -= 1


def _scalar_like(xs: Tensors, y: Any) -> Any:
    """A 0-d tensor scalar (a learning rate or bias correction kept in float64 while compiling)
    cast to the leaves' dtype, so compiled kernels stay in that dtype and vectorize."""
    if isinstance(y, torch.Tensor) and y.ndim == 0 and xs and y.dtype != xs[0].dtype and xs[0].is_floating_point():
        return y.to(xs[0].dtype)
    return y


def materialize(xs: Tensors, *scalars: Any) -> tuple[Any, ...]:
    """The given scalars; while compiling for CPU leaves ``xs``, the 0-d CPU tensors among them
    are computed once per call into one small buffer that kernels read.

    Inductor inlines scalar arithmetic on tensors into every kernel that uses the result, and
    the CPU kernels then redo it for each vector of elements: a bias correction's ``pow`` inlined
    into an Adam update cost more than the update itself. Eager mode, other devices (where the
    scalars stay inlined) and torch versions without the prim used to pin the buffer return the
    scalars unchanged.
    """
    compiling_for_cpu = torch.compiler.is_compiling() and len(xs) > 0 and xs[0].device.type == "cpu"
    # not for batched leaves (fnloop.vmap): the prim has no vmap batching rule
    force = getattr(torch.ops.prims, "inductor_force_stride_order", None) if compiling_for_cpu and not per_leaf else None
    at = [i for i, s in enumerate(scalars) if isinstance(s, torch.Tensor) and s.ndim == 0 and s.device.type == "cpu"]
    if force is None or not at:
        return scalars
    dtype = functools.reduce(torch.promote_types, (scalars[i].dtype for i in at))
    packed = force(torch.stack([scalars[i].to(dtype) for i in at]), (1,))
    out = list(scalars)
    for j, i in enumerate(at):
        out[i] = packed[j].to(scalars[i].dtype)
    return tuple(out)


def _pairwise(name: str, op: Any) -> Any:
    fused = getattr(torch, f"_foreach_{name}")

    def fn(xs: Tensors, ys: Any, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        ys = _scalar_like(xs, ys)
        if _fallback(xs):
            if isinstance(ys, (list, tuple)):
                return [op(x, y, *args, **kwargs) for x, y in zip(xs, ys)]
            return [op(x, ys, *args, **kwargs) for x in xs]
        return list(fused(xs, ys, *args, **kwargs))

    fn.__name__ = name
    return fn


add = _pairwise("add", torch.add)
sub = _pairwise("sub", torch.sub)
mul = _pairwise("mul", torch.mul)
div = _pairwise("div", torch.div)
maximum = _pairwise("maximum", torch.maximum)
lerp = _pairwise("lerp", torch.lerp)


def _unary(name: str, op: Any) -> Any:
    fused = getattr(torch, f"_foreach_{name}")

    def fn(xs: Tensors) -> list[torch.Tensor]:
        if _fallback(xs):
            return [op(x) for x in xs]
        return list(fused(xs))

    fn.__name__ = name
    return fn


sqrt = _unary("sqrt", torch.sqrt)
neg = _unary("neg", torch.neg)
abs = _unary("abs", torch.abs)  # noqa: A001


def addcmul(xs: Tensors, ys: Tensors, zs: Tensors, value: float = 1.0) -> list[torch.Tensor]:
    """``x + value * y * z`` for every leaf."""
    if _fallback(xs):
        return [torch.addcmul(x, y, z, value=value) for x, y, z in zip(xs, ys, zs)]
    return list(torch._foreach_addcmul(xs, ys, zs, value))


def addcdiv(xs: Tensors, ys: Tensors, zs: Tensors, value: float = 1.0) -> list[torch.Tensor]:
    """``x + value * y / z`` for every leaf."""
    if _fallback(xs):
        return [torch.addcdiv(x, y, z, value=value) for x, y, z in zip(xs, ys, zs)]
    return list(torch._foreach_addcdiv(xs, ys, zs, value))


def norm(xs: Tensors) -> list[torch.Tensor]:
    """The 2-norm of every leaf."""
    if _fallback(xs):
        return [torch.linalg.vector_norm(x) for x in xs]
    return list(torch._foreach_norm(xs))


def clamp(xs: Tensors, lo: float, hi: float) -> list[torch.Tensor]:
    """Clamp every leaf to ``[lo, hi]``."""
    if _fallback(xs):
        return [torch.clamp(x, lo, hi) for x in xs]
    return list(torch._foreach_clamp_max(torch._foreach_clamp_min(xs, lo), hi))


def where(cond: torch.Tensor, xs: Tensors, ys: Tensors) -> list[torch.Tensor]:
    """``torch.where(cond, x, y)`` for every leaf pair (``cond`` is a 0-d bool tensor)."""
    return [torch.where(cond, x, y) for x, y in zip(xs, ys)]


def all_finite(xs: Tensors) -> torch.Tensor:
    """A 0-d bool tensor: every element of every leaf is finite (no host sync)."""
    flags = [torch.isfinite(x).all() for x in xs if x.is_floating_point() or x.is_complex()]
    if not flags:
        return torch.tensor(True)
    return torch.stack(flags).all()


# In-place variants, for tensors the caller has just allocated itself (never for inputs).


def _inplace_pairwise(name: str) -> Any:
    fused = getattr(torch, f"_foreach_{name}_")

    def fn(xs: Tensors, ys: Any, **kwargs: Any) -> list[torch.Tensor]:
        ys = _scalar_like(xs, ys)
        if _fallback(xs):
            if isinstance(ys, (list, tuple)):
                for x, y in zip(xs, ys):
                    getattr(x, f"{name}_")(y, **kwargs)
            else:
                for x in xs:
                    getattr(x, f"{name}_")(ys, **kwargs)
        else:
            fused(xs, ys, **kwargs)
        return list(xs)

    fn.__name__ = f"{name}_"
    return fn


add_ = _inplace_pairwise("add")
mul_ = _inplace_pairwise("mul")
div_ = _inplace_pairwise("div")


def sqrt_(xs: Tensors) -> list[torch.Tensor]:
    """In-place square root of every leaf."""
    if _fallback(xs):
        for x in xs:
            x.sqrt_()
    else:
        torch._foreach_sqrt_(xs)
    return list(xs)


def addcmul_(xs: Tensors, ys: Tensors, zs: Tensors, value: float = 1.0) -> list[torch.Tensor]:
    """In-place ``x += value * y * z``."""
    if _fallback(xs):
        for x, y, z in zip(xs, ys, zs):  # no batching rule for addcmul_: compute, then copy
            x.copy_(torch.addcmul(x, y, z, value=value))
    else:
        torch._foreach_addcmul_(xs, ys, zs, value)
    return list(xs)


def addcdiv_(xs: Tensors, ys: Tensors, zs: Tensors, value: float = 1.0) -> list[torch.Tensor]:
    """In-place ``x += value * y / z``."""
    if _fallback(xs):
        for x, y, z in zip(xs, ys, zs):
            x.copy_(torch.addcdiv(x, y, z, value=value))
    else:
        torch._foreach_addcdiv_(xs, ys, zs, value)
    return list(xs)


def lerp_(xs: Tensors, ys: Tensors, weight: float) -> list[torch.Tensor]:
    """In-place ``x += weight * (y - x)``."""
    if _fallback(xs):
        for x, y in zip(xs, ys):
            x.copy_(torch.lerp(x, y, weight))
    else:
        torch._foreach_lerp_(xs, ys, weight)
    return list(xs)


def maximum_(xs: Tensors, ys: Tensors) -> list[torch.Tensor]:
    """In-place elementwise maximum."""
    if _fallback(xs):
        for x, y in zip(xs, ys):
            torch.maximum(x, y, out=x)
    else:
        torch._foreach_maximum_(xs, ys)
    return list(xs)


class StateOps:
    """How an update produces new tensors.

    The next value of a state tensor (params, moments, buffers; the methods without a trailing
    underscore) is written in place into the old one when the caller donated the old state
    (``donate``), else out of place. A fresh temporary (the methods with a trailing underscore)
    is updated in place, unless autograd records the update (``graph``): a backward pass may need
    a temporary's old value (``sqrt`` keeps its result), so every op is then out of place.
    """

    def __init__(self, donate: bool, graph: bool = False) -> None:
        self.donate = donate and not graph
        self.graph = graph

    @property
    def fresh(self) -> StateOps:
        """The ops that give a fresh temporary its next value (in place unless recording a graph)."""
        return PURE if self.graph else DONATE

    def mul(self, xs: Tensors, y: Any) -> list[torch.Tensor]:
        return mul_(xs, y) if self.donate else mul(xs, y)

    def add(self, xs: Tensors, ys: Any, **kwargs: Any) -> list[torch.Tensor]:
        return add_(xs, ys, **kwargs) if self.donate else add(xs, ys, **kwargs)

    def lerp(self, xs: Tensors, ys: Tensors, weight: float) -> list[torch.Tensor]:
        return lerp_(xs, ys, weight) if self.donate else lerp(xs, ys, weight)

    def maximum(self, xs: Tensors, ys: Tensors) -> list[torch.Tensor]:
        return maximum_(xs, ys) if self.donate else maximum(xs, ys)

    def addcmul(self, xs: Tensors, ys: Tensors, zs: Tensors, value: float = 1.0) -> list[torch.Tensor]:
        return addcmul_(xs, ys, zs, value) if self.donate else addcmul(xs, ys, zs, value)

    def addcdiv(self, xs: Tensors, ys: Tensors, zs: Tensors, value: float = 1.0) -> list[torch.Tensor]:
        return addcdiv_(xs, ys, zs, value) if self.donate else addcdiv(xs, ys, zs, value)

    # fresh temporaries

    def add_(self, xs: Tensors, ys: Any, **kwargs: Any) -> list[torch.Tensor]:
        return add(xs, ys, **kwargs) if self.graph else add_(xs, ys, **kwargs)

    def mul_(self, xs: Tensors, y: Any) -> list[torch.Tensor]:
        return mul(xs, y) if self.graph else mul_(xs, y)

    def div_(self, xs: Tensors, y: Any) -> list[torch.Tensor]:
        return div(xs, y) if self.graph else div_(xs, y)

    def sqrt_(self, xs: Tensors) -> list[torch.Tensor]:
        return sqrt(xs) if self.graph else sqrt_(xs)

    def addcmul_(self, xs: Tensors, ys: Tensors, zs: Tensors, value: float = 1.0) -> list[torch.Tensor]:
        return addcmul(xs, ys, zs, value) if self.graph else addcmul_(xs, ys, zs, value)

    def addcdiv_(self, xs: Tensors, ys: Tensors, zs: Tensors, value: float = 1.0) -> list[torch.Tensor]:
        return addcdiv(xs, ys, zs, value) if self.graph else addcdiv_(xs, ys, zs, value)


PURE = StateOps(False)
DONATE = StateOps(True)
GRAPH = StateOps(False, graph=True)


def records_graph(*lists: Tensors) -> bool:
    """Whether autograd records ops on these leaves: grad mode is on and one of them requires
    grad (a differentiable optimizer step, as in MAML); one check per call. ``False`` at once
    when grad mode is off."""
    if not torch.is_grad_enabled():
        return False
    return any(x.requires_grad for xs in lists for x in xs)
