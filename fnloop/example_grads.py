"""The per-example gradient transform shared by :func:`fnloop.per_example_grads` and the train
step of a per-example optimizer (``flo.dp_sgd``): ``torch.func.vmap`` of ``torch.func.grad``
over the examples, each example presented to the loss as a batch of one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as torch_pytree

from fnloop import execution
from fnloop.tree import tree_flatten, tree_map

__all__ = ["per_example_value_and_grad", "rowwise_value_and_grad"]


def per_example_value_and_grad(
    loss_of: Callable[[Any, Any], tuple[torch.Tensor, Any]], batch_dim: int = 0
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """``(params, batch) -> (grads, aux)`` with a leading example dimension on each, for
    ``loss_of(params, one_example_batch) -> (loss, aux)`` (differentiated w.r.t. ``params``).

    Example:
        >>> import torch
        >>> fn = per_example_value_and_grad(lambda p, b: ((p["w"] * b).sum(), {}))
        >>> fn({"w": torch.ones(2)}, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))[0]["w"]
        tensor([[1., 2.],
                [3., 4.]])
    """

    def one(params: Any, example: Any) -> tuple[Any, Any]:
        as_batch = torch_pytree.tree_map(lambda x: x.unsqueeze(batch_dim) if isinstance(x, torch.Tensor) else x, example)
        return torch.func.grad(lambda p: loss_of(p, as_batch), has_aux=True)(params)  # type: ignore[no-any-return]

    def batched(params: Any, batch: Any) -> tuple[Any, Any]:
        if execution.differentiated(params):
            dims = torch_pytree.tree_map(lambda x: batch_dim if isinstance(x, torch.Tensor) else None, batch)
            return torch.func.vmap(one, in_dims=(None, dims), randomness="different")(params, batch)  # type: ignore[no-any-return]
        # eager: one copy of the params per example (stride-0 views, no memory), the per-example
        # losses under vmap, then ONE ordinary backward of their sum. Same values as grad under
        # vmap, about twice as fast (no grad transform per call). The batch is flattened once:
        # its tensors go through vmap as a flat list, the rest is rebuilt around them.
        leaves, rebuild = execution.flatten(batch)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]

        def value(row: Any, examples: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
            it = iter(examples)
            return loss_of(row, rebuild([next(it).unsqueeze(batch_dim) if isinstance(x, torch.Tensor) else x for x in leaves]))

        n = _examples(tensors, batch_dim)
        copies = tree_map(lambda p: p.detach().expand(n, *p.shape), params)
        grads, (_, aux) = rowwise_value_and_grad(value, copies, tensors, in_dims=(batch_dim,), randomness="different")
        return grads, aux

    return batched


def rowwise_value_and_grad(
    fn: Callable[..., tuple[torch.Tensor, Any]], rows: Any, *args: Any, in_dims: tuple[Any, ...], randomness: str
) -> tuple[Any, tuple[torch.Tensor, Any]]:
    """``(grads, (losses, aux))`` of ``fn(row, *args) -> (loss, aux)`` for every row of ``rows``
    (a tree of tensors whose leading dimension indexes independent problems: the examples of a
    batch, the members of an ensemble), the tensors of each of ``args`` split along its entry of
    ``in_dims`` (None: shared).

    The losses are computed under ``vmap``, then differentiated by ONE ordinary backward of their
    sum: row i of every leaf reaches loss i only, so the gradient of the sum at row i is the
    gradient of loss i. The values of ``vmap(grad(fn))`` up to kernel rounding, without a grad
    transform per call. Eager only (``rows`` must not require grad already).

    Example:
        >>> import torch
        >>> fn = lambda w, x: ((w * x).sum(), {})
        >>> rowwise_value_and_grad(fn, torch.ones(2, 3), torch.arange(6.0).view(2, 3), in_dims=(0,), randomness="error")[0]
        tensor([[0., 1., 2.],
                [3., 4., 5.]])
    """
    with torch.enable_grad():
        flat, spec = tree_flatten(rows)
        leaves = [x.detach().requires_grad_(True) for x in flat]
        losses, aux = execution.vmap(fn, (spec.unflatten(leaves), *args), (0, *in_dims), randomness)
        grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True, materialize_grads=True)
    return spec.unflatten(list(grads)), (losses, aux)


def _examples(tensors: list[torch.Tensor], batch_dim: int) -> int:
    sizes = {x.shape[batch_dim] for x in tensors}
    if len(sizes) != 1:
        raise ValueError(f"per-example gradients: the batch leaves disagree on the number of examples {sorted(sizes)}")
    return sizes.pop()
