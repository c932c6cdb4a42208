"""Per-example gradients: the gradient of the loss of each example of a batch, in one batched
computation (``torch.func.vmap`` of ``torch.func.grad`` over the examples).

The loss of example j is ``loss_fn(model, batch_j)`` where ``batch_j`` is the batch reduced to
that one example (every leaf sliced along ``batch_dim``, the dimension kept with size 1), so a
loss function written for batches works unchanged. The module runs in training mode; dropout
draws per example from the generators seeded by the state's key and step, as a step does.

Models whose layers mix the examples of a batch (BatchNorm in training mode) have no
per-example gradients: use GroupNorm or LayerNorm, as DP-SGD libraries require.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.TrainState.create(torch.nn.Linear(3, 2), flo.sgd(lr=0.1))
    >>> batch = (torch.randn(5, 3), torch.randn(5, 2))
    >>> grads = fl.per_example_grads(lambda m, b: (m(b[0]) - b[1]).square().mean())(state, batch)
    >>> grads["weight"].shape
    torch.Size([5, 2, 3])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fnloop import execution
from fnloop import rng as _rng
from fnloop.bind import bind, working_copy
from fnloop.errors import StepError
from fnloop.loss import split_loss
from fnloop.example_grads import per_example_value_and_grad
from fnloop.state import TrainState
from fnloop.step import functional_model

__all__ = ["per_example_grads"]


def per_example_grads(loss_fn: Callable[..., Any], *, batch_dim: int = 0) -> Callable[[TrainState, Any], dict[str, torch.Tensor]]:
    """Build ``(state, batch) -> {name: Tensor[batch, *param.shape]}``, the gradient of
    ``loss_fn(model, example)`` for every example of ``batch``, for the trainable params.

    Args:
        loss_fn: ``loss_fn(model, batch) -> loss | (loss, aux)``, as for :func:`fnloop.train_step`.
        batch_dim: the dimension of every batch leaf that indexes the examples.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
        >>> fn = fl.per_example_grads(lambda m, b: m(b).sum())
        >>> fn(state, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))["weight"]
        tensor([[[1., 2.]],
        <BLANKLINE>
                [[3., 4.]]])
    """
    if not callable(loss_fn):
        raise StepError(f"per_example_grads: loss_fn must be callable, got {type(loss_fn).__name__}")

    def grads(state: TrainState, batch: Any) -> dict[str, torch.Tensor]:
        execution.check_state(state, "per_example_grads")
        template = state.module
        names = [n for n, p in template.named_parameters() if p.requires_grad]
        buffers = state.buffers

        def loss_of(p: dict[str, torch.Tensor], example: Any) -> tuple[torch.Tensor, Any]:
            module = working_copy(template, True)
            if torch.compiler.is_compiling():  # dynamo traces functional_call
                return split_loss(loss_fn(functional_model(module, {**state.params, **p}, buffers), example), "per_example_grads")
            with bind(module, {**state.params, **p}, buffers) as model:  # this thread's copy: bound in place, faster
                return split_loss(loss_fn(model, example), "per_example_grads")

        trainable = {n: state.params[n] for n in names}
        seed = execution.state_seed(state.rng, state.step)
        with _rng.seeded(seed, execution.cuda_devices(state.params)), torch.enable_grad():
            out, _ = per_example_value_and_grad(loss_of, batch_dim)(trainable, batch)
        return out  # type: ignore[no-any-return]

    return grads
