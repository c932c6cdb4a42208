"""Stateless gradient transforms: clipping, weight decay, masking.

Example:
    >>> import torch, fnloop.optim as flo
    >>> tx = flo.clip_by_global_norm(1.0)
    >>> g = {"w": torch.tensor([3.0, 4.0])}
    >>> tx.update(g, tx.init(g))[0]["w"]
    tensor([0.6000, 0.8000])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as torch_pytree

from fnloop.errors import ConfigError
from fnloop.optim import _foreach as fe
from fnloop.optim.base import EmptyState, GradientTransformation, leaves_like
from fnloop.tree import tree_leaves, tree_structure

__all__ = [
    "clip_by_global_norm",
    "global_norm",
    "clip",
    "add_decayed_weights",
    "masked",
    "MaskedState",
    "ndim_mask",
]


def _positive(name: str, value: float, opt: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{opt}: {name} must be a positive number, got {value!r}")
    return float(value)


def global_norm(tree: Any) -> torch.Tensor:
    """The 2-norm of all leaves together, as ``torch.nn.utils.clip_grad_norm_`` computes it.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> flo.global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
        tensor(5.)
    """
    leaves = torch_pytree.tree_leaves(tree)  # dicts in insertion (parameter) order, as torch sums
    if not leaves:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack(fe.norm(leaves)))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale the updates so their global 2-norm is at most ``max_norm``, with the numerics of
    ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)`` clamped to 1);
    no host sync.

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.chain(flo.clip_by_global_norm(1.0), flo.sgd(lr=0.1))
    """
    max_norm = _positive("max_norm", max_norm, "clip_by_global_norm")

    def update(updates: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        leaves = tree_leaves(updates)
        if not leaves:
            return updates, state
        coef = torch.clamp(max_norm / (global_norm(updates) + 1e-6), max=1.0)
        return leaves_like(updates, fe.mul(leaves, coef)), state

    return GradientTransformation(lambda params: EmptyState(), update)


def clip(max_delta: float) -> GradientTransformation:
    """Clamp every element of the updates to ``[-max_delta, max_delta]``
    (as ``torch.nn.utils.clip_grad_value_``).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> flo.clip(0.5).update({"w": torch.tensor([2.0, -0.1])}, flo.EmptyState())[0]["w"]
        tensor([ 0.5000, -0.1000])
    """
    max_delta = _positive("max_delta", max_delta, "clip")

    def update(updates: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        return leaves_like(updates, fe.clamp(tree_leaves(updates), -max_delta, max_delta)), state

    return GradientTransformation(lambda params: EmptyState(), update)


def _mask_flags(mask: Any, params: Any, opt: str) -> list[bool]:
    tree = mask(params) if callable(mask) else mask
    flags = tree_leaves(tree)
    if tree_structure(tree) != tree_structure(params):
        raise ConfigError(f"{opt}: the mask's tree does not match the params' tree ({len(flags)} mask leaves)")
    return [bool(f) for f in flags]


def add_decayed_weights(weight_decay: float = 0.0, mask: Any = None) -> GradientTransformation:
    """``updates + weight_decay * params`` (optionally only where ``mask`` is True).

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.chain(flo.add_decayed_weights(1e-4, mask=flo.ndim_mask(2)), flo.sgd(lr=0.1))
    """
    if not isinstance(weight_decay, torch.Tensor) and (  # a tensor: an injected hyperparameter
        isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0
    ):
        raise ConfigError(f"add_decayed_weights: weight_decay must be >= 0, got {weight_decay!r}")

    def update(updates: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        if params is None:
            raise ConfigError("add_decayed_weights needs the params: call update(grads, opt_state, params)")
        u, p = tree_leaves(updates), tree_leaves(params)
        if mask is None:
            return leaves_like(updates, fe.add(u, p, alpha=weight_decay)), state
        flags = _mask_flags(mask, params, "add_decayed_weights")
        out = [x + weight_decay * w if f else x for x, w, f in zip(u, p, flags)]
        return leaves_like(updates, out), state

    return GradientTransformation(lambda params: EmptyState(), update)


class MaskedState(NamedTuple):
    inner_state: Any


def masked(inner: GradientTransformation, mask: Any) -> GradientTransformation:
    """Apply ``inner`` only to the leaves where ``mask`` (a tree of bools like the params, or a
    function params -> that tree) is True; the other updates pass through unchanged.

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.masked(flo.add_decayed_weights(0.01), flo.ndim_mask(2))
    """

    def select(tree: Any, flags: list[bool]) -> list[Any]:
        return [x for x, f in zip(tree_leaves(tree), flags) if f]

    def init(params: Any) -> MaskedState:
        flags = _mask_flags(mask, params, "masked")
        return MaskedState(inner.init(select(params, flags)))

    def update(updates: Any, state: MaskedState, params: Any = None) -> tuple[Any, MaskedState]:
        flags = _mask_flags(mask, params if params is not None else updates, "masked")
        sub_params = select(params, flags) if params is not None else None
        new_sub, inner_state = inner.update(select(updates, flags), state.inner_state, sub_params)
        it = iter(new_sub)
        out = [next(it) if f else x for x, f in zip(tree_leaves(updates), flags)]
        return leaves_like(updates, out), MaskedState(inner_state)

    return GradientTransformation(init, update)


def ndim_mask(min_ndim: int = 2) -> Callable[[Any], Any]:
    """A mask function: True for leaves with at least ``min_ndim`` dimensions (weight matrices,
    conv kernels), False for biases and norm scales.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> flo.ndim_mask(2)({"w": torch.ones(2, 2), "b": torch.ones(2)})
        {'w': True, 'b': False}
    """

    def mask(params: Any) -> Any:
        from fnloop.tree import tree_map

        return tree_map(lambda p: p.ndim >= min_ndim, params)

    return mask
