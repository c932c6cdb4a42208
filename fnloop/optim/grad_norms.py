"""Opt-in gradient norms (and gradients) for ``Callback.on_before_optimizer_step``: a transform,
chained first, that records the norms of the gradients it is given in its own state and passes
them on unchanged. The default step computes nothing extra; only a chain that includes it pays.

Names follow Lightning's ``grad_norm``: ``grad_2.0_norm/<param>`` and ``grad_2.0_norm_total``.

Example:
    >>> import torch, fnloop.optim as flo
    >>> tx = flo.chain(flo.track_grad_norms(), flo.sgd(lr=0.1))
    >>> params = {"w": torch.zeros(2)}
    >>> _, opt_state = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
    >>> {k: float(v) for k, v in flo.grad_norms(opt_state).items()}
    {'grad_2.0_norm/w': 5.0, 'grad_2.0_norm_total': 5.0}
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch

from fnloop.errors import ConfigError
from fnloop.optim.base import GradientTransformation

__all__ = ["GradNormState", "track_grad_norms", "grad_norms", "tracked_grads"]


class GradNormState(NamedTuple):
    """The norms of the last gradients seen (a dict by parameter name and the total), and the
    gradients themselves when kept (else an empty dict)."""

    norms: dict[str, torch.Tensor]
    total: torch.Tensor
    grads: dict[str, torch.Tensor]


def track_grad_norms(norm_type: float = 2.0, *, keep_grads: bool = False) -> GradientTransformation:
    """Record the ``norm_type``-norm of each gradient and of all together (``keep_grads``: a
    copy of the gradients too, at the memory cost of one more set of them).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> flo.track_grad_norms().init({"w": torch.zeros(1)}).norms
        {'w': tensor(0.)}
    """
    if not norm_type > 0:
        raise ConfigError(f"track_grad_norms(norm_type={norm_type!r}): the norm type must be > 0")

    def init(params: Any) -> GradNormState:
        flat = _named(params)
        zeros = {k: torch.zeros((), dtype=v.dtype, device=v.device) for k, v in flat.items()}
        like = next(iter(flat.values()), torch.zeros(()))
        grads = {k: torch.zeros_like(v) for k, v in flat.items()} if keep_grads else {}
        return GradNormState(zeros, torch.zeros((), dtype=like.dtype, device=like.device), grads)

    def update(updates: Any, state: GradNormState, params: Any = None) -> tuple[Any, GradNormState]:
        flat = _named(updates)
        names = list(flat)
        norms = torch._foreach_norm([flat[k] for k in names], norm_type) if names else []
        total = torch.linalg.vector_norm(torch.stack(list(norms)), norm_type) if names else state.total
        grads = {k: v.detach().clone() for k, v in flat.items()} if keep_grads else {}
        return updates, GradNormState(dict(zip(names, norms)), total, grads)

    return GradientTransformation(init, update)


def _named(tree: Any) -> dict[str, torch.Tensor]:
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace="fnloop")
    return {".".join(map(str, p)): v for p, v in zip(paths, leaves) if isinstance(v, torch.Tensor)}


def _found(opt_state: Any) -> GradNormState | None:
    is_node = lambda n: isinstance(n, GradNormState)  # noqa: E731
    for node in optree.tree_leaves(opt_state, is_leaf=is_node, namespace="fnloop", none_is_leaf=True):
        if is_node(node):
            return node
    return None


def grad_norms(opt_state: Any, norm_type: float = 2.0) -> dict[str, torch.Tensor]:
    """``{"grad_<p>_norm/<name>": tensor, ..., "grad_<p>_norm_total": tensor}`` from the first
    :func:`track_grad_norms` in ``opt_state`` ({} when there is none). No host read.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> flo.grad_norms(flo.sgd(lr=0.1).init({"w": torch.zeros(1)}))
        {}
    """
    node = _found(opt_state)
    if node is None:
        return {}
    tag = f"grad_{float(norm_type)}_norm"
    return {**{f"{tag}/{k}": v for k, v in node.norms.items()}, f"{tag}_total": node.total}


def tracked_grads(opt_state: Any) -> dict[str, torch.Tensor]:
    """The gradients kept by ``track_grad_norms(keep_grads=True)`` ({} otherwise).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> flo.tracked_grads(flo.track_grad_norms(keep_grads=True).init({"w": torch.zeros(1)}))
        {'w': tensor([0.])}
    """
    node = _found(opt_state)
    return dict(node.grads) if node is not None else {}
