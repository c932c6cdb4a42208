"""Types shared across fnloop: tensor trees and the protocols of every pluggable function."""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias, runtime_checkable

import torch

__all__ = [
    "TensorTree",
    "TensorDict",
    "Metrics",
    "GradientTransformationLike",
    "Schedule",
    "StepFn",
    "EvalStepFn",
    "PredictStepFn",
    "LossFn",
]

TensorTree: TypeAlias = Any
"""A pytree (nested dicts, lists, tuples, fnloop dataclasses) whose leaves are tensors."""

TensorDict: TypeAlias = dict[str, torch.Tensor]
Metrics: TypeAlias = dict[str, torch.Tensor]


class GradientTransformationLike(Protocol):
    """``init(params) -> opt_state``; ``update(grads, opt_state, params) -> (updates, opt_state)``."""

    def init(self, params: TensorTree) -> TensorTree: ...

    def update(
        self, updates: TensorTree, state: TensorTree, params: TensorTree | None = None
    ) -> tuple[TensorTree, TensorTree]: ...


@runtime_checkable
class Schedule(Protocol):
    """A learning-rate schedule: step count (int or tensor) -> learning rate (tensor)."""

    def __call__(self, count: int | torch.Tensor) -> torch.Tensor: ...


class LossFn(Protocol):
    """``loss_fn(model, batch) -> loss`` or ``(loss, {"name": tensor, ...})``."""

    def __call__(self, model: Any, batch: Any) -> torch.Tensor | tuple[torch.Tensor, Metrics]: ...


class StepFn(Protocol):
    """A train step: ``(state, batch) -> (state, metrics)``."""

    def __call__(self, state: Any, batch: Any) -> tuple[Any, Metrics]: ...


class EvalStepFn(Protocol):
    """An eval step: ``(state, batch) -> metrics``."""

    def __call__(self, state: Any, batch: Any) -> Metrics: ...


class PredictStepFn(Protocol):
    """A predict step: ``(state, batch) -> outputs`` (any pytree)."""

    def __call__(self, state: Any, batch: Any) -> Any: ...
