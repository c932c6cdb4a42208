"""The per-example gradient transform shared by :func:`fnloop.per_example_grads` and the train
step of a per-example optimizer (``flo.dp_sgd``): ``torch.func.vmap`` of ``torch.func.grad``
over the examples, each example presented to the loss as a batch of one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as torch_pytree

__all__ = ["per_example_value_and_grad"]


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
        dims = torch_pytree.tree_map(lambda x: batch_dim if isinstance(x, torch.Tensor) else None, batch)
        return torch.func.vmap(one, in_dims=(None, dims), randomness="different")(params, batch)  # type: ignore[no-any-return]

    return batched
