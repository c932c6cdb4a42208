"""The optax-shaped core: ``GradientTransformation``, ``chain``, ``apply_updates`` and the
learning-rate plumbing shared by every optimizer.

Example:
    >>> import torch, fnloop.optim as flo
    >>> tx = flo.chain(flo.clip_by_global_norm(1.0), flo.sgd(lr=0.1))
    >>> params = {"w": torch.ones(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
    >>> flo.apply_updates(params, updates)["w"]
    tensor([0.9293, 0.9293])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from fnloop.errors import ConfigError
from fnloop.optim import _foreach as fe
from fnloop.optim import schedules
from fnloop.optim._schedule_impl import _Constant
from fnloop.tree import NAMESPACE, tree_flatten, tree_leaves

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "identity",
    "chain",
    "apply_updates",
    "learning_rate",
    "as_schedule",
    "leaves_like",
    "take_leaves",
    "new_count",
    "host",
    "from_apply",
    "fused_apply",
    "axpy",
    "addcdiv",
    "addcmul",
    "lerp",
]

Schedule = Callable[[Any], torch.Tensor]
LearningRate = float | torch.Tensor | Schedule
Fused = Callable[..., tuple[Any, Any]]


class GradientTransformation(NamedTuple):
    """A pair of pure functions, and optionally a fused path that applies the update.

    ``init(params) -> opt_state`` and ``update(grads, opt_state, params) -> (updates, opt_state)``;
    neither mutates its inputs. ``fused(grads, opt_state, params, *, donate=False, consume=False)
    -> (new_params, opt_state)``, where present, gives the new params directly, with the
    arithmetic of torch.optim's in-place kernels: ``donate=True`` lets it overwrite ``params`` and
    ``opt_state`` (the caller gives them up), ``consume=True`` lets it empty ``grads`` (a dict the
    caller built) to free each gradient after its last read. Use it through :func:`fused_apply`.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.GradientTransformation(lambda params: (), lambda u, state, params=None: (u, state))
        >>> tx.fused is None
        True
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]
    fused: Fused | None = None


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


def identity() -> GradientTransformation:
    """The transform that returns the gradients unchanged.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> flo.identity().update({"w": torch.ones(1)}, flo.EmptyState())[0]
        {'w': tensor([1.])}
    """
    return GradientTransformation(lambda params: EmptyState(), lambda updates, state, params=None: (updates, state))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transforms one after the other; the state is the tuple of their states.

    The fused path runs the updates of all but the last transform, then the last one's fused path.

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.chain(flo.clip_by_global_norm(1.0), flo.adam(lr=1e-3))
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise ConfigError(f"chain: argument {i} is a {type(t).__name__}, expected a GradientTransformation")

    def init(params: Any) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Any, state: tuple[Any, ...], params: Any = None) -> tuple[Any, tuple[Any, ...]]:
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    if not transforms:
        return GradientTransformation(init, update)
    last_fused = fused_apply(transforms[-1])

    def fused(
        grads: Any, state: tuple[Any, ...], params: Any, *, donate: bool = False, consume: bool = False
    ) -> tuple[Any, tuple[Any, ...]]:
        if torch.is_grad_enabled() and fe.records_graph(tree_leaves(grads), tree_leaves(params)):
            with fe.recording():  # the leading updates too run leaf by leaf
                return composed(grads, state, params, donate=donate, consume=consume)
        return composed(grads, state, params, donate=donate, consume=consume)

    def composed(
        grads: Any, state: tuple[Any, ...], params: Any, *, donate: bool = False, consume: bool = False
    ) -> tuple[Any, tuple[Any, ...]]:
        new_state = []
        for t, s in zip(transforms[:-1], state):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        new_params, s = last_fused(grads, state[-1], params, donate=donate, consume=consume)
        return new_params, (*new_state, s)

    return GradientTransformation(init, update, fused)


def take_leaves(grads: Any, spec: Any, consume: bool) -> list[torch.Tensor]:
    """The leaves of ``grads`` (structured like the params' treespec ``spec``) as a new list;
    with ``consume``, a dict ``grads`` is emptied, so that list holds the only references and
    dropping a leaf from it frees that gradient."""
    leaves = spec.flatten_up_to(grads)
    if consume and type(grads) is dict:
        grads.clear()
    return leaves  # type: ignore[no-any-return]


def leaves_like(tree: Any, leaves: list[torch.Tensor]) -> Any:
    """Rebuild ``tree``'s structure with new leaves."""
    return optree.tree_structure(tree, namespace=NAMESPACE).unflatten(leaves)


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` leaf by leaf (one multi-tensor op), cast to the params' dtypes.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> flo.apply_updates({"w": torch.ones(2)}, {"w": torch.full((2,), -0.5)})
        {'w': tensor([0.5000, 0.5000])}
    """
    p, spec = tree_flatten(params)
    u = tree_leaves(updates)
    if len(p) != len(u):
        raise ConfigError(f"apply_updates: params have {len(p)} leaves but updates have {len(u)}")
    return spec.unflatten(fe.add(p, u))


def host(value: torch.Tensor) -> Any:
    """A host-side scalar of the optimizer state (a step counter or a learning rate, kept as a
    0-d CPU tensor) as a Python number in eager mode, as torch.optim reads them (no device sync);
    the tensor (int counters as float64) while compiling or under ``torch.func`` transforms.
    """
    if torch.compiler.is_compiling() or fe._is_wrapped(value) or value.device.type != "cpu":
        return value.to(torch.float64) if not value.is_floating_point() else value
    return value.item()


def from_apply(init: Callable[[Any], Any], apply: Fused) -> GradientTransformation:
    """A transform defined by its fused path ``apply(grads, opt_state, params, *, donate=False,
    consume=False) -> (new_params, opt_state)`` (see :class:`GradientTransformation`).

    ``update`` returns ``new_params - params`` (params default to zeros).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> def apply(grads, state, params, *, donate=False, consume=False):
        ...     return {k: p - 0.5 * grads[k] for k, p in params.items()}, state
        >>> tx = flo.from_apply(lambda params: flo.EmptyState(), apply)
        >>> tx.update({"w": torch.ones(1)}, flo.EmptyState(), {"w": torch.ones(1)})[0]
        {'w': tensor([-0.5000])}
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            params = leaves_like(updates, [torch.zeros_like(u) for u in tree_leaves(updates)])
        new_params, state = apply(updates, state, params)
        return leaves_like(updates, fe.sub(tree_leaves(new_params), tree_leaves(params))), state

    return GradientTransformation(init, update, apply)


def fused_apply(tx: GradientTransformation) -> Fused:
    """``(grads, opt_state, params, *, donate=False, consume=False) -> (new_params, opt_state)``
    for any transform: its ``fused`` path where it has one, else ``update`` followed by
    :func:`apply_updates`.

    Called in grad mode on gradients or params that require grad (``create_graph=True``), the
    fused paths of fnloop's transforms record a correct autograd graph (a differentiable step).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.sgd(lr=0.5)
        >>> p = {"w": torch.ones(1)}
        >>> flo.fused_apply(tx)({"w": torch.ones(1)}, tx.init(p), p)[0]
        {'w': tensor([0.5000])}
    """
    fused = getattr(tx, "fused", None)
    if fused is not None:
        return fused  # type: ignore[no-any-return]

    def apply(grads: Any, state: Any, params: Any, *, donate: bool = False, consume: bool = False) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return apply_updates(params, updates), state

    return apply


def axpy(xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: Any, ops: fe.StateOps = fe.PURE) -> list[torch.Tensor]:
    """``x + alpha * y`` as the new value of ``xs`` (one fused kernel when ``alpha`` is a number)."""
    if isinstance(alpha, torch.Tensor):
        return ops.add(xs, fe.mul(ys, alpha))
    return ops.add(xs, ys, alpha=alpha)


def addcdiv(
    xs: list[torch.Tensor], ys: list[torch.Tensor], zs: list[torch.Tensor], value: Any, ops: fe.StateOps = fe.PURE
) -> list[torch.Tensor]:
    """``x + value * y / z`` as the new value of ``xs`` (one fused kernel when ``value`` is a number)."""
    if isinstance(value, torch.Tensor):
        return ops.add(xs, fe.mul(fe.div(ys, zs), value))
    return ops.addcdiv(xs, ys, zs, value)


def addcmul(
    xs: list[torch.Tensor], ys: list[torch.Tensor], zs: list[torch.Tensor], value: Any, ops: fe.StateOps = fe.PURE
) -> list[torch.Tensor]:
    """``x + value * y * z`` as the new value of ``xs`` (one fused kernel when ``value`` is a number)."""
    if isinstance(value, torch.Tensor):
        return ops.add(xs, fe.mul(fe.mul(ys, zs), value))
    return ops.addcmul(xs, ys, zs, value)


def lerp(xs: list[torch.Tensor], ys: list[torch.Tensor], weight: Any, ops: fe.StateOps = fe.PURE) -> list[torch.Tensor]:
    """``x + weight * (y - x)`` as the new value of ``xs`` (one fused kernel when ``weight`` is a number)."""
    if isinstance(weight, torch.Tensor):
        return ops.add(xs, fe.mul(fe.sub(ys, xs), weight))
    return ops.lerp(xs, ys, weight)


def new_count() -> torch.Tensor:
    """A fresh step counter: an int64 0-d CPU tensor."""
    return torch.zeros((), dtype=torch.int64)


def as_schedule(lr: LearningRate, *, name: str = "lr") -> Schedule:
    """Turn a float, a one-element tensor or a schedule into a schedule; validate a constant.

    A tensor learning rate is read once, as torch.optim reads it (its value, exactly).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> float(flo.as_schedule(0.1)(5)), float(flo.as_schedule(torch.tensor(0.5))(5))
        (0.1, 0.5)
    """
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ConfigError(f"{name} must be a float, a one-element floating-point tensor or a schedule, got {lr!r}")
        lr = lr.detach().item()
    elif callable(lr):
        return lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ConfigError(f"{name} must be a non-negative float or a schedule (fnloop.optim.warmup_cosine, ...), got {lr!r}")
    return schedules.constant(float(lr))


def is_constant(schedule: Schedule) -> bool:
    """Whether the schedule never changes (the LR tensor in the state need not be recomputed)."""
    return isinstance(schedule, _Constant)


def next_lr(schedule: Schedule, lr: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The learning rate in force after ``count`` updates."""
    return lr if is_constant(schedule) else schedule(count).to(lr.dtype)


def _find_lr(node: Any) -> torch.Tensor | None:
    if isinstance(node, tuple) and hasattr(node, "_fields") and "lr" in node._fields:
        return node.lr  # type: ignore[no-any-return]
    children = node.values() if isinstance(node, dict) else node if isinstance(node, (list, tuple)) else ()
    for child in children:
        found = _find_lr(child)
        if found is not None:
            return found
    return None


def learning_rate(opt_state: Any) -> torch.Tensor:
    """The learning rate in force (for the next update), read back from an optimizer state.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.sgd(lr=flo.step_lr(0.1, step_size=1, gamma=0.5))
        >>> float(flo.learning_rate(tx.init({"w": torch.ones(1)})))
        0.1
    """
    found = _find_lr(opt_state)
    if found is None:
        raise ConfigError("learning_rate: this optimizer state holds no learning rate (no state with an `lr` field)")
    return found
