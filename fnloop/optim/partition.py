"""Different transforms for different parameters: ``multi_transform`` (parameter groups) and
``set_to_zero`` (frozen parameters), with optax's meaning.

Example:
    >>> import torch, fnloop.optim as flo
    >>> params = {"body.weight": torch.ones(2), "head.weight": torch.ones(2)}
    >>> tx = flo.multi_transform(
    ...     {"body": flo.set_to_zero(), "head": flo.sgd(lr=0.5)},
    ...     {"body.weight": "body", "head.weight": "head"},
    ... )
    >>> new_params, _ = flo.fused_apply(tx)({k: torch.ones(2) for k in params}, tx.init(params), params)
    >>> new_params
    {'body.weight': tensor([1., 1.]), 'head.weight': tensor([0.5000, 0.5000])}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from fnloop.errors import ConfigError
from fnloop.optim.base import EmptyState, GradientTransformation, fused_apply, leaves_like
from fnloop.tree import tree_flatten_with_path, tree_leaves, tree_structure

__all__ = ["MultiTransformState", "multi_transform", "set_to_zero"]


def set_to_zero() -> GradientTransformation:
    """Zero updates: the parameters never change (frozen). The fused path returns the very same
    param tensors and writes nothing.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> flo.set_to_zero().update({"w": torch.ones(2)}, flo.EmptyState())[0]
        {'w': tensor([0., 0.])}
    """

    def update(updates: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        return leaves_like(updates, [torch.zeros_like(u) for u in tree_leaves(updates)]), state

    def fused(
        grads: Any, state: EmptyState, params: Any, *, donate: bool = False, consume: bool = False
    ) -> tuple[Any, EmptyState]:
        if consume and type(grads) is dict:
            grads.clear()
        return leaves_like(params, tree_leaves(params)), state

    return GradientTransformation(lambda params: EmptyState(), update, fused)


class MultiTransformState(NamedTuple):
    """``inner_states``: label -> the state of that label's transform (over its parameters only)."""

    inner_states: dict[str, Any]


Labels = Any  # a tree like the params of label strings, or a function params -> that tree


def _is_flat(tree: Any) -> bool:
    """A flat dict of tensors (the params of a TrainState): handled with plain dict operations,
    which ``torch.compile`` traces."""
    return type(tree) is dict and all(isinstance(v, torch.Tensor) for v in tree.values())


def _flat(tree: Any) -> tuple[list[str], list[Any], Callable[[list[Any]], Any]]:
    """``(names, leaves, rebuild)``: a flat dict of tensors by its keys, in its own order; any
    other tree by key paths."""
    if _is_flat(tree):
        names = list(tree)
        return names, [tree[k] for k in names], lambda leaves: dict(zip(names, leaves))
    names, leaves, spec = tree_flatten_with_path(tree)
    return names, leaves, spec.unflatten


def multi_transform(
    transforms: Mapping[str, GradientTransformation], labels: Labels | Callable[[Any], Labels]
) -> GradientTransformation:
    """Apply ``transforms[label]`` to the parameters labelled ``label``: per-group optimizers
    (learning rates, weight decay) and frozen groups (:func:`set_to_zero`), as optax's
    ``multi_transform``.

    Each transform sees only its parameters, as a dict (keyed by parameter name, or by key path
    for other trees); its state is ``state.inner_states[label]``. The fused path runs each
    group's fused path, so groups of torch-exact optimizers stay bitwise equal to torch.optim
    with the matching parameter groups.

    Args:
        transforms: label -> transform.
        labels: a tree like the params whose leaves are labels, or a function params -> that tree.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.multi_transform(
        ...     {"decay": flo.adamw(1e-3, weight_decay=0.01), "no_decay": flo.adamw(1e-3, weight_decay=0.0)},
        ...     lambda params: {k: "decay" if p.ndim >= 2 else "no_decay" for k, p in params.items()},
        ... )
        >>> sorted(tx.init({"w": torch.ones(2, 2), "b": torch.ones(2)}).inner_states)
        ['decay', 'no_decay']
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise ConfigError(
            f"multi_transform: transforms must be a non-empty dict label -> GradientTransformation, got {transforms!r}"
        )
    for label, t in transforms.items():
        if not isinstance(t, GradientTransformation):
            raise ConfigError(
                f"multi_transform: transforms[{label!r}] is a {type(t).__name__}, expected a GradientTransformation"
            )
    fused_of = {label: fused_apply(t) for label, t in transforms.items()}

    def groups(tree: Any, names: list[str]) -> dict[str, list[int]]:
        """label -> the positions of its leaves in ``tree`` (flattened as :func:`_flat` does)."""
        labelled = labels(tree) if callable(labels) else labels
        if _is_flat(tree) and type(labelled) is dict and labelled.keys() == tree.keys():
            flat = [labelled[k] for k in names]
        elif tree_structure(labelled) == tree_structure(tree):
            flat = tree_leaves(labelled)
        else:
            raise ConfigError(
                f"multi_transform: the labels' tree does not match the params' tree ({len(tree_leaves(labelled))} labels, {len(names)} params)"
            )
        out: dict[str, list[int]] = {label: [] for label in transforms}
        for i, label in enumerate(flat):
            if label not in out:
                raise ConfigError(
                    f"multi_transform: labels[{names[i]!r}] is {label!r}, which is not a key of transforms {sorted(transforms)}"
                )
            out[label].append(i)
        return out

    def split(leaves: list[Any], names: list[str], at: list[int]) -> dict[str, Any]:
        return {names[i]: leaves[i] for i in at}

    def init(params: Any) -> MultiTransformState:
        names, leaves, _ = _flat(params)
        at = groups(params, names)
        return MultiTransformState({label: t.init(split(leaves, names, at[label])) for label, t in transforms.items()})

    def update(updates: Any, state: MultiTransformState, params: Any = None) -> tuple[Any, MultiTransformState]:
        names, u, rebuild = _flat(updates)
        at = groups(params if params is not None else updates, names)
        p = _flat(params)[1] if params is not None else None
        out, new_states = list(u), {}
        for label, t in transforms.items():
            sub_p = split(p, names, at[label]) if p is not None else None
            sub_u, new_states[label] = t.update(split(u, names, at[label]), state.inner_states[label], sub_p)
            for i in at[label]:
                out[i] = sub_u[names[i]]
        return rebuild(out), MultiTransformState(new_states)

    def fused(
        grads: Any, state: MultiTransformState, params: Any, *, donate: bool = False, consume: bool = False
    ) -> tuple[Any, MultiTransformState]:
        names, p, rebuild = _flat(params)
        at = groups(params, names)
        g = [grads[k] for k in names] if _is_flat(params) and type(grads) is dict else _flat(grads)[1]
        if consume and type(grads) is dict:
            grads.clear()  # each group's dict below holds the only references: a consuming group frees them
        sub_grads = {label: split(g, names, at[label]) for label in transforms}
        g.clear()
        out, new_states = list(p), {}
        for label in transforms:
            sub_p, new_states[label] = fused_of[label](
                sub_grads.pop(label),
                state.inner_states[label],
                split(p, names, at[label]),
                donate=donate,
                consume=consume,
            )
            for i in at[label]:
                out[i] = sub_p[names[i]]
        return rebuild(out), MultiTransformState(new_states)

    return GradientTransformation(init, update, fused)
