"""DP-SGD: per-example clipping and Gaussian noise, as a gradient transformation.

A :class:`PerExampleGradientTransformation` receives *per-example* gradients (every leaf with a
leading example dimension) instead of the batch gradient. ``fl.train_step(loss_fn)`` sees the
type of ``state.tx`` and computes those with :func:`fnloop.per_example_value_and_grad` (the loss
of each example alone); nothing else about the step changes, so ``tx=flo.dp_sgd(...)`` is all a
user writes.

:func:`dp_aggregate` is the privatising part (Abadi et al., 2016, as Opacus computes it): scale
each example's gradient to global norm at most ``max_grad_norm`` (factor
``min(1, C / (norm + 1e-6))``), sum over the examples, add Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` to each coordinate, divide by the (expected) batch size.
The noise is drawn from the generators the step seeds from ``(state.rng, state.step)``: a run
is reproducible and resumes bitwise, and under :func:`fnloop.vmap` each member draws its own.
Its state counts the steps taken, for the privacy accountant (:mod:`fnloop.privacy`,
:class:`fnloop.callbacks.PrivacyMonitor`).

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.TrainState.create(torch.nn.Linear(3, 1), flo.dp_sgd(lr=0.1, max_grad_norm=1.0, noise_multiplier=1.1))
    >>> step = fl.train_step(lambda m, b: (m(b[0]) - b[1]).square().mean())
    >>> state, _ = step(state, (torch.randn(8, 3), torch.randn(8, 1)))
    >>> int(flo.dp_state(state.opt_state).count)
    1
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fnloop.errors import ConfigError
from fnloop.optim._find import find_state
from fnloop.optim.aliases import sgd
from fnloop.optim.base import GradientTransformation, LearningRate, chain, leaves_like
from fnloop.tree import tree_leaves

__all__ = ["PerExampleGradientTransformation", "DPState", "dp_aggregate", "dp_sgd", "dp_state"]


class PerExampleGradientTransformation(GradientTransformation):
    """A transform whose ``update`` takes per-example gradients (leading example dimension);
    train steps give it those (see the module docstring)."""

    __slots__ = ()


class DPState(NamedTuple):
    """``count``: DP steps taken; ``noise_multiplier``: sigma (float64), for the accountant."""

    count: torch.Tensor
    noise_multiplier: torch.Tensor


def _check(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
        raise ConfigError(f"dp_sgd: {name} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def dp_aggregate(
    max_grad_norm: float, noise_multiplier: float, *, expected_batch_size: int | None = None
) -> PerExampleGradientTransformation:
    """Per-example gradients -> one privatised gradient: clip each example to ``max_grad_norm``,
    sum, add N(0, (noise_multiplier * max_grad_norm)^2) noise, divide by the batch size
    (``expected_batch_size`` with Poisson sampling, else the actual one).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> tx = flo.dp_aggregate(max_grad_norm=1.0, noise_multiplier=0.0)
        >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}       # two examples
        >>> tx.update(g, tx.init({"w": torch.zeros(2)}))[0]["w"]
        tensor([0.4500, 0.6000])
    """
    clip = _check("max_grad_norm", max_grad_norm, positive=True)
    sigma = _check("noise_multiplier", noise_multiplier, positive=False)
    if expected_batch_size is not None and (isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, int) or expected_batch_size < 1):
        raise ConfigError(f"dp_sgd: expected_batch_size must be an int >= 1 or None, got {expected_batch_size!r}")

    def init(params: Any) -> DPState:
        return DPState(torch.zeros((), dtype=torch.int64), torch.tensor(sigma, dtype=torch.float64))

    def update(updates: Any, state: DPState, params: Any = None) -> tuple[Any, DPState]:
        leaves = tree_leaves(updates)
        n = leaves[0].shape[0]
        norms = torch.stack([g.reshape(n, -1).norm(2, dim=-1) for g in leaves], dim=1).norm(2, dim=1)
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        summed = [torch.einsum("i,i...", factor, g) for g in leaves]
        if sigma:
            summed = [s + torch.normal(0.0, sigma * clip, size=s.shape, dtype=s.dtype, device=s.device) for s in summed]
        size = expected_batch_size or n
        return leaves_like(updates, [s / size for s in summed]), DPState(state.count + 1, state.noise_multiplier)

    return PerExampleGradientTransformation(init, update)


def dp_sgd(
    lr: LearningRate,
    max_grad_norm: float,
    noise_multiplier: float,
    *,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    expected_batch_size: int | None = None,
) -> PerExampleGradientTransformation:
    """DP-SGD: :func:`dp_aggregate` then :func:`fnloop.optim.sgd` (torch.optim.SGD's numerics),
    as Opacus's ``DPOptimizer`` around ``torch.optim.SGD``.

    Example:
        >>> import fnloop.optim as flo
        >>> tx = flo.dp_sgd(lr=0.1, max_grad_norm=1.0, noise_multiplier=1.1, momentum=0.9)
    """
    inner = chain(
        dp_aggregate(max_grad_norm, noise_multiplier, expected_batch_size=expected_batch_size),
        sgd(lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov),
    )
    return PerExampleGradientTransformation(*inner)


def dp_state(opt_state: Any) -> DPState | None:
    """The :class:`DPState` inside an optimizer state (None when there is none).

    Example:
        >>> import torch, fnloop.optim as flo
        >>> float(flo.dp_state(flo.dp_sgd(0.1, 1.0, 1.3).init({"w": torch.ones(1)})).noise_multiplier)
        1.3
    """
    return find_state(opt_state, DPState)  # type: ignore[no-any-return]
